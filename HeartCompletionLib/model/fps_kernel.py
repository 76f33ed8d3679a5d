"""Farthest-point sampling as one Triton kernel: the whole loop of ``m`` steps in one launch.

The eager loop (:func:`HeartCompletionLib.model.vecset._farthest_point_indices_eager`) runs about
seven small kernels for each of its ``m`` sequential steps; even replayed as a CUDA graph that is
~1,800 launches of a few microseconds each, 5.7 ms of the `small` model's 27 ms training step at
batch 64 on an H100 (docs/training.md). Here one program per batch row keeps its points and their
running distances in registers and loops over the ``m`` steps itself.

It computes what the eager loop computes, in the same order and rounding: the first index is the
eager loop's own (the caller passes it), each distance is ``dx*dx + dy*dy + dz*dz`` summed left to right
without fused multiply-adds (``enable_fp_fusion=False``), and ``tl.argmax`` takes the first of
equal maxima as ``torch.argmax`` does. ``benchmarks/fps_speed.py`` checks the indices against the
eager loop on the GPU; ``Testing/test_fps_kernel.py`` runs the kernel through Triton's interpreter
on the CPU (``TRITON_INTERPRET=1``) where Triton is installed.

Imported only when a CUDA farthest-point sampling asks for it, so that completion on the CPU never
imports Triton. Rows of more than ``vecset.FPS_KERNEL_MAX_POINTS`` points use the CUDA graph
instead (their registers would spill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fps_kernel(points_ptr, first_ptr, out_ptr, n, m, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    base = points_ptr + row.to(tl.int64) * n * 3
    x = tl.load(base + offs * 3, mask=valid, other=0.0)
    y = tl.load(base + offs * 3 + 1, mask=valid, other=0.0)
    z = tl.load(base + offs * 3 + 2, mask=valid, other=0.0)
    # padding lanes start at -inf and stay there: never the farthest
    min_dist = tl.where(valid, float("inf"), float("-inf"))
    far = tl.load(first_ptr + row).to(tl.int32)
    out = out_ptr + row.to(tl.int64) * m
    for i in range(m):
        tl.store(out + i, far.to(tl.int64))
        dx = x - tl.load(base + far * 3)
        dy = y - tl.load(base + far * 3 + 1)
        dz = z - tl.load(base + far * 3 + 2)
        min_dist = tl.minimum(min_dist, dx * dx + dy * dy + dz * dz)
        far = tl.argmax(min_dist, axis=0).to(tl.int32)


def farthest_point_indices_triton(points: torch.Tensor, first: torch.Tensor, m: int) -> torch.Tensor:
    """Indices ``(B, m)`` (int64) of farthest-point samples of ``points`` ``(B, N, 3)`` (contiguous
    float32), starting from ``first`` ``(B,)``.

    The caller (:func:`HeartCompletionLib.model.vecset.farthest_point_indices`) passes the eager
    loop's own first indices (so their bits and ties are the same), checks ``m <= N`` and keeps
    ``N`` within ``vecset.FPS_KERNEL_MAX_POINTS``: more still runs, with registers spilled.
    """
    b, n, _ = points.shape
    out = torch.empty(b, m, dtype=torch.long, device=points.device)
    block = max(triton.next_power_of_2(n), 16)
    _fps_kernel[(b,)](points, first, out, n, m, BLOCK=block, num_warps=min(16, max(4, block // 512)),
                      enable_fp_fusion=False)
    return out
