"""HeartCompletion training tools (installed as the ``heart_training`` package).

- :mod:`heart_training.data`: label maps -> training cases (``heart-prepare``, ``heart-synth``,
  ``heart-split``), the ``.npz`` case format, datasets and phase masks, the data gate;
- :mod:`heart_training.train`: losses, the training engine and ``heart-train`` (DDP, exact resume);
- :mod:`heart_training.evaluation`: scenarios, the nearest-heart baseline, ``heart-eval`` and its
  report, and the learning checks (near-surface IoU, does a model use its input).

:mod:`heart_training.config` reads a run's config (``configs/*.yaml`` + ``key=value`` overrides), which
data, training and evaluation share. Slurm job scripts (``slurm/``) are data. The completion command
(``heart-complete``) is inference, in :mod:`HeartCompletionLib.inference`. Module paths before the
subpackages still import: :mod:`HeartCompletionLib.moved_modules`.
"""

from HeartCompletionLib.moved_modules import install_moved_module_finder

install_moved_module_finder()
