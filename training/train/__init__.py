"""Training: configs, losses, the engine and ``heart-train``.

- the run's config is :mod:`heart_training.config` (shared with :mod:`heart_training.data`);
- :mod:`.losses`: the losses (signed distance, eikonal, exclusion hinge, teacher);
- :mod:`.engine`: one run (model, optimiser, steps, validation, checkpoints);
  :mod:`.trainer`: ``heart-train`` (also under ``torchrun``); :mod:`.distributed`: DDP set-up;
- :mod:`.state`: the resumable state file; :mod:`.logs`: JSONL, TensorBoard and console logs.
"""
