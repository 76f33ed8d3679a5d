"""Completion: a partial label map and a checkpoint in, the whole heart out.

- :mod:`.completion`: ``complete`` / ``complete_label_map`` in steps (input, encode, fit, decode,
  fuse); :mod:`.latent_fit`: the latents fitted to the given structures; :mod:`.decode_grid`: the
  fast hierarchical decode; :mod:`.output_grid`: the grid the result is written on;
  :mod:`.islands`: small and detached pieces cleared; :mod:`.envelope`: plausibility against a
  whole-heart envelope;
- :mod:`.complete_cli`: ``heart-complete``, the one inference command; with ``--protocol lines``
  it is the Slicer panel's background process, started and read by :mod:`.completion_process`;
  :mod:`.process_exit`: its process ends without the interpreter's teardown.
"""
