"""`qlora-compile`: the command line.

    qlora-compile demo [--out DIR] [--tokens N]   the main job on SmolLM2-135M (offline)
    qlora-compile info                             versions and which kernels this machine uses
    qlora-compile export merged|nf4|onnx --base DIR [--adapter DIR] --out PATH
                                                   merged 16-bit folder, NF4 folder, ONNX graph

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


def _export(args: argparse.Namespace) -> int:
    from .. import export

    quant = dict(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    if args.format == "merged":
        out = export.export_merged(args.base, args.adapter, args.out, dtype=args.dtype, **quant)
    elif args.format == "nf4":
        out, layers = export.export_nf4(args.base, args.adapter, args.out, dtype=args.dtype, **quant)
        if layers:
            print(export.format_report(layers))
    else:
        out = export.export_onnx(args.base, args.adapter, args.out, merge=args.merge, **quant)
    print(f"wrote {out}")
    return 0


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export", help="merged 16-bit / NF4 folders or ONNX from a base and a LoRA adapter"
    )
    formats = export.add_subparsers(dest="format", required=True)
    helps = {
        "merged": "merge the adapter onto the dequantized 4-bit base: a plain 16-bit HF folder",
        "nf4": "merge, then re-quantize: a bitsandbytes 4-bit HF folder (prints |dW| / |requant error|)",
        "onnx": "an ONNX graph with com.microsoft.MatMulBnb4 for every 4-bit linear",
    }
    for name, text in helps.items():
        p = formats.add_parser(name, help=text)
        p.add_argument(
            "--base", type=Path, required=True, help="16-bit HF folder or bitsandbytes 4-bit folder"
        )
        p.add_argument(
            "--adapter", type=Path, required=name != "onnx", help="PEFT-format LoRA adapter folder"
        )
        p.add_argument(
            "--out", type=Path, required=True, help="output folder" + (" (.onnx file)" * (name == "onnx"))
        )
        if name == "onnx":
            p.add_argument(
                "--merge", action="store_true", help="merge the adapter and re-quantize (no LoRA branch)"
            )
        else:
            p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                           help="dtype of the written weights (default: the base's)")  # fmt: skip
        p.add_argument(
            "--quant-type", default="nf4", choices=["nf4", "fp4"], help="for a 16-bit base (default: nf4)"
        )
        p.add_argument("--blocksize", type=int, default=64, help="for a 16-bit base (default: 64)")
        p.add_argument("--no-double-quant", action="store_true", help="for a 16-bit base: plain fp32 absmax")
        p.set_defaults(run=_export)


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
    _add_export(sub)
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
