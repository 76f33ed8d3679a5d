"""Farthest-point sampling of the latent queries: the eager loop against its CUDA graph and its Triton kernel.

Checks that all give the same indices (exit 1 if not) and prints the time of each, for the
training batch shapes (batch 64, 2,048 input points, 256 latents for `small`, 512 for `base`) and
one inference-sized case. The Triton kernel is timed where it applies (Triton installed, at most
``FPS_KERNEL_MAX_POINTS`` points per row). ``benchmarks/gpu_check.sh`` runs it first and turns
both off (``HEART_FPS_TRITON=0 HEART_FPS_CUDA_GRAPH=0``) if it fails on the machine.

    python benchmarks/fps_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from HeartCompletionLib.model.vecset import (
    _farthest_point_indices_eager,
    _farthest_point_indices_graphed,
    _farthest_point_indices_kernel,
    farthest_point_indices,
    fps_triton_usable,
)


def timed(fn, *args, repeats: int = 5) -> float:
    fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N")
    parser.add_argument("--shapes", nargs="+", default=["64x2048x256", "64x2048x512", "1x8192x512", "1x20000x256"],
                        help="BxNxM shapes to check (default: 64x2048x256 64x2048x512 1x8192x512 1x20000x256)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error(f"CUDA is not available here (torch {torch.__version__}): the graph is CUDA only")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; command: python benchmarks/fps_speed.py "
          + " ".join(sys.argv[1:] if argv is None else argv))
    ok = True
    g = torch.Generator(device="cpu").manual_seed(0)
    for shape in args.shapes:
        b, n, m = (int(v) for v in shape.split("x"))
        points = torch.rand(b, n, 3, generator=g).to(args.device)
        eager = _farthest_point_indices_eager(points, m)
        graphed = _farthest_point_indices_graphed(points, m)
        again = _farthest_point_indices_graphed(points.flip(0).contiguous(), m).flip(0)  # new data, same graph
        same = torch.equal(eager, graphed) and torch.equal(eager, again)
        t_eager = timed(_farthest_point_indices_eager, points, m)
        t_graph = timed(_farthest_point_indices_graphed, points, m)
        line = (f"B {b} N {n} M {m}: eager {t_eager * 1e3:.2f} ms, CUDA graph {t_graph * 1e3:.2f} ms "
                f"({t_eager / t_graph:.1f}x)")
        if fps_triton_usable(n):
            kernel = _farthest_point_indices_kernel(points, m)
            used = farthest_point_indices(points.flip(0).contiguous(), m).flip(0)  # what the model calls
            for name, got in (("Triton kernel", kernel), ("farthest_point_indices", used)):
                if not torch.equal(eager, got):
                    line += f"; {name} DIFFERS (first at sample {int((eager != got).any(0).nonzero()[0])})"
                    same = False
            t_kernel = timed(_farthest_point_indices_kernel, points, m)
            line += f", Triton kernel {t_kernel * 1e3:.2f} ms ({t_eager / t_kernel:.1f}x)"
        ok &= same
        print(f"{line}; same indices: {same}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
