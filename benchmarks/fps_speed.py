"""Farthest-point sampling of the latent queries: the eager loop against its captured CUDA graph.

Checks that both give the same indices (exit 1 if not) and prints the time of each, for the
training batch shapes of the study (batch 64, 2,048 input points, 256 latents) and a second shape.
``benchmarks/gpu_check.sh`` runs it first and turns the graph off (``HEART_FPS_CUDA_GRAPH=0``) if it
fails on the machine.

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
    farthest_point_indices,
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
    parser.add_argument("--shapes", nargs="+", default=["64x2048x256", "1x20000x256"],
                        help="BxNxM shapes to check (default: 64x2048x256 1x20000x256)")
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
        again = farthest_point_indices(points.flip(0).contiguous(), m).flip(0)  # new data, same graph
        same = torch.equal(eager, graphed) and torch.equal(eager, again)
        ok &= same
        t_eager = timed(_farthest_point_indices_eager, points, m)
        t_graph = timed(_farthest_point_indices_graphed, points, m)
        print(f"B {b} N {n} M {m}: eager {t_eager * 1e3:.2f} ms, CUDA graph {t_graph * 1e3:.2f} ms "
              f"({t_eager / t_graph:.1f}x); same indices: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
