"""The "Complete heart" Slicer module's own package: everything that needs ``slicer``.

``HeartCompletionLib`` (shared with the training pipeline) never imports ``slicer``, ``qt``,
``vtk`` or ``ctk``; the Slicer side lives here, next to ``HeartCompletion.py``, which Slicer puts
on ``sys.path``. Importing this package imports none of its submodules, so the Qt-free ones
(:mod:`.segments`, :mod:`.results`, :mod:`.install`, :mod:`.logic`) load with ``slicer-core``
alone; only :mod:`.parameters` and :mod:`.widget` need the Slicer application (``qt``,
``slicer.parameterNodeWrapper``).
"""

#: Submodules in dependency order (each imports only those before it): the order
#: ``HeartCompletionWidget.onReload`` reloads them in.
SUBMODULES = ("signals", "i18n", "segments", "results", "install", "logic", "parameters", "widget")
