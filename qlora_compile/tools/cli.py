"""`qlora-compile`: the command line.

    qlora-compile demo [--out DIR] [--tokens N]   the main job on SmolLM2-135M (offline)
    qlora-compile info                             versions and which kernels this machine uses

Exit codes: 0 success, 2 bad input (one-line message on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console


def _info(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..kernels import native

    console = Console()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    console.print(f"qlora-compile {__version__}, torch {torch.__version__}, triton {triton_version}")
    console.print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    console.print(f"CPU kernel: {'native (built and loaded)' if native.available() else 'vectorized torch'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(args.out, tokens=args.tokens, window=args.window)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-compile", description="QLoRA as a compiler pipeline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize SmolLM2-135M and compare NF4/FP4 with 16-bit (offline)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    demo.add_argument("--tokens", type=int, default=4096, help="Bible tokens for perplexity (default: 4096)")
    demo.add_argument("--window", type=int, default=512, help="tokens per perplexity window (default: 512)")
    demo.set_defaults(run=_demo)
    info = sub.add_parser("info", help="versions, and which kernels this machine uses")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"qlora-compile {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
