"""`export_onnx`: a base model (+ LoRA adapter) as an ONNX graph whose quantized linears are
ONNX Runtime's `com.microsoft.MatMulBnb4`.

Each quantized linear keeps its packed 4-bit bytes unchanged; its absmax is de-nested to fp32 (the
operator takes plain absmax) and no dequantized weight enters the file. The LoRA branch stays two
small MatMuls beside it, unless `merge=True` folds it into the weights (merged onto the dequantized
base, then re-quantized, as `export_nf4` does). The graph comes from torch.onnx's dynamo exporter:
`torch.ops.qlora.linear` (and the fused `qlora::lora_linear`) translate to MatMulBnb4 through
`custom_translation_table`. Batch and sequence axes are dynamic. ONNX Runtime's CPU kernel for
MatMulBnb4 computes in fp32, so the graph is fp32.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.output_folder import atomic_files
from ..errors import InvalidArgumentError, InvalidFolderError, UnsupportedError
from ..format import check_bnb_quant_type
from ..lora import QLoRALinear
from ..modules import QuantizedLinear
from .base import BaseModel, dense_tensor, empty_model
from .merged import open_inputs
from .nf4 import requantized

logger = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"
_QUANT_TYPE = {"fp4": 0, "nf4": 1}


def _register_schema() -> None:
    """ONNX's schema for com.microsoft MatMulBnb4 (onnxscript needs it to tell inputs from attributes)."""
    from onnx import defs

    if defs.has("MatMulBnb4", MS_DOMAIN):
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    schema = defs.OpSchema(
        "MatMulBnb4",
        MS_DOMAIN,
        1,
        doc="Y = A @ dequant(B)^T, B bitsandbytes 4-bit (ONNX Runtime contrib operator)",
        inputs=[P("A", "T1"), P("B", "T2"), P("absmax", "T1")],
        outputs=[P("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], "activations and absmax"),
            ("T2", ["tensor(uint8)"], "packed 4-bit codes"),
        ],
        attributes=[
            A("K", defs.OpSchema.AttrType.INT, "in_features"),
            A("N", defs.OpSchema.AttrType.INT, "out_features"),
            A("block_size", defs.OpSchema.AttrType.INT, "elements per absmax block"),
            A("quant_type", defs.OpSchema.AttrType.INT, "0 = FP4, 1 = NF4"),
        ],
    )
    defs.register_schema(schema)


def translation_table() -> dict:
    """{torch op: onnxscript function} lowering our ops to MatMulBnb4 (+ Add, + the LoRA MatMuls)."""
    import onnxscript
    from onnxscript import opset18 as op

    _register_schema()
    ms = onnxscript.values.Opset(MS_DOMAIN, 1)

    def base(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape):
        if nested_absmax is not None:
            raise ValueError("MatMulBnb4 takes plain absmax: de-nest double-quantized weights before export")
        y = ms.MatMulBnb4(
            x,
            packed,  # 1-D: _plain_absmax views it so (the operator reads (N * K + 1) / 2 bytes)
            absmax,
            K=shape[1],
            N=shape[0],
            block_size=blocksize,
            quant_type=_QUANT_TYPE[quant_type],
        )
        return y if bias is None else op.Add(y, bias)

    def linear(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape, impl="auto"):
        return base(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape)

    def lora_linear(x, xl, packed, absmax, nested_absmax, offset, bias, lora_A, lora_B, scaling, quant_type,
                    blocksize, shape, out_dtype, impl="auto"):  # fmt: skip
        y = base(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape)
        lora = op.MatMul(op.MatMul(xl, op.Transpose(lora_A, perm=[1, 0])), op.Transpose(lora_B, perm=[1, 0]))
        return op.Add(y, op.Mul(lora, op.Constant(value_float=float(scaling))))

    return {torch.ops.qlora.linear.default: linear, torch.ops.qlora.lora_linear.default: lora_linear}


def _plain_absmax(qw):
    """The same weight with fp32 absmax (double quantization undone) and 1-D packed bytes."""
    return replace(qw, packed=qw.packed.view(-1), absmax=qw.absmax_fp32(), nested_absmax=None, offset=None)


def build_model(base: BaseModel, adapter=None, merge: bool = False) -> nn.Module:
    """The base as a PyTorch model in fp32 whose target linears are 4-bit (absmax de-nested),
    with the adapter as QLoRALinear branches (or merged and re-quantized), and the modules it
    trains in full dense with its tensors."""
    model = empty_model(base.config, device="cpu")  # uninitialized: dense linears are replaced unread
    dense, quantized = {}, set()
    for kind, name in base.items():
        if kind == "dense":
            dense[name] = dense_tensor(base, adapter, name)  # modules_to_save, merged dense LoRA
            continue
        quantized.add(name)
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        if adapter is not None and name in adapter.pairs and merge:
            qw = requantized(base, adapter, name, None)[0]
        else:
            qw = base.quantized_weight(name)
        qw = _plain_absmax(qw)
        if adapter is not None and name in adapter.pairs and not merge:
            a, b = adapter.pairs[name]["A"], adapter.pairs[name]["B"]
            layer = QLoRALinear(qw, bias, r=adapter.rank(name), lora_alpha=adapter.alpha(name),
                                lora_dropout=0.0, use_rslora=adapter.use_rslora,
                                compute_dtype=torch.float32)  # fmt: skip
            with torch.no_grad():
                layer.lora_A.weight.copy_(a)
                layer.lora_B.weight.copy_(b)
        else:
            layer = QuantizedLinear(qw, bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    result = model.load_state_dict(dense, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    # every entry the model expects is loaded, is a 4-bit layer's (set above), or ties to a loaded one
    names: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(n)
    tied_to_loaded = {n for group in names.values() if group & set(dense) for n in group}
    missing = [
        k
        for k in result.missing_keys
        if k not in tied_to_loaded and not any(k.startswith(f"{q}.") for q in quantized)
    ]
    if missing or result.unexpected_keys:
        raise InvalidFolderError(
            f"{base.dir}: the weights do not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.float()
    model.config.use_cache = False
    return model.eval()


def _light_optimize(model) -> None:
    """Constant folding and clean-up (what torch.onnx's optimize does, without the pattern
    rewriter: ONNX Runtime fuses at session creation anyway)."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.NameFixPass(),
    )(model)


class _Logits(nn.Module):
    """forward(input_ids, attention_mask) -> logits (or the last hidden state), no cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _export(model: nn.Module, ids: torch.Tensor, axes: dict):
    return torch.onnx.export(
        model,
        (ids, torch.ones_like(ids)),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": axes, "attention_mask": axes},
        custom_translation_table=translation_table(),
        optimize=False,  # onnxscript's pattern rewriter takes minutes on a 30-layer model
        verbose=False,
    )


def export_onnx(
    base: str | Path,
    adapter: str | Path | None,
    out: str | Path,
    *,
    merge: bool = False,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> Path:
    """Export `base` (+ `adapter`) to ONNX at `out` (e.g. model.onnx).

    Inputs `input_ids` and `attention_mask` (int64, [batch, sequence], both dynamic); output
    `logits` (fp32). Weights go into the file, or into `<out>.data` beside it when they exceed
    2 GB (ONNX's protobuf limit). Written atomically (`atomic_files`: a hidden folder beside
    `out`, its files moved in once checked). Steps are logged (`logging`, INFO).

    Raises:
        FileNotFoundError / ValueError: as `export_merged`; `merge=True` without an adapter.
        RuntimeError: the exporter did not turn every quantized linear into one MatMulBnb4.
        NotImplementedError: the base has MoE expert weights (3-D `gate_up_proj` / `down_proj`).
    """
    import onnx

    if merge and adapter is None:
        raise InvalidArgumentError("--merge needs an adapter")
    check_bnb_quant_type(quant_type, "an ONNX export (com.microsoft.MatMulBnb4)")
    base_model, lora = open_inputs(base, adapter, quant_type, blocksize, double_quant)
    if base_model.experts:
        raise UnsupportedError(
            f"{base_model.dir}: ONNX export of MoE expert weights ({len(base_model.experts)}, e.g. "
            f"{next(iter(base_model.experts))}) is not supported: MatMulBnb4 takes one matrix and the "
            "routed per-expert products have no lowering; export merged 16-bit weights instead"
        )
    logger.info(
        "building %s with %d 4-bit linear layers", base_model.config.model_type, len(base_model.quantized)
    )
    model = _Logits(build_model(base_model, lora, merge)).eval()
    ids = torch.zeros((2, 8), dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch, 1: seq}
    logger.info("exporting with torch.onnx (dynamo)")
    with warnings.catch_warnings():  # the exporter's notes on torchvision, axis names, deprecations
        warnings.simplefilter("ignore")
        program = _export(model, ids, axes)
    _light_optimize(program.model)
    counts = Counter(node.op_type for node in program.model_proto.graph.node)
    if counts["MatMulBnb4"] != len(base_model.quantized):
        raise RuntimeError(
            f"expected {len(base_model.quantized)} MatMulBnb4 nodes, the exporter made {counts['MatMulBnb4']}"
        )
    for node in program.model.graph.all_nodes():  # the exporter's stack traces: 2 kB a node
        node.metadata_props.clear()
    out = Path(out)
    with atomic_files(out.parent, out.name) as tmp:  # the file (and its external data) moved in when checked
        program.save(str(tmp / out.name))  # external data only past 2 GB
        onnx.checker.check_model(str(tmp / out.name))
    logger.info("wrote %s (%.1f MiB, %d MatMulBnb4)", out, out.stat().st_size / 2**20, counts["MatMulBnb4"])
    return out
