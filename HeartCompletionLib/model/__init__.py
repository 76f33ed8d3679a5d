"""The network and its files.

- :mod:`.vecset`: the multi-class VecSet model (encoder, latent set, cross-attention decoder);
  :mod:`.configs`: its named configs (``tiny``/``small``/``base``), :mod:`.configs_cli` their sizes;
- :mod:`.fps_kernel`: the farthest-point sampling of the latent queries as one Triton kernel (CUDA;
  imported only there, Triton never on the CPU);
- :mod:`.encoder_input`: the encoder-input rule that training and completion share;
- :mod:`.checkpoint`: the inference checkpoint (safetensors + JSON), :mod:`.checkpoint_cli`;
- :mod:`.registry`: the named models that ship in ``bundled/`` (``models.json``).

torch is imported by :mod:`.vecset` and where a function needs it, never by this package itself
(the Slicer panel reads the registry and checkpoint metadata without it).
"""

from HeartCompletionLib.moved_modules import forward_old_names

__getattr__ = forward_old_names(__name__)
