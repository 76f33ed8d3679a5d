"""Evaluation: does completion beat copying the nearest known heart?

- :mod:`.scenarios`: which structures are given in each scenario; :mod:`.baseline`: the
  nearest-heart baseline; :mod:`.evaluate`: ``heart-eval``; :mod:`.report`: tables and figures;
- :mod:`.near_iou`: near-surface IoU on a case's own points (the learning test);
  :mod:`.input_use`: does a model use its input (the encoder-collapse check).
"""
