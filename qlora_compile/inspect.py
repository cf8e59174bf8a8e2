"""`qlora-compile inspect`: what `compile` does to a model, without its weights.

How it works (nothing here reads or allocates a weight):

1. The model is built from its `config.json` on the meta device (shapes and dtypes, no values).
2. compile's own model changes run on it (`pipeline.prepare_model`: target selection, skip rules,
   `QLoRALinear`, fp32 norms and dense leftovers, checkpointing), with a `quantize` that makes
   each 4-bit weight of meta tensors with the sizes the quantizer produces (`meta_quantizer`,
   `quantized_sizes`): the rewrite table and byte counts are exact without quantizing anything.
3. Dynamo traces a training forward (`model(input_ids, labels=input_ids)` in train mode, with the
   config's gradient checkpointing) on meta tensors, by default on a copy of the config cut to
   `layers=2` decoder layers (every layer traces to the same graph); `torch._dynamo.explain`
   gives the graphs and the graph breaks with their reasons. Our passes then run on each graph
   through `passes.run_passes` itself, which reports after each pass which nodes it made.

Kernel choices are those of the traced device: meta tensors choose as the CPU does
("dequant_matmul" for static shapes); on CUDA `choose_kernel` picks by row count at compile time.

JSON schema (`schema_version` 1; `inspect_model(...)` returns it as a dict):

    schema_version: 1
    model: {path, model_type, architecture, dtype, num_hidden_layers, parameters}
    config: {quant_type, blocksize, double_quant, r, lora_alpha, lora_dropout,
             gradient_checkpointing, compute_dtype}
    traced: {device: "meta", layers, of_layers, batch_size, seq_len, mode: "train", call,
             error: null, or why tracing failed (then graphs is empty; the rewrites stand)}
    rewrites: [{name, kind, shape: [out, in] ([experts, out, in] for an expert weight),
                status: "quantized" | "skipped",
                reason: str | null, bytes_before, bytes_after, bits_per_param}]
    graphs: [{index, node_count, our_ops: {op: count}, passes: {pass: count},
              modules: [{name: "" (the captured graph) or a sub-graph name,
                         nodes: [{id, name, op, target, pass, kernel, shape, inputs: [id]}]}]}]
    graph_breaks: [{reason (first line), detail (Dynamo's full text), where (file:line in function),
                    code (that source line)}]
    totals: {modules_quantized, modules_skipped, params_quantized, bytes_before, bytes_after,
             bits_per_param, graphs, graph_breaks, nodes, passes: {pass: count}}

`pass` of a node: "fuse_lora" / "fuse_shared_input" (the pass created it), "rewrite_storage" (a
`qlora::linear` the storage rewrite put there and no pass fused), or null. `passes` counts are the
names `run_passes` reports ("fuse_lora", "fuse_shared_input", "kernel:<name>"), so they equal
`model.qlora.report().passes` of a real compile traced on the same input. Bytes are bytes; sizes of
a `bits_per_param` are 8 * bytes_after / (out * in), times the experts for an expert weight.
"""

from __future__ import annotations

import copy
import json
import linecache
import math
from collections import Counter
from inspect import signature
from pathlib import Path

import torch
from torch import fx, nn

from . import pipeline
from .checkpoint.skeleton import model_class
from .codes import NESTED_BLOCKSIZE
from .config import QLoRAConfig
from .dtypes import FLOAT_DTYPES, check_float_dtype, parse_dtype
from .errors import InvalidArgumentError, InvalidConfigError, MissingFileError
from .format import QuantizedWeight
from .passes import run_passes
from .passes._match import example_value, graph_modules

SCHEMA_VERSION = 1


def quantized_sizes(numel: int, blocksize: int, double_quant: bool) -> dict[str, tuple[int, torch.dtype]]:
    """Element count and dtype of each tensor `quantize_weight` makes for `numel` values."""
    blocks = -(-numel // blocksize)
    sizes = {"packed": ((numel + 1) // 2, torch.uint8)}
    if double_quant:
        sizes["absmax"] = (blocks, torch.uint8)
        sizes["nested_absmax"] = (-(-blocks // NESTED_BLOCKSIZE), torch.float32)
        sizes["offset"] = (1, torch.float32)
    else:
        sizes["absmax"] = (blocks, torch.float32)
    return sizes


def quantized_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """`QuantizedWeight.nbytes` of a `numel`-element weight, from its size alone."""
    return sum(
        n * torch.empty((), dtype=d).element_size()
        for n, d in quantized_sizes(numel, blocksize, double_quant).values()
    )


def meta_quantizer(config: QLoRAConfig) -> pipeline.Quantize:
    """A `quantize` for `pipeline.rewrite_storage` on the meta device: the 4-bit weight a dense one
    would become, made of meta tensors of the sizes `quantize_weight` makes (no values read)."""

    def quantize(weight: torch.Tensor) -> QuantizedWeight:
        check_float_dtype(weight.dtype, "weight dtype")  # what quantize_weight refuses, refused here
        sizes = quantized_sizes(math.prod(weight.shape), config.blocksize, config.double_quant)

        def meta(key, dims=None):
            if key not in sizes:
                return None
            n, d = sizes[key]
            return torch.empty(dims if dims is not None else (n,), dtype=d, device="meta")

        packed = meta("packed", (sizes["packed"][0], 1))
        return QuantizedWeight(
            packed, meta("absmax"), config.quant_type, config.blocksize, torch.Size(weight.shape), weight.dtype,
            meta("nested_absmax"), meta("offset", ()),
        )  # fmt: skip

    return quantize


# ---------------------------------------------------------------------------------------------
# Loading a model on the meta device


def read_config(path: str | Path):
    """A transformers config from a model folder or a config.json path."""
    import transformers

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingFileError(f"{path} has no config.json")
        return _transformers_config(path, lambda: transformers.AutoConfig.from_pretrained(path))
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidConfigError(f"{path} is not valid JSON: {e}") from None
    if "model_type" not in data:
        raise InvalidConfigError(f"{path} has no 'model_type' (is it a transformers config.json?)")
    return _transformers_config(path, lambda: transformers.AutoConfig.for_model(**data))


def _transformers_config(path: Path, read):
    """`read()`, with transformers' refusals of a config (an unknown model_type, a bad value) as ours."""
    try:
        return read()
    except (ValueError, KeyError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidConfigError(f"{path}: transformers cannot read this config ({first})") from e


def resolve_dtype(name: str, config) -> torch.dtype:
    """ "auto" is what `from_pretrained(dir)` does: the config's dtype, else float32."""
    if name == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = FLOAT_DTYPES.get(found.removeprefix("torch."), torch.float32)
        return found if found in FLOAT_DTYPES.values() else torch.float32
    return parse_dtype(name, "dtype (or auto)")


def with_layers(config, layers: int | None):
    """A copy of `config` with at most `layers` hidden layers (None: unchanged)."""
    total = num_layers(config)
    if layers is None or total is None or layers >= total:
        return config
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    for key in ("layer_types", "block_types"):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, value[:layers])
    return config


def num_layers(config) -> int | None:
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """`config`'s model on the meta device in `dtype` (what from_pretrained would build)."""
    cls = model_class(config)
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=dtype)
        return cls(config).to(dtype)


def prepare_meta(model: nn.Module, config: QLoRAConfig) -> list[pipeline.Rewrite]:
    """compile()'s model changes (`pipeline.prepare_model`: storage rewrite, freezing and fp32 norms,
    gradient checkpointing; no Dynamo) on a meta model. Returns the rewrite records."""
    return pipeline.prepare_model(model, config, quantize=meta_quantizer(config)).rewrites


# ---------------------------------------------------------------------------------------------
# Tracing and the passes


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}::{t._opname}"
    if isinstance(t, torch._ops.OpOverloadPacket):  # as Dynamo records an op no pass rewrote
        return t._qualified_op_name
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order::{t.__name__}"
    name = getattr(t, "__name__", None) or str(t)
    module = getattr(t, "__module__", None) or ""
    if module.startswith("torch") and not name.startswith("torch"):
        return f"torch.{name}" if module in ("torch", "torch._C._nn", "torch._C._VariableFunctions") else name
    return name


def _shape(node: fx.Node):
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return [d if isinstance(d, int) else str(d) for d in value.shape]
    return None


def _kernel(node: fx.Node) -> str | None:
    if node.op != "call_function" or getattr(node.target, "namespace", None) != "qlora":
        return None
    last = node.args[-1] if node.args else None
    return last if isinstance(last, str) and last in ("auto", "gemv", "fused", "dequant_matmul") else None


def run_passes_recorded(gm: fx.GraphModule) -> tuple[Counter, dict[fx.Node, str]]:
    """`passes.run_passes`, recording the pass that created each node."""
    made: dict[fx.Node, str] = {}

    def nodes() -> set[fx.Node]:
        return {n for m in graph_modules(gm) for n in m.graph.nodes}

    seen = nodes()

    def after(name: str) -> None:
        nonlocal seen
        now = nodes()
        made.update({n: name for n in now - seen})
        seen = now

    return run_passes(gm, after=after), made


def describe_graph(index: int, gm: fx.GraphModule, counts: Counter, made: dict) -> dict:
    modules, ours = [], Counter()
    for prefix, module in gm.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        ids = {n: i for i, n in enumerate(module.graph.nodes)}
        rows = []
        for node, i in ids.items():
            target = _target(node)
            if target.startswith("qlora::"):
                ours[target] += 1
            made_by = made.get(node)
            if made_by is None and target == "qlora::linear":
                made_by = "rewrite_storage"
            rows.append({
                "id": i, "name": node.name, "op": node.op, "target": target, "pass": made_by,
                "kernel": _kernel(node), "shape": _shape(node),
                "inputs": [ids[a] for a in node.all_input_nodes if a in ids],
            })  # fmt: skip
        modules.append({"name": prefix, "nodes": rows})
    return {
        "index": index,
        "node_count": sum(len(m["nodes"]) for m in modules),
        "our_ops": dict(sorted(ours.items())),
        "passes": dict(counts),
        "modules": modules,
    }


def _break(reason) -> dict:
    text = str(getattr(reason, "reason", reason))
    stack = getattr(reason, "user_stack", None) or []
    where = code = None
    if stack:
        frame = stack[-1]
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        code = linecache.getline(frame.filename, frame.lineno).strip() or None
    first = text.strip().splitlines()[0] if text.strip() else text
    return {"reason": first, "detail": text, "where": where, "code": code}


def example_call(model: nn.Module, batch_size: int, seq_len: int) -> tuple[tuple, dict]:
    """The training call traced: token ids (labels too, for a causal LM; an attention mask of
    ones for a model that takes one: without it transformers checks the position ids for packed
    sequences by reading values, which meta tensors do not have, outside the compiled blocks)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    device = next(iter(model.parameters())).device
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
    name = type(model).__name__
    kwargs = {"labels": ids} if name.endswith(("ForCausalLM", "LMHeadModel")) else {}
    if "attention_mask" in signature(model.forward).parameters:
        kwargs["attention_mask"] = torch.ones_like(ids)
    if kwargs and getattr(model.config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return (ids,), kwargs


def trace(
    model: nn.Module, args: tuple, kwargs: dict, scope: str = "layers"
) -> tuple[list[dict], list[dict]]:
    """Dynamo-capture `model(*args, **kwargs)` as compile() compiles it (`scope`: its
    `compile_scope`), run our passes on each graph; (graphs, breaks)."""
    from torch._dynamo.backends.debugging import ExplainWithBackend

    explainer = ExplainWithBackend("eager")
    torch._dynamo.reset()
    if pipeline.compile_model(model, explainer, scope):
        # compile() runs the code around the blocks as it is, but here the tensors are meta and
        # that code reads values (transformers' mask checks): Dynamo runs it instead, on fake
        # values, without recording it; each block call leaves it for the blocks' compiled code.
        for block in pipeline.repeated_blocks(model):
            block.forward = torch._dynamo.disable(block.forward, recursive=False)
        model = torch.compile(model, backend="eager")
    model(*args, **kwargs)
    explained = explainer.output()
    graphs = []
    for index, gm in enumerate(explained.graphs):
        counts, made = run_passes_recorded(gm)
        graphs.append(describe_graph(index, gm, counts, made))
    torch._dynamo.reset()
    return graphs, [_break(r) for r in explained.break_reasons]


# ---------------------------------------------------------------------------------------------


def rewrite_rows(rewrites: list[pipeline.Rewrite]) -> list[dict]:
    rows = []
    for r in rewrites:
        params = math.prod(r.shape)
        quantized = r.skipped is None
        rows.append({
            "name": r.name, "kind": r.kind, "shape": list(r.shape),
            "status": "quantized" if quantized else "skipped", "reason": r.skipped,
            "bytes_before": r.bytes_before, "bytes_after": r.bytes_after if quantized else r.bytes_before,
            "bits_per_param": round(8 * r.bytes_after / params, 4) if quantized and params else None,
        })  # fmt: skip
    return rows


def inspect_model(
    path: str | Path,
    *,
    layers: int | None = 2,
    batch_size: int = 1,
    seq_len: int = 16,
    dtype: str = "auto",
    config: QLoRAConfig | None = None,
) -> dict:
    """Inspect the model at `path` (a folder with config.json, or a config.json). See the module
    docstring for what is traced and the returned schema.

    Args:
        layers: decoder layers in the traced copy (None: all of them). The rewrite table always
            covers the whole model.
        batch_size, seq_len: the traced input's size.
        dtype: the dense weights' dtype, "auto" (as from_pretrained: the config's, else float32).
        config: the QLoRAConfig compile would get (default: the paper's).
    """
    if batch_size < 1 or seq_len < 1:
        raise InvalidArgumentError("batch size and sequence length must be at least 1")
    if layers is not None and layers < 1:
        raise InvalidArgumentError("layers must be at least 1")
    config = config or QLoRAConfig()
    hf_config = read_config(path)
    weights_dtype = resolve_dtype(dtype, hf_config)
    full = meta_model(hf_config, weights_dtype)
    parameters = sum(p.numel() for p in full.parameters())  # unique (tied weights once)
    rewrites = prepare_meta(full, config)
    del full
    total_layers = num_layers(hf_config)
    small_config = with_layers(hf_config, layers)
    traced_model = meta_model(small_config, weights_dtype)
    prepare_meta(traced_model, config)
    traced_model.train()
    args, kwargs = example_call(traced_model, batch_size, seq_len)
    try:
        graphs, breaks, error = *trace(traced_model, args, kwargs, config.compile_scope), None
    except Exception as e:  # the rewrite table stands on its own; say why there are no graphs
        torch._dynamo.reset()
        graphs, breaks, error = (
            [],
            [],
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
        )
    rows = rewrite_rows(rewrites)
    quantized = [r for r in rows if r["status"] == "quantized"]
    params_q = sum(math.prod(r["shape"]) for r in quantized)
    after = sum(r["bytes_after"] for r in quantized)
    passes: Counter = Counter()
    for g in graphs:
        passes.update(g["passes"])
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "path": str(path), "model_type": hf_config.model_type,
            "architecture": type(traced_model).__name__, "dtype": str(weights_dtype).removeprefix("torch."),
            "num_hidden_layers": total_layers, "parameters": parameters,
        },
        "config": {
            "quant_type": config.quant_type, "blocksize": config.blocksize, "double_quant": config.double_quant,
            "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "gradient_checkpointing": config.gradient_checkpointing, "compile_scope": config.compile_scope,
            "compute_dtype": str(config.compute_dtype).removeprefix("torch."),
        },
        "traced": {
            "device": "meta", "layers": num_layers(small_config), "of_layers": total_layers,
            "batch_size": batch_size, "seq_len": seq_len, "mode": "train",
            "call": "model(input_ids" + ", labels=input_ids" * ("labels" in kwargs)
            + ", attention_mask=ones" * ("attention_mask" in kwargs) + ")",
            "error": error,
        },
        "rewrites": rows,
        "graphs": graphs,
        "graph_breaks": breaks,
        "totals": {
            "modules_quantized": len(quantized), "modules_skipped": len(rows) - len(quantized),
            "params_quantized": params_q,
            "bytes_before": sum(r["bytes_before"] for r in quantized), "bytes_after": after,
            "bits_per_param": round(8 * after / params_q, 4) if params_q else None,
            "graphs": len(graphs), "graph_breaks": len(breaks),
            "nodes": sum(g["node_count"] for g in graphs), "passes": dict(sorted(passes.items())),
        },
    }  # fmt: skip
