"""HeartCompletion training tools (installed as the ``heart_training`` package).

Converters (``heart-prepare``, ``heart-split``), datasets and phase masks, the trainer
(``heart-train``), evaluation (``heart-eval``) and the completion CLI (``heart-complete``).
"""
