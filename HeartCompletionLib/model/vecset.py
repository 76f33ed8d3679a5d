"""The multi-class VecSet model: surface points of some structures -> K signed distances anywhere.

Shape, after 3DShape2VecSet / VecSetX, for K structures at once:

1. **Point embedding**: Fourier features of the normalised position ``xyz_n`` (+ raw ``xyz_n``),
   concatenated with the structure's one-hot (K) (and the outward normal if configured), then a
   linear layer to ``width`` channels.
2. **Encoder**: cross-attention from M latent queries (learnt, or the embeddings of M
   farthest-point-sampled input points) to the N input points.
3. **Bottleneck**: ``layernorm`` (project to ``latent_dim``, LayerNorm, project back),
   ``kl`` (diagonal Gaussian, returns a KL term, the mean at eval) or ``none``.
4. **Trunk**: ``depth`` pre-LN self-attention blocks on the M latents.
5. **Decoder**: Fourier embedding of a query point -> cross-attention to the latents -> GELU MLP ->
   K signed distances through a zero-initialised output layer (the first prediction is exactly 0,
   so the first L1 loss equals the mean |target|: a free check of the data's units).

All coordinates and distances are in network units (``x_n = (x_ras_mm - c) / S``,
``d_n = d_mm / S``; :mod:`HeartCompletionLib.geometry.normalization`), negative inside. Every attention goes
through :func:`torch.nn.functional.scaled_dot_product_attention` (fused flash / memory-efficient
kernels on GPU). ``encode`` runs the trunk, so inference encodes once and decodes many queries
cheaply.

>>> import torch
>>> from HeartCompletionLib.model.configs import get_config
>>> model = HeartVecSet(get_config("tiny", num_classes=10)).eval()
>>> pts, onehot = torch.rand(2, 64, 3), torch.eye(10)[torch.randint(0, 10, (2, 64))]
>>> with torch.no_grad():
...     out = model(pts, onehot, torch.rand(2, 5, 3))
>>> tuple(out["sdf"].shape), float(out["sdf"].abs().max()), float(out["kl"])
((2, 5, 10), 0.0, 0.0)
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ModelConfig

#: queries decoded at once by :meth:`HeartVecSet.decode` unless told otherwise.
DEFAULT_DECODE_CHUNK = 32768


class FourierEmbedding(nn.Module):
    """``(..., 3) -> (..., 6F [+3])``: sin/cos of ``2**k * pi * x`` per axis (k < F), raw ``x`` last.

    Computed in float32 even under bf16 autocast: bf16 cannot resolve the fine octaves.
    """

    def __init__(self, num_frequencies: int, include_input: bool) -> None:
        super().__init__()
        self.include_input = include_input
        # from a list, not torch.arange: built on the meta device (checkpoint checks), arange goes
        # through a reference implementation that imports torch's compiler (~3 s); same values
        freqs = torch.tensor([2.0**k * math.pi for k in range(num_frequencies)], dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        xyz = xyz.float()
        angles = (xyz[..., :, None] * self.freqs).flatten(-2)  # (..., 3F)
        parts = [angles.sin(), angles.cos()]
        if self.include_input:
            parts.append(xyz)
        return torch.cat(parts, dim=-1)


class Attention(nn.Module):
    """Multi-head attention via ``scaled_dot_product_attention``; self-attention when no context."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, q_len, dim = x.shape
        head_dim = dim // self.heads
        q = self.to_q(x).view(b, q_len, self.heads, head_dim).transpose(1, 2)
        k, v = self.to_kv(context).view(b, context.shape[1], 2, self.heads, head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, q_len, dim))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(round(dim * ratio))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-LN transformer block; cross-attention to ``context`` when ``cross`` is set."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = None if self.norm_context is None else self.norm_context(context)
        x = x + self.attn(self.norm_x(x), ctx)
        return x + self.mlp(self.norm_mlp(x))


class Bottleneck(nn.Module):
    """Compresses every latent to ``latent_dim`` channels and back; returns ``(latents, kl)``.

    ``kl`` (float32 scalar) is the KL divergence to N(0, I), summed over ``latent_dim`` and
    averaged over batch and latents; 0 for the deterministic kinds.
    """

    def __init__(self, kind: str, width: int, latent_dim: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "layernorm":
            self.down = nn.Linear(width, latent_dim)
            # no affine: the code's scale is fixed, which is what makes it a bottleneck
            self.norm = nn.LayerNorm(latent_dim, elementwise_affine=False)
        elif kind == "kl":
            self.down = nn.Linear(width, 2 * latent_dim)
        if kind != "none":
            self.up = nn.Linear(latent_dim, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl = x.new_zeros((), dtype=torch.float32)
        if self.kind == "layernorm":
            return self.up(self.norm(self.down(x))), kl
        if self.kind == "kl":
            mean, logvar = self.down(x).float().chunk(2, dim=-1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1).mean()
            return self.up(z.to(x.dtype)), kl
        return x, kl


#: Farthest-point sampling on CUDA runs, in training, as one Triton kernel for the whole loop
#: (:func:`fps_triton_usable`, :mod:`HeartCompletionLib.model.fps_kernel`); otherwise it
#: replays one captured CUDA graph per input shape instead of launching a few small kernels for
#: each of its ``m`` sequential steps (at batch 64 the eager loop took 28 of the `small` model's
#: 76 ms training step on an H100: docs/training.md). All three give the same indices;
#: ``HEART_FPS_TRITON=0`` turns the kernel off, ``HEART_FPS_CUDA_GRAPH=0`` the graph.
FPS_TRITON_ENV = "HEART_FPS_TRITON"
FPS_CUDA_GRAPH_ENV = "HEART_FPS_CUDA_GRAPH"
_FPS_GRAPH_CACHE_SIZE = 8  # input shapes kept (training has one or two; inference one per case size)
_fps_graphs: dict = {}


def farthest_point_indices(points: torch.Tensor, m: int, kernel: bool = True) -> torch.Tensor:
    """Indices ``(B, m)`` of farthest-point samples of ``points`` ``(B, N, 3)``.

    Deterministic and independent of the input order (up to exact ties): the first sample is the
    point farthest from the centroid, each next one the point farthest from those chosen. On CUDA
    the loop runs as one Triton kernel (``kernel``, see :func:`fps_triton_usable`) or a captured
    CUDA graph. The model asks for the kernel in training only: it saves ~5 ms per call, while a
    completion process, which samples once or twice, would pay 0.3-0.7 s to import Triton and then
    the kernel's compilation. Never compiled: under
    ``torch.compile`` of the whole model it runs eagerly between two graphs (tracing it would
    unroll the loop over the ``m`` samples). The exclusion is asked for only while compiling, not
    with a decorator: ``torch.compiler.disable`` imports torch's compiler, about 3 s that every
    completion process would pay for nothing (``Testing/test_complete_cli.py`` checks it stays out).
    """
    if torch.compiler.is_compiling():  # False in eager mode, without importing anything
        return torch.compiler.disable(_farthest_point_indices)(points, m, kernel)
    return _farthest_point_indices(points, m, kernel)


@torch.no_grad()
def _farthest_point_indices(points: torch.Tensor, m: int, kernel: bool = True) -> torch.Tensor:
    b, n, _ = points.shape
    if m > n:
        raise ValueError(f"farthest-point sampling needs at least {m} input points (num_latents), got {n}")
    if kernel and points.is_cuda and fps_triton_usable(n, points.device):
        return _farthest_point_indices_kernel(points, m)
    if points.is_cuda and fps_cuda_graph_enabled() and not torch.cuda.is_current_stream_capturing():
        return _farthest_point_indices_graphed(points, m)
    return _farthest_point_indices_eager(points, m)


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def fps_cuda_graph_enabled() -> bool:
    """False when ``HEART_FPS_CUDA_GRAPH`` is 0 / false / no / off (default: on)."""
    return _env_on(FPS_CUDA_GRAPH_ENV)


#: Most points per row the Triton kernel keeps in registers (a power of two); here, not in the
#: kernel's module, so that asking imports no Triton.
FPS_KERNEL_MAX_POINTS = 8192


def fps_triton_usable(n: int, device=None) -> bool:
    """Whether CUDA farthest-point sampling of rows of ``n`` points on ``device`` (default: the
    current CUDA device) can run as the Triton kernel.

    Yes when ``HEART_FPS_TRITON`` is not 0 / false / no / off, ``n`` is at most the kernel's
    register budget, Triton is installed (found, not imported) and the GPU is one Triton compiles
    for (compute capability 7.0 or newer, as torch's own compiler requires).
    """
    return (n <= FPS_KERNEL_MAX_POINTS and _env_on(FPS_TRITON_ENV) and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability(device) >= (7, 0))


def _farthest_from_centroid(points: torch.Tensor) -> torch.Tensor:
    """The first sample of each row (B,): its point farthest from the row's centroid (float32 points)."""
    return (points - points.mean(dim=1, keepdim=True)).square().sum(-1).argmax(dim=1)


def _farthest_point_indices_kernel(points: torch.Tensor, m: int) -> torch.Tensor:
    """The Triton kernel's indices, from the eager loop's own first samples (imports Triton)."""
    from HeartCompletionLib.model.fps_kernel import farthest_point_indices_triton

    points = points.detach().float().contiguous()
    return farthest_point_indices_triton(points, _farthest_from_centroid(points), m)


def _farthest_point_indices_eager(points: torch.Tensor, m: int) -> torch.Tensor:
    points = points.float()
    b, n, _ = points.shape
    out = torch.empty(b, m, dtype=torch.long, device=points.device)
    rows = torch.arange(b, device=points.device)
    far = _farthest_from_centroid(points)
    min_dist = torch.full((b, n), float("inf"), device=points.device)
    for i in range(m):
        out[:, i] = far
        d = (points - points[rows, far][:, None, :]).square().sum(-1)
        min_dist = torch.minimum(min_dist, d)
        far = min_dist.argmax(dim=1)
    return out


def _farthest_point_indices_graphed(points: torch.Tensor, m: int) -> torch.Tensor:
    key = (points.device, tuple(points.shape), m)
    entry = _fps_graphs.pop(key, None)
    if entry is None:
        while len(_fps_graphs) >= _FPS_GRAPH_CACHE_SIZE:
            _fps_graphs.pop(next(iter(_fps_graphs)))
        static_in = torch.zeros(points.shape, dtype=torch.float32, device=points.device)
        static_in.copy_(points)
        with torch.autocast("cuda", enabled=False):
            side = torch.cuda.Stream(points.device)  # warm-up on a side stream, as capture requires
            side.wait_stream(torch.cuda.current_stream(points.device))
            with torch.cuda.stream(side):
                _farthest_point_indices_eager(static_in, m)
            torch.cuda.current_stream(points.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # loader threads may pin memory
                static_out = _farthest_point_indices_eager(static_in, m)
        entry = (graph, static_in, static_out)
    _fps_graphs[key] = entry  # most recently used last
    graph, static_in, static_out = entry
    static_in.copy_(points)
    graph.replay()
    return static_out.clone()


class HeartVecSet(nn.Module):
    """VecSet autoencoder over K cardiac structures (see the module docstring for the layout).

    Inputs are float tensors in network units: ``points_n`` (B, N, 3), ``onehot`` (B, N, K),
    optional ``normals`` (B, N, 3) (unit, outward; used only when ``config.use_normals``),
    ``queries_n`` (B, Q, 3). Output signed distances are (B, Q, K) float32 in network units,
    negative inside. In eval mode the output is deterministic, independent of the batch it runs
    in and of the order of the input points.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.fourier = FourierEmbedding(config.num_frequencies, config.include_input)
        self.point_embed = nn.Linear(config.point_feature_dim, w)
        if config.latent_queries == "learned":
            self.latent_queries = nn.Parameter(torch.empty(config.num_latents, w))
        qk = config.qk_norm
        self.encoder = Block(w, config.heads, config.mlp_ratio, cross=True, qk_norm=qk)
        self.bottleneck = Bottleneck(config.bottleneck, w, config.latent_dim)
        self.trunk = nn.ModuleList(Block(w, config.heads, config.mlp_ratio, qk_norm=qk) for _ in range(config.depth))
        self.query_embed = nn.Linear(config.fourier_dim, w)
        self.decoder = Block(w, config.decoder_heads, config.mlp_ratio, cross=True, qk_norm=qk)
        self.decoder_norm = nn.LayerNorm(w)
        self.to_sdf = nn.Linear(w, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if self.config.latent_queries == "learned":
            nn.init.trunc_normal_(self.latent_queries, std=0.02)
        # zero output layer: first prediction 0, first L1 loss = mean |target| (trainer checks it)
        nn.init.zeros_(self.to_sdf.weight)
        nn.init.zeros_(self.to_sdf.bias)

    # --- checks -------------------------------------------------------------------------
    def _check_inputs(self, points_n, onehot, normals) -> None:
        k = self.config.num_classes
        if points_n.ndim != 3 or points_n.shape[-1] != 3:
            raise ValueError(f"points_n must be (B, N, 3), got {tuple(points_n.shape)}")
        if onehot.shape != (*points_n.shape[:2], k):
            raise ValueError(
                f"onehot must be (B, N, K) = {(*points_n.shape[:2], k)} for K = {k} structures, got {tuple(onehot.shape)}"
            )
        if self.config.use_normals:
            if normals is None:
                raise ValueError("this model was configured with use_normals=True: pass normals (B, N, 3)")
            if normals.shape != points_n.shape:
                raise ValueError(f"normals must be {tuple(points_n.shape)}, got {tuple(normals.shape)}")

    # --- the three entry points --------------------------------------------------------------
    def encode(
        self, points_n: torch.Tensor, onehot: torch.Tensor, normals: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input surface points -> ``(latents (B, M, width), kl scalar float32)``.

        ``latents`` have been through the bottleneck and the self-attention trunk; pass them to
        :meth:`decode` as often as needed.
        """
        self._check_inputs(points_n, onehot, normals)
        parts = [self.fourier(points_n), onehot.to(torch.float32)]
        if self.config.use_normals:
            parts.append(normals.to(torch.float32))
        tokens = self.point_embed(torch.cat(parts, dim=-1))  # (B, N, W)
        if self.config.latent_queries == "learned":
            queries = self.latent_queries.expand(points_n.shape[0], -1, -1)
        else:
            idx = farthest_point_indices(points_n, self.config.num_latents, kernel=self.training)
            queries = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        latents = self.encoder(queries, tokens)
        latents, kl = self.bottleneck(latents)
        for block in self.trunk:
            latents = block(latents)
        return latents, kl

    def decode(
        self, latents: torch.Tensor, queries_n: torch.Tensor, chunk_size: int | None = DEFAULT_DECODE_CHUNK
    ) -> torch.Tensor:
        """Signed distances ``(B, Q, K)`` float32 (network units, negative inside) at ``queries_n``.

        Queries are independent of each other, so they are decoded ``chunk_size`` at a time
        (``None``: all at once) to bound memory; the result does not depend on the chunk size.
        """
        if queries_n.ndim != 3 or queries_n.shape[-1] != 3 or queries_n.shape[0] != latents.shape[0]:
            raise ValueError(f"queries_n must be (B={latents.shape[0]}, Q, 3), got {tuple(queries_n.shape)}")
        q = queries_n.shape[1]
        if chunk_size is None or q <= chunk_size:
            return self._decode_chunk(latents, queries_n)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of queries or None, got {chunk_size}")
        parts = [self._decode_chunk(latents, queries_n[:, i : i + chunk_size]) for i in range(0, q, chunk_size)]
        return torch.cat(parts, dim=1)

    def _decode_chunk(self, latents: torch.Tensor, queries_n: torch.Tensor) -> torch.Tensor:
        x = self.query_embed(self.fourier(queries_n))
        x = self.decoder(x, latents)
        return self.to_sdf(self.decoder_norm(x)).float()

    def forward(
        self,
        points_n: torch.Tensor,
        onehot: torch.Tensor,
        queries_n: torch.Tensor,
        normals: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"sdf": (B, Q, K) float32 network units, "kl": scalar float32}`` (training entry)."""
        latents, kl = self.encode(points_n, onehot, normals)
        return {"sdf": self.decode(latents, queries_n, chunk_size=chunk_size), "kl": kl}
