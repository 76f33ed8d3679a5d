"""Label maps -> training cases, and the cases -> batches.

- :mod:`.prepare` (one case) / :mod:`.prepare_cli` (``heart-prepare``): label maps -> ``.npz`` cases
  in :mod:`.case_format`; :mod:`.dataset_check` (``heart-prepare --check``);
- :mod:`.synth_cli` (``heart-synth``): synthetic label maps; :mod:`.split` (``heart-split``);
- :mod:`.dataset`: the training dataset and sampler; :mod:`.device_data`: the same samples drawn
  on the GPU (``data.device_cache``); :mod:`.phase_masks`: which structures the encoder sees;
- :mod:`.data_gate`: every case checked before training starts.
"""
