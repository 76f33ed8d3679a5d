"""Named sizes of the multi-class VecSet model (:class:`~HeartCompletionLib.model.vecset.HeartVecSet`).

A :class:`ModelConfig` fully describes the network's shapes; it is stored in every checkpoint
(:meth:`ModelConfig.to_dict`) so a checkpoint rebuilds its own model. Four named sizes:

- ``tiny``: unit tests and smoke runs (well under 1M parameters, trains in a minute on CPU);
- ``compact``: CPU completion at CT resolution inside Slicer (about 1.2M parameters; the bundled
  model and the completion study's size: a 512 x 512 x 300 CT grid completes in 4-6 s on 2 cores);
- ``small``: a few million parameters (twice the width and 1.5 x the depth of ``compact``); at CT
  resolution on 2 CPU cores about 3x slower than ``compact`` (``docs/benchmarks.md``);
- ``base``: the cluster model (4 x A100 40 GB, ~1,000 training hearts; tens of millions).

>>> cfg = get_config("tiny", num_classes=10)
>>> cfg.num_classes, cfg.width % cfg.heads
(10, 0)
>>> ModelConfig.from_dict(cfg.to_dict()) == cfg
True

Print the parameter count of every named config (:mod:`.configs_cli`)::

    python -m HeartCompletionLib.model.configs_cli --num_classes 10
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

CONFIG_NAMES = ("tiny", "compact", "small", "base")
BOTTLENECKS = ("layernorm", "kl", "none")
LATENT_QUERIES = ("learned", "fps")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of :class:`~HeartCompletionLib.model.vecset.HeartVecSet`.

    Coordinates enter the network in normalised units (``x_n = (x_ras_mm - c) / S``, see
    :mod:`HeartCompletionLib.geometry.normalization`); the Fourier frequencies below are in cycles per
    normalised unit times ``pi``: frequency ``k`` is ``2**k * pi``, so with ``S = 100 mm`` the
    finest of ``num_frequencies = 8`` has a wavelength of ``2 / 2**7`` units = 1.6 mm.
    """

    num_classes: int = 10  #: K: structures in the table, one-hot input size and output channels
    num_latents: int = 256  #: M: latent vectors in the set
    width: int = 256  #: channel width of every attention layer
    depth: int = 6  #: self-attention blocks in the latent trunk
    heads: int = 8  #: heads of the encoder cross-attention and the trunk
    decoder_heads: int = 8  #: heads of the decoder cross-attention
    mlp_ratio: float = 4.0  #: hidden width of each GELU MLP = mlp_ratio * width
    num_frequencies: int = 8  #: Fourier octaves per axis (sin and cos of 2**k * pi * x)
    include_input: bool = True  #: also feed raw xyz_n next to the Fourier features
    latent_dim: int = 32  #: channels of the bottleneck (the compact shape code)
    bottleneck: str = "layernorm"  #: "layernorm" (project down, LayerNorm, up), "kl" (Gaussian) or "none"
    latent_queries: str = "learned"  #: "learned" (M learnt queries) or "fps" (farthest input points)
    use_normals: bool = False  #: encoder input also gets the outward unit normals
    qk_norm: bool = False  #: LayerNorm on each head's queries and keys (stabler at high learning rates)

    def __post_init__(self) -> None:
        positive = ("num_classes", "num_latents", "width", "heads", "decoder_heads", "latent_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"model config: depth must be an integer >= 0, got {self.depth!r}")
        if not isinstance(self.num_frequencies, int) or self.num_frequencies < 0:
            raise ValueError(f"model config: num_frequencies must be an integer >= 0, got {self.num_frequencies!r}")
        if self.num_frequencies == 0 and not self.include_input:
            raise ValueError("model config: no point features (num_frequencies = 0 and include_input = False)")
        if self.width % self.heads or self.width % self.decoder_heads:
            raise ValueError(
                f"model config: width {self.width} must be divisible by heads {self.heads} "
                f"and decoder_heads {self.decoder_heads}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"model config: mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"model config: bottleneck {self.bottleneck!r} is not one of {BOTTLENECKS}")
        if self.latent_queries not in LATENT_QUERIES:
            raise ValueError(f"model config: latent_queries {self.latent_queries!r} is not one of {LATENT_QUERIES}")

    @property
    def fourier_dim(self) -> int:
        """Channels of the coordinate embedding: 6 per octave (sin, cos x 3 axes) + 3 raw."""
        return 6 * self.num_frequencies + (3 if self.include_input else 0)

    @property
    def point_feature_dim(self) -> int:
        """Channels of one encoder input point before the first linear layer."""
        return self.fourier_dim + self.num_classes + (3 if self.use_normals else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer format, a typo)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def with_changes(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


#: Every named size draws its latent queries from the input points (``fps``): with learnt queries
#: the encoder collapsed in training -- the same latents for every heart, so the decoder learnt one
#: mean field (two hearts scaled 0.8 / 1.2: latent difference 2e-4 of their spread at step 300
#: with learnt queries, 0.83 at step 1,200 with fps; docs/completion_study.md, "Encoder collapse").
_NAMED = {
    # ~0.1M parameters: unit tests, trains on one synthetic heart in seconds on CPU.
    "tiny": dict(num_latents=32, width=64, depth=2, heads=4, decoder_heads=4, num_frequencies=6, latent_dim=16,
                 latent_queries="fps"),
    # ~1.2M parameters: the CPU-inference size (CT-resolution completion in seconds on 2 cores; the
    # bundled model). Wider fields cost queries: `small` decodes ~3x the voxels at CT, each ~2x dearer.
    "compact": dict(num_latents=256, width=128, depth=4, heads=8, decoder_heads=8, num_frequencies=8, latent_dim=32,
                    latent_queries="fps"),
    # ~6M parameters: more capacity per GPU step (the GPU step is launch-bound at these widths).
    "small": dict(num_latents=256, width=256, depth=6, heads=8, decoder_heads=8, num_frequencies=8, latent_dim=32,
                  latent_queries="fps"),
    # ~40M parameters: bf16 on 4 x A100 40 GB with ~1,000 hearts (more would overfit, not 425M).
    "base": dict(num_latents=512, width=512, depth=12, heads=8, decoder_heads=8, num_frequencies=8, latent_dim=64,
                 latent_queries="fps"),
}


def get_config(name: str, num_classes: int = 10, **overrides) -> ModelConfig:
    """The named config ``name`` (one of :data:`CONFIG_NAMES`) for ``num_classes`` structures.

    ``overrides`` change single fields, e.g. ``get_config("small", 10, bottleneck="kl")``.
    """
    if name not in _NAMED:
        raise ValueError(f"unknown model config {name!r}; known: {CONFIG_NAMES}")
    return ModelConfig(num_classes=int(num_classes), **{**_NAMED[name], **overrides})


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of parameters of a ``torch.nn.Module`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
