"""ONNX Runtime latency of the exported SmolLM2-135M against PyTorch eager (CPU), one run.

    python benchmarks/bench_onnx.py [--tokens 128] [--repeats 10] [--threads 1] [--json OUT]

SmolLM2-135M-Instruct (real weights, from the packaged GGUF) is exported with
`qlora_compile.export_onnx` twice: the 4-bit base, and the base plus a LoRA adapter (r=64 on every
linear layer, random lora_B) kept as a separate low-rank branch. Candidates, one forward of a
`--tokens` prompt (batch 1, no KV cache), interleaved in each round, median of `--repeats` rounds
after 2 warm-up rounds:

- ONNX Runtime (CPU provider) on each exported graph: MatMulBnb4, fp32;
- qlora-compile in PyTorch eager: the same 4-bit weights and LoRA branch (QuantizedLinear /
  QLoRALinear, `torch.ops.qlora.linear`), fp32;
- transformers, the dense model in fp32 and in bf16.

Also printed: the export time and file size, and the largest logit difference between ONNX
Runtime and PyTorch on the same weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)  # 2 spin-wait badly on a shared 2-core machine
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qlora_compile_assets")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import logging

    import onnxruntime as ort
    import torch
    import transformers

    import qlora_compile
    from qlora_compile.adapters import AdapterFolder
    from qlora_compile.export.base import BaseModel
    from qlora_compile.export.onnx import build_model
    from qlora_compile.tools import assets

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    folder = assets.smollm2_folder(args.cache)
    work = Path(tempfile.mkdtemp(prefix="bench_onnx_"))

    # an adapter as training leaves it: r=64 on every linear layer, lora_B nonzero
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    qlora_compile.compile(model, r=64, lora_alpha=16, lora_dropout=0.0, backend="eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qlora_compile.QLoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.01)
    qlora_compile.save_adapter(model, work / "adapter")
    del model

    exports = {}
    for name, adapter in (("base", None), ("base + LoRA", work / "adapter")):
        start = time.perf_counter()
        path = qlora_compile.export_onnx(folder, adapter, work / f"{name.replace(' + ', '_')}.onnx")
        exports[name] = {
            "path": path,
            "seconds": time.perf_counter() - start,
            "MiB": path.stat().st_size / 2**20,
        }

    ids = torch.randint(0, 49152, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1

    def ort_run(path):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        return lambda: torch.from_numpy(session.run(None, feeds)[0])

    def torch_run(m):
        m.eval()
        return lambda: m(input_ids=ids, attention_mask=mask).logits

    base = BaseModel(folder)
    ours = {"base": build_model(base), "base + LoRA": build_model(base, AdapterFolder(work / "adapter"))}
    candidates = {
        "ONNX Runtime, 4-bit (MatMulBnb4)": ort_run(exports["base"]["path"]),
        "ONNX Runtime, 4-bit + LoRA branch": ort_run(exports["base + LoRA"]["path"]),
        "qlora-compile eager, 4-bit fp32": torch_run(ours["base"]),
        "qlora-compile eager, 4-bit + LoRA fp32": torch_run(ours["base + LoRA"]),
        "transformers fp32 (dense)": torch_run(
            transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ),
        "transformers bf16 (dense)": torch_run(
            transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        ),
    }
    times = {name: [] for name in candidates}
    with torch.no_grad():
        diffs = {
            "base": float(
                (
                    candidates["ONNX Runtime, 4-bit (MatMulBnb4)"]()
                    - candidates["qlora-compile eager, 4-bit fp32"]()
                )
                .abs()
                .max()
            ),
            "base + LoRA": float(
                (
                    candidates["ONNX Runtime, 4-bit + LoRA branch"]()
                    - candidates["qlora-compile eager, 4-bit + LoRA fp32"]()
                )
                .abs()
                .max()
            ),
        }
        for round_ in range(2 + args.repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = medians["ONNX Runtime, 4-bit (MatMulBnb4)"]

    print(
        f"SmolLM2-135M, {args.tokens}-token prompt, batch 1, {args.threads} threads, median of {args.repeats}"
    )
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, transformers {transformers.__version__}\n"
    )
    print("| candidate | forward | vs ONNX Runtime 4-bit |")
    print("|---|---|---|")
    for name, t in medians.items():
        print(f"| {name} | {t * 1e3:.1f} ms | {t / reference:.2f}x |")
    print()
    for name, e in exports.items():
        print(
            f"export {name}: {e['seconds']:.1f} s, {e['MiB']:.1f} MiB; max |logits ORT - PyTorch| = {diffs[name]:.2e}"
        )
    if args.json:
        result = {
            "medians_s": medians,
            "exports": {k: {**v, "path": str(v["path"])} for k, v in exports.items()},
            "max_abs_logit_diff": diffs,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
