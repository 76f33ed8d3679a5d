"""Print the shapes and parameter counts of the named model configs (:mod:`.configs`)::

    python -m HeartCompletionLib.model.configs_cli --num_classes 10
"""

from __future__ import annotations

import argparse

from HeartCompletionLib.errors import ExitCode

from .configs import CONFIG_NAMES, count_parameters, get_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m HeartCompletionLib.model.configs_cli",
        description="Print the shapes and parameter counts of the named HeartVecSet configs.",
    )
    parser.add_argument("--num_classes", type=int, default=10, help="K, structures in the table (default 10)")
    parser.add_argument("--names", nargs="+", default=list(CONFIG_NAMES), choices=CONFIG_NAMES, help="configs to print")
    args = parser.parse_args(argv)

    from .vecset import HeartVecSet  # torch only when actually counting

    print(f"{'config':<7} {'params':>12}  M x width, depth, heads, latent_dim")
    for name in args.names:
        cfg = get_config(name, args.num_classes)
        n = count_parameters(HeartVecSet(cfg))
        print(f"{name:<7} {n:>12,d}  {cfg.num_latents} x {cfg.width}, {cfg.depth}, {cfg.heads}, {cfg.latent_dim}")
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
