"""`qlora-compile`: the command line.

    qlora-compile demo [--out DIR] [--tokens N]   the main job on SmolLM2-135M (offline)
    qlora-compile info                             versions and which kernels this machine uses
    qlora-compile convert SRC DST [options]        HF safetensors folder -> bitsandbytes 4-bit folder

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


def _convert(args: argparse.Namespace) -> int:
    from ..checkpoint import convert_checkpoint

    result = convert_checkpoint(
        args.src,
        args.dst,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        skip=args.skip,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        progress=not args.no_progress,
    )
    print(result.summary(), file=sys.stderr)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF safetensors folder -> bitsandbytes 4-bit folder (streaming)")
    p.add_argument("src", type=Path, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("dst", type=Path, help="output folder (written as DST.partial, renamed at the end)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument(
        "--skip", nargs="+", default=None, metavar="PATTERN", help="modules kept dense, besides the defaults"
    )
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard (default: 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf in tensors that stay dense")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)


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
    _add_convert(sub)
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
