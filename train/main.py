"""Command line: ``sea-train`` (or ``python -m sea_jax.train.main``).

    sea-train                                     # the tiny CPU preset (configs/tiny.yaml)
    sea-train --preset tiny --model.attention sparsek
    sea-train --preset gpu_135m_4k --model.attention sea
    sea-train --preset tiny --resume              # continue from the latest checkpoint
    sea-train --preset pod_v5p --compile-only --topology v5p:4x4x4

``--preset`` (alias ``--config``) takes a preset name (``sea_jax.configs``: tiny, gpu_135m_4k,
gpu_135m_16k, gpu_135m_32k, pod_v5p, ...) or a YAML path. Every other setting is a
dotted override of the config (``--optim.lr 1e-3``, ``--train.steps=50``); ``--help`` lists
them. Unknown keys and bad values exit with an error naming the key.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sea_jax.train.config import Config, ConfigError, parse_config, preset_names

DEFAULT_PRESET = "tiny"


def _mode_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sea-train",
        description="Train or evaluate a sea_jax language model (dotted --section.key overrides follow).",
        allow_abbrev=False,
        add_help=False,
    )
    parser.add_argument(
        "--preset", "--config", "-c", dest="config", default=None,
        help=f"preset name ({', '.join(preset_names())}) or a YAML path (default: {DEFAULT_PRESET})",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (checkpoint.resume)")
    parser.add_argument("--compile-only", action="store_true", help="compile the train step for --topology and exit")
    parser.add_argument("--topology", default=None, help="TPU topology for --compile-only, e.g. v5p:4x4x4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help", "-h", action="store_true")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[Config, argparse.Namespace]:
    """(config, mode flags) from a command line."""
    modes, rest = _mode_parser().parse_known_args(list(argv))
    overrides = list(rest)
    if modes.resume:
        overrides.append("--checkpoint.resume=true")
    if modes.compile_only:
        overrides.append("--compile_only=true")
    if modes.topology:
        overrides.append(f"--topology={modes.topology}")
    preset = modes.config or DEFAULT_PRESET
    return parse_config(overrides, preset=preset), modes


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    modes, _ = _mode_parser().parse_known_args(argv)
    if modes.help:
        _mode_parser().print_help()
        print("\nconfig overrides (--section.key value):")
        import draccus

        try:
            draccus.parse(Config, args=["--help"])
        except SystemExit:
            pass
        return 0
    try:
        cfg, modes = parse_args(argv)
    except ConfigError as e:
        print(f"sea-train: config error: {e}", file=sys.stderr)
        return 2
    if modes.print_config:
        from sea_jax.train.config import describe

        print(describe(cfg))
        return 0
    try:
        if cfg.compile_only:
            from sea_jax.train.aot import compile_for_topology

            compile_for_topology(cfg)
        else:
            from sea_jax.train.loop import train

            train(cfg)
    except ConfigError as e:
        print(f"sea-train: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
