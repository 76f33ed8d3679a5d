"""``_()``, Slicer's translation function, or the identity where the application is absent.

Every user-visible string of the module goes through ``_()`` (Slicer's convention). Inside
Slicer this is ``slicer.i18n.tr`` itself (it finds its translation context from the caller's
file, so re-exporting it keeps the context right); ``slicer-core`` has no application layer and
so no ``slicer.i18n``: there the text is returned untranslated, and the Qt-free logic imports
without any stand-in.
"""

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core, plain Python: no application, no translations

    def _(text: str) -> str:
        return text


__all__ = ["_"]
