"""HeartCompletionLib: everything the Slicer module and the trainer share.

Structure table, physical geometry, label-map I/O, surface sampling and signed distances, the
VecSet model, checkpoint I/O, completion and metrics. No ``slicer`` or ``qt`` imports here, and
heavy optional dependencies (torch, nibabel, pynrrd, scikit-image) are imported where used.
"""

__version__ = "0.1.0"
