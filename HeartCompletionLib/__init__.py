"""HeartCompletionLib: everything the Slicer module and the trainer share.

The subpackages are layers, each importing only those above it in this list:

- :mod:`~HeartCompletionLib.structures`: which structures exist (the table), other label
  numberings, Slicer segments -> structures;
- :mod:`~HeartCompletionLib.geometry`: IJK -> RAS, the normalisation rule, surfaces, signed
  distances, metrics;
- :mod:`~HeartCompletionLib.io`: the in-memory label map, label-map files, synthetic hearts, meshes;
- :mod:`~HeartCompletionLib.model`: the VecSet network, its named configs, the encoder-input rule,
  the inference checkpoint and the registry of bundled models;
- :mod:`~HeartCompletionLib.inference`: completion (encode, decode, fuse), its clean-up and output
  grid, the ``heart-complete`` command and the Slicer panel's background process.

:mod:`~HeartCompletionLib.errors` (the base exception and exit codes) and
:mod:`~HeartCompletionLib.atomic_io` (every file written atomically) serve them all. No ``slicer``
or ``qt`` imports here, and heavy optional dependencies (torch, nibabel, pynrrd, scikit-image) are
imported where used. Modules' paths before the subpackages still import: :mod:`.moved_modules`.
"""

from .moved_modules import install_moved_module_finder

__version__ = "0.1.0"

install_moved_module_finder()
