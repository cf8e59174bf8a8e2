"""`qlora-compile`: the command line.

    qlora-compile train [CONFIG.yaml] [--key value ...] [--resume latest|PATH]
                                                   QLoRA fine-tuning on your model folder and data files
    qlora-compile demo [--out DIR] [--key value ...]  `train` with a packaged config: SmolLM2-135M on
                                                   chatterbot-corpus (offline, CPU), answers before and after
    qlora-compile info                             versions and which kernels this machine uses
    qlora-compile inspect MODEL_DIR [--json] [--html OUT.html]   what compile does, without weights
    qlora-compile plan MODEL_DIR|CONFIG_JSON --gpu-memory 48GB   predicted training memory
    qlora-compile convert SRC DST [options]        HF safetensors folder -> bitsandbytes 4-bit folder
    qlora-compile export merged|nf4|onnx --base DIR [--adapter DIR] --out PATH
                                                   merged 16-bit folder, NF4 folder, ONNX graph

Exit codes: 0 success; 2 bad input (a `qlora_compile.errors.QLoRAError`: one line on stderr, the
traceback too with -v); 1 anything else (a bug, or the machine: the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from ..checkpoint.output_folder import DEFAULT_MAX_SHARD_SIZE
from ..dtypes import FLOAT_DTYPES, parse_dtype
from ..errors import InvalidArgumentError, QLoRAError
from ..units import parse_size

# Modules of the optional extras (pyproject.toml), by the extra that installs them.
_EXTRAS = {"rich": "cli", "onnx": "onnx", "onnx_ir": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
           "yaml": "train", "datasets": "train", "matplotlib": "train", "gguf": "demo",
           "tensorboard": "tensorboard"}  # fmt: skip


def _console():
    """A rich console: the terminal's width, or 120 columns when the output is piped."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def _info(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..kernels import native

    console = _console()
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

    summary = demo.run(
        args.out, args.overrides, eval_pairs=args.eval_pairs, max_new_tokens=args.max_new_tokens
    )
    return summary.get("exit_code", 0)


def _train_summary(r: dict) -> str:
    """One line: steps, speed, and the losses before and after (those that exist)."""
    parts = [f"trained to step {r['steps']} in {r['train_seconds']:.1f} s"]
    if r["tokens_per_s"]:
        parts[0] += f" ({r['tokens_per_s']:.0f} tokens/s)"
    for name, first, last in (
        ("loss", "loss_first", "loss_last"),
        ("eval loss", "eval_loss_before", "eval_loss_after"),
    ):
        if r[first] is not None and r[last] is not None:
            parts.append(f"{name} {r[first]:.4f} -> {r[last]:.4f}")
    return ", ".join(parts) + f"; adapter: {r['adapter']}"


def _train(args: argparse.Namespace) -> int:
    from ..train import load_config, train

    rest = list(args.rest)
    path = rest.pop(0) if rest and not rest[0].startswith("-") else None
    resume, progress, overrides = None, True, []
    while rest:
        arg = rest.pop(0)
        if arg == "--resume" or arg.startswith("--resume="):
            resume = arg.partition("=")[2] or (rest.pop(0) if rest else "")
            if not resume:
                raise InvalidArgumentError("--resume needs 'latest' or a checkpoint folder")
        elif arg == "--no-progress":
            progress = False
        else:
            overrides.append(arg)
    result = train(load_config(path, overrides), resume=resume, progress=progress)
    r = result.report
    if not r:  # a rank other than 0 under torchrun: rank 0 reports
        return result.exit_code
    if result.stopped_by is not None:
        print(f"stopped by {r['stopped_by_signal']} after step {r['steps']}: checkpoint saved in "
              f"{result.output_dir}; continue with --resume latest", file=sys.stderr)  # fmt: skip
    else:
        print(_train_summary(r))
    return result.exit_code


def _inspect(args: argparse.Namespace) -> int:
    import json

    from ..inspect import inspect_model
    from .inspect_view import print_rich, render_html

    layers = None if args.layers == "all" else _positive_int(args.layers, "--layers")
    result = inspect_model(args.model, layers=layers, seq_len=args.seq_len, dtype=args.dtype)
    if args.html:
        Path(args.html).write_text(render_html(result), encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_rich(result, _console())
        if args.html:
            print(f"wrote {args.html}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..plan import plan_memory

    plan = plan_memory(
        args.model, gpu_memory=parse_size(args.gpu_memory, "--gpu-memory"), seq_len=args.seq_len,
        batch_size=args.batch_size, r=args.r, optim_bits=args.optim_bits,
        gradient_checkpointing=args.gradient_checkpointing,
        optim_budget=None if args.optim_budget is None else parse_size(args.optim_budget, "--optim-budget"),
        paged=not args.no_paged, dtype=args.dtype, world_size=args.world_size, cpu_offload=args.cpu_offload,
        fp32_residual=args.fp32_residual, activation_memory_budget=args.activation_memory_budget,
        lora_compute_dtype=None if args.lora_compute_dtype is None else parse_dtype(args.lora_compute_dtype, "--lora-compute-dtype"),
    )  # fmt: skip
    if args.json:
        import json

        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    console = _console()
    s = plan.settings
    table = Table(
        title=f"{plan.model}: batch {s['batch_size']} x {s['seq_len']} tokens, r={s['r']}, {s['optim_bits']}-bit "
        f"optimizer{' (paged)' if s['paged'] else ''}, {s['dtype']} weights before compile"
        + (
            f"; per rank of {s['world_size']}{' (cpu_offload)' if s['cpu_offload'] else ''}"
            if s["world_size"] > 1
            else ""
        )
    )
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("GB", justify="right")
    table.add_column("share", justify="right")
    table.add_column("note")
    for t in plan.terms:
        table.add_row(
            t.name, f"{t.bytes / 2**30:.2f}", f"{t.bytes / 1e9:.2f}", f"{t.bytes / plan.total:.1%}", t.note
        )
    table.add_row(
        "total on the device",
        f"{plan.total / 2**30:.2f}",
        f"{plan.total / 1e9:.2f}",
        "100%",
        "",
        style="bold",
    )
    console.print(table)
    console.print(
        f"persistent (parameters + buffers, exact): {plan.persistent_bytes / 2**30:.2f} GiB; "
        f"host ({'offloaded' if s['cpu_offload'] else 'paged optimizer states'}): {plan.host_bytes / 2**30:.2f} GiB; "
        f"{'; '.join(plan.notes)}"
    )
    verdict = "fits" if plan.fits else "does NOT fit"
    largest = plan.largest
    console.print(
        f"[bold]Verdict: {verdict}[/bold] in {plan.gpu_memory / 2**30:.2f} GiB ({plan.gpu_memory / 1e9:.2f} GB): "
        f"{plan.total / 2**30:.2f} GiB predicted, {abs(plan.gpu_memory - plan.total) / 2**30:.2f} GiB "
        f"{'to spare' if plan.fits else 'over'}; largest term: {largest.name} ({largest.bytes / 2**30:.2f} GiB, "
        f"{largest.bytes / plan.total:.0%})"
    )
    return 0


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidArgumentError(f"{flag} must be a positive integer or 'all', got {text!r}")
    return value


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
    p.add_argument("--compute-dtype", choices=tuple(FLOAT_DTYPES), default="bfloat16")
    p.add_argument(
        "--skip", nargs="+", default=None, metavar="PATTERN", help="modules kept dense, besides the defaults"
    )
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help=f"largest output shard (default: {DEFAULT_MAX_SHARD_SIZE})")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf in tensors that stay dense")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)


def _export(args: argparse.Namespace) -> int:
    from .. import export

    quant = dict(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    if args.format != "onnx":
        folder = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, progress=not args.no_progress)
    if args.format == "merged":
        out = export.export_merged(args.base, args.adapter, args.out, **folder, **quant)
    elif args.format == "nf4":
        out, layers = export.export_nf4(args.base, args.adapter, args.out, **folder, **quant)
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
            p.add_argument("--dtype", default="auto", choices=["auto", *FLOAT_DTYPES],
                           help="dtype of the written weights (default: the base's)")  # fmt: skip
            p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                           help=f"largest output shard (default: {DEFAULT_MAX_SHARD_SIZE})")  # fmt: skip
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument(
            "--quant-type", default="nf4", choices=["nf4", "fp4"], help="for a 16-bit base (default: nf4)"
        )
        p.add_argument("--blocksize", type=int, default=64, help="for a 16-bit base (default: 64)")
        p.add_argument("--no-double-quant", action="store_true", help="for a 16-bit base: plain fp32 absmax")
        p.set_defaults(run=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-compile", description="QLoRA as a compiler pipeline.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details; tracebacks for every error"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="qlora-compile train with a packaged config: SmolLM2-135M on chatterbot-corpus (offline)",
        usage="qlora-compile demo [--out DIR] [--eval-pairs N] [--max-new-tokens N] [--key value ...]",
        description="Every other --key value is a `qlora-compile train` config field, over the packaged config "
        "(qlora_compile/tools/demo.yaml): --max_steps 8, --qlora.r 8. See README.md, 'demo'.",
        allow_abbrev=False,
    )  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    demo.add_argument("--eval-pairs", type=int, default=16, help="held-out pairs (default: 16)")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens per answer (default: 24)")
    demo.set_defaults(run=_demo)
    train = sub.add_parser(
        "train", help="QLoRA fine-tuning on your model folder and data files (YAML config and/or --key value)",
        usage="qlora-compile train [CONFIG.yaml] [--key value ...] [--resume latest|PATH] [--no-progress]",
        description="Every config field is a --key value option (dotted for QLoRAConfig fields: --qlora.r 16); "
        "values are read as YAML scalars. See README.md, 'qlora-compile train'.",
    )  # fmt: skip
    train.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    train.set_defaults(run=_train)
    info = sub.add_parser("info", help="versions, and which kernels this machine uses")
    info.set_defaults(run=_info)
    insp = sub.add_parser(
        "inspect", help="what compile does to a model (rewrites, graphs, passes), without weights"
    )
    insp.add_argument("model", type=Path, help="a model folder with config.json, or a config.json")
    insp.add_argument("--json", action="store_true", help="print the result as JSON (schema_version 1)")
    insp.add_argument("--html", type=Path, help="write a self-contained HTML page drawing the graphs")
    insp.add_argument(
        "--layers", default="2", help="decoder layers in the traced copy, or 'all' (default: 2)"
    )
    insp.add_argument("--seq-len", type=int, default=16, help="tokens in the traced input (default: 16)")
    insp.add_argument(
        "--dtype",
        default="auto",
        help="dense weights' dtype: auto (the config's), float32, float16, bfloat16",
    )
    insp.set_defaults(run=_inspect)
    plan = sub.add_parser("plan", help="predicted GPU memory of QLoRA training, from the config alone")
    plan.add_argument("model", type=Path, help="a model folder with config.json, or a config.json")
    plan.add_argument(
        "--gpu-memory", required=True, help="the device's memory, e.g. 48GB (10^9) or 48GiB (2^30)"
    )
    plan.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    plan.add_argument("--batch-size", type=int, default=1, help="sequences per step (default: 1)")
    plan.add_argument("--r", type=int, default=64, help="LoRA rank (default: 64)")
    plan.add_argument(
        "--optim-bits", type=int, default=32, choices=(32, 8), help="optimizer state bits (default: 32)"
    )
    plan.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
        help="plan with gradient checkpointing, as compile() trains by default (--no-gradient-checkpointing: without)",
    )  # fmt: skip
    plan.add_argument(
        "--optim-budget", help="device memory for paged optimizer states (default: 10%% of the paged states)"
    )
    plan.add_argument("--no-paged", action="store_true", help="keep all optimizer states on the device")
    plan.add_argument("--json", action="store_true", help="machine-readable output (schema: Plan.to_dict)")
    plan.add_argument(
        "--dtype",
        default="bfloat16",
        help="dense weights' dtype before compile: bfloat16 (default), float16, float32, auto",
    )
    plan.add_argument(
        "--fp32-residual", action=argparse.BooleanOptionalAction, default=True,
        help="fp32 norms make the residual stream fp32, as compile() does by default (--no-fp32-residual: bf16)",
    )  # fmt: skip
    plan.add_argument(
        "--lora-compute-dtype", help="dtype of the LoRA products (default: fp32, the adapters')"
    )
    plan.add_argument(
        "--activation-memory-budget", type=float,
        help="recompute by AOTAutograd's partitioner within this fraction instead of checkpointing (QLoRAConfig's)",
    )  # fmt: skip
    plan.add_argument(
        "--world-size", type=int, default=1,
        help="ranks of a sharded (FSDP2) run: the plan is per rank, --batch-size per rank (default: 1)",
    )  # fmt: skip
    plan.add_argument(
        "--cpu-offload", action="store_true",
        help="with --world-size: sharded parameters, gradients and optimizer states in host memory",
    )  # fmt: skip
    plan.set_defaults(run=_plan)
    _add_convert(sub)
    _add_export(sub)
    return parser


def _split_train(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`train`'s own arguments are config keys, unknown to argparse: (what argparse parses, train's
    arguments), or (argv, None) for every other command and for `train -h`."""
    i = 0
    while i < len(argv) and argv[i] in ("-v", "--verbose"):
        i += 1
    if i < len(argv) and argv[i] == "train" and not {"-h", "--help"} & set(argv[i + 1 :]):
        rest = argv[i + 1 :]
        verbose = [a for a in rest if a in ("-v", "--verbose")]  # -v after `train` too
        return verbose + argv[: i + 1], [a for a in rest if a not in verbose]
    return argv, None


def _rank_note() -> str:
    """Which process speaks, under torchrun (WORLD_SIZE > 1): each rank prints its own errors."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world != "1" else ""


def main(argv: list[str] | None = None) -> int:
    argv, train_args = _split_train(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)  # config fields: for `demo` only
    if overrides and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    if train_args is not None:
        args.rest = train_args
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except QLoRAError as e:  # the user's input: one line (and the traceback with -v)
        if args.verbose:
            traceback.print_exc()
        print(f"qlora-compile {args.command}{_rank_note()}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (a bug or the machine: keep the whole traceback)
        extra = _EXTRAS.get((getattr(e, "name", None) or "").partition(".")[0])
        if isinstance(e, ModuleNotFoundError) and extra is not None:  # an optional extra not installed
            print(
                f"qlora-compile {args.command}: needs {e.name}: pip install 'qlora-compile[{extra}]'",
                file=sys.stderr,
            )
            return 1
        traceback.print_exc()
        print(
            f"qlora-compile {args.command}{_rank_note()}: unexpected error (traceback above)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
