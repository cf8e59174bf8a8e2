"""`qlora-compile plan`: predicted GPU memory of QLoRA training, from a model's config alone.

Persistent bytes (parameters and buffers) are exact: the model is built on the meta device and
changed as `compile` changes it (see `qlora_compile.inspect`: the same storage rewrite with 4-bit
tensors of the sizes quantization makes, the pipeline's own fp32 upcast of norms and dense
leftovers), then its tensors are counted. The rest is a model:

- LoRA gradients: one fp32 gradient per LoRA parameter.
- Optimizer states: `optimizer_state_bytes` (the paged optimizer's rule): 32-bit: 8 bytes per
  element (m and v in fp32); 8-bit: 2 bytes per element + 2 * 4 * ceil(n / 256) bytes of absmax
  per tensor, except that tensors under 4096 elements keep 32-bit states. With paging, tensors of
  at least 1e5 elements are paged: the device holds at most `device_budget` bytes of them (default:
  10% of the paged states), the rest lives in host memory.
- Activations (bytes a training step keeps for backward), per token t of batch * seq_len, with
  e = 4 (compile makes norms, adapters and so the residual stream fp32; with
  `fp32_residual=False` the weights' dtype, 2 for bf16) and l the bytes of the LoRA products'
  dtype (4; `lora_compute_dtype`'s), for one decoder layer:

      A = l * sum(k) + [dropout > 0] * sum(k) + l * r * n_lora      LoRA inputs kept for dA (after
                                                                     dropout), the dropout
                                                                     masks, x A^T kept for dB
        + 4 * h * n_norm                                              each norm's input in fp32
                                                                     (the norms compute in fp32)
        + e * (2 * h_q + 2 * h_kv) + 4 * heads                        q, k, v, attention output,
                                                                     log-sum-exp (fused attention)
        + [eager attention] * 2 * e * heads * seq_len                 scores and probabilities
        + e * i * (3 if gated else 1)                                 MLP activation inputs/outputs
                                                                     (a dense MLP; none in an MoE
                                                                     layer without a gated one)
        + K * (sum(e * out) + [gated] e * I + 28)                      MoE: each of the K routed
                                                                     copies of the token keeps every
                                                                     expert product's output, the
                                                                     gate's activation, its router
                                                                     weight and 3 int64 indices
        + K * [expert LoRA] e * (in + r) per adapted expert weight    LoRA inputs (the gathered
                                                                     rows; gate * up) and x A^T
        + 4 * E + 12 * K + 4                                          the router's softmax, top-k
                                                                     indices and normalized weights

  where k runs over the in_features of the layer's n_lora 4-bit layers, h is the hidden size,
  h_q = heads * head_dim, h_kv = kv_heads * head_dim, i the MLP width; K is the experts per
  token (`num_experts_per_tok`), E the experts, I the expert width (down_proj's in_features), and
  out / in run over the layer's 4-bit expert weights (measured: `tests/tools/test_plan.py`). Without checkpointing every
  layer keeps A: L * t * A. With (non-reentrant) checkpointing each layer keeps only its input and
  one layer is recomputed at a time: L * t * e * h + t * A (the first layer's input is the
  embeddings', in their dtype, w bytes: (L - 1) * t * e * h + t * w * h). Plus the head, t * (4 * h + (4 + e) * V):
  the final norm's fp32 input, the logits (in the head's dtype, fp32 unless `fp32_residual=False`)
  and the fp32 log-softmax the loss keeps (V = vocab size, causal LMs only); with the head and
  loss fused (`QLoRAConfig.fused_loss`, where it applies)
  t * (4 + e) * h instead: the final norm's input and the hidden states' gradient, computed in the
  forward (one chunk's logits at a time are transient, not counted). With
  `activation_memory_budget` b (AOTAutograd's partitioner instead of checkpointing), a bound:
  max(with checkpointing, b * without). Without dropout and with l = e, layers that read one
  input (q/k/v) share its copy, so the LoRA-input term overcounts. And the dequantize workspace:
  the largest 4-bit weight in the compute dtype.
  Not counted: the CUDA context and allocator fragmentation, transient backward buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import inspect as _inspect
from . import pipeline
from .checkpoint.skeleton import linear_kinds
from .config import QLoRAConfig
from .distributed.plan import check_world_size, gathered_bytes, per_rank, rank0_numel
from .errors import InvalidArgumentError
from .experts import QuantizedExperts
from .lora import LoRALayer, QLoRALinear
from .optim.adamw import RESIDENT_BELOW, state_nbytes_for

PAGED_MIN_NUMEL = RESIDENT_BELOW  # the paged optimizer's rule: smaller tensors' states stay resident
DEFAULT_BUDGET_FRACTION = 0.10


def optimizer_state_bytes(numels: list[int], optim_bits: int) -> int:
    """Bytes of Adam states for trainable tensors of `numels` elements (the paged optimizer's rule)."""
    return sum(_state_bytes(n, optim_bits) for n in numels)


def _state_bytes(n: int, optim_bits: int) -> int:
    if optim_bits not in (32, 8):
        raise InvalidArgumentError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
    return state_nbytes_for(n, optim_bits)


def optimizer_state_split(
    numels: list[int], optim_bits: int, paged: bool = True, device_budget: int | None = None
) -> dict:
    """{total, paged, unpaged, budget, device, host} bytes of the optimizer states."""
    total = optimizer_state_bytes(numels, optim_bits)
    paged_bytes = sum(_state_bytes(n, optim_bits) for n in numels if paged and n >= PAGED_MIN_NUMEL)
    budget = int(DEFAULT_BUDGET_FRACTION * paged_bytes) if device_budget is None else device_budget
    on_device = min(paged_bytes, budget)
    return {
        "total": total, "paged": paged_bytes, "unpaged": total - paged_bytes, "budget": budget,
        "device": total - paged_bytes + on_device, "host": paged_bytes - on_device,
    }  # fmt: skip


def persistent_breakdown(model: nn.Module, world: int = 1, offload: bool = False) -> dict[str, int]:
    """Bytes of the (compiled) model's parameters and buffers by kind; each tensor once. On `world`
    ranks, rank 0's (`distributed.plan.per_rank`; `offload`: device bytes with cpu_offload)."""
    kinds = linear_kinds()
    seen: set[int] = set()
    out = dict.fromkeys(
        ("4-bit weights", "4-bit statistics", "LoRA parameters (fp32)", "embeddings", "dense leftovers (output head)",
         "norms (fp32)", "biases of 4-bit layers", "other parameters and buffers"), 0,
    )  # fmt: skip
    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(module, (QLoRALinear, QuantizedExperts)):
                key = {"weight_packed": "4-bit weights", "bias": "biases of 4-bit layers"}.get(
                    name, "4-bit statistics"
                )
            elif isinstance(t, nn.Parameter) and t.requires_grad:
                key = "LoRA parameters (fp32)"
            elif isinstance(module, nn.Embedding):
                key = "embeddings"
            elif isinstance(module, kinds):
                key = "dense leftovers (output head)"
            elif "norm" in type(module).__name__.lower():
                key = "norms (fp32)"
            else:
                key = "other parameters and buffers"
            out[key] += per_rank(t, module, name, world, offload)
    return out


@dataclass
class Term:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    """A memory plan: device terms (their sum is the prediction), host bytes, the verdict."""

    model: str
    gpu_memory: int
    terms: list[Term]
    persistent: dict[str, int]
    optimizer: dict
    activations: dict[str, int]
    settings: dict
    host_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def persistent_bytes(self) -> int:
        return sum(self.persistent.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def to_dict(self) -> dict:
        """The plan as `qlora-compile plan --json` prints it (schema_version 1; all sizes in bytes):
        {schema_version, model, settings, gpu_memory, total, fits, largest, persistent_bytes,
        host_bytes, terms: [{name, bytes, note}], persistent: {kind: bytes}, optimizer: {total,
        paged, unpaged, budget, device, host}, activations: {...}, notes: [...]}."""
        return {
            "schema_version": 1, "model": self.model, "settings": self.settings,
            "gpu_memory": self.gpu_memory, "total": self.total, "fits": self.fits,
            "largest": self.largest.name, "persistent_bytes": self.persistent_bytes,
            "host_bytes": self.host_bytes, "terms": [vars(t).copy() for t in self.terms],
            "persistent": dict(self.persistent), "optimizer": dict(self.optimizer),
            "activations": dict(self.activations), "notes": list(self.notes),
        }  # fmt: skip


def activation_bytes(
    model: nn.Module,
    hf_config,
    *,
    batch_size: int,
    seq_len: int,
    r: int,
    lora_dropout: float,
    mask_bytes: int = 1,
    fused_loss: bool = False,
    residual_bytes: int = 4,
    lora_input_bytes: int = 4,
    budget: float | None = None,
) -> dict:
    """The activation model of the module docstring: {"per_layer", "moe_per_layer", "head", "with_checkpointing",
    "without_checkpointing"} in bytes, for a compiled-shaped (meta) model. `mask_bytes`: bytes per
    dropout mask element (1: CUDA's bool mask; the CPU's dropout keeps a 4-byte float noise tensor).
    `fused_loss`: the head and the loss are fused (`qlora_compile.loss`). `residual_bytes` (e),
    `lora_input_bytes` (l) and `budget` (an activation memory budget: adds "with_budget") as the
    module docstring says."""
    e, lo = residual_bytes, lora_input_bytes
    t = batch_size * seq_len
    layers = pipeline.repeated_blocks(model)  # the blocks compile compiles (and checkpointing checkpoints)
    n_layers = len(layers)
    layer = layers[0] if layers else model
    lora = [m for m in layer.modules() if isinstance(m, LoRALayer)]  # 4-bit or kept dense
    h = getattr(hf_config, "hidden_size", None) or max((m.in_features for m in lora), default=0)
    heads = getattr(hf_config, "num_attention_heads", 0) or 0
    head_dim = getattr(hf_config, "head_dim", None) or (h // heads if heads else 0)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    widths = [m.out_features for m in lora]
    inter = max(widths, default=0)
    gated = sum(w == inter for w in widths) >= 2 and inter != h
    norms = sum("norm" in type(m).__name__.lower() for m in layer.modules())
    eager = getattr(hf_config, "_attn_implementation", None) == "eager"
    k = sum(m.in_features for m in lora)
    routed = _routed_bytes(layer, hf_config, e, r)
    if routed and not gated:
        inter = 0  # no dense MLP: the widest linears are attention's
    per_token = (
        lo * k + (mask_bytes * k if lora_dropout > 0 else 0) + lo * r * len(lora)
        + 4 * h * norms
        + e * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 4 * heads
        + (2 * e * heads * seq_len if eager else 0)
        + e * inter * (3 if gated else 1)
        + routed
    )  # fmt: skip
    per_layer = t * per_token
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = embeddings.weight.element_size() if isinstance(embeddings, nn.Embedding) else e
    vocab = getattr(hf_config, "vocab_size", 0) if _is_lm(model) else 0
    if fused_loss:
        head = t * (4 + e) * h  # final norm's fp32 input; the hidden states' gradient the fused loss keeps
    else:
        head = t * (
            4 * h + (4 + e) * vocab
        )  # final norm's fp32 input; the logits (the output); fp32 log-softmax
    out = {
        "per_layer": per_layer,
        "moe_per_layer": t * routed,
        "layers": n_layers,
        "head": head,
        "with_checkpointing": max(n_layers - 1, 0) * t * e * h
        + t * w * h * (n_layers > 0)
        + per_layer
        + head,
        "without_checkpointing": n_layers * per_layer + head,
    }
    if budget is not None:
        out["with_budget"] = max(out["with_checkpointing"], int(budget * out["without_checkpointing"]))
    return out


def _routed_bytes(layer: nn.Module, hf_config, e: int, r: int) -> int:
    """Per token: what the MoE experts forward and its router keep for backward (module docstring)."""
    from .experts import expert_parameters

    total = 0
    top_k = getattr(hf_config, "num_experts_per_tok", None) or 1
    for module in layer.modules():
        stacks = [getattr(module, p) for p in expert_parameters(module)]
        stacks = [s for s in stacks if isinstance(s, QuantizedExperts)]
        if not stacks:
            continue
        down = getattr(module, "down_proj", None)
        per_row = sum(e * s.out_features for s in stacks) + 4 + 3 * 8
        per_row += e * down.in_features if module.has_gate and isinstance(down, QuantizedExperts) else 0
        per_row += sum(e * (s.in_features + r) for s in stacks if s.lora_A is not None)
        total += top_k * per_row + 4 * module.num_experts + 12 * top_k + 4
    return total


def _embedding_note(model: nn.Module, fp32_residual: bool = True) -> str:
    dtypes = sorted(
        {str(m.weight.dtype).removeprefix("torch.") for m in model.modules() if isinstance(m, nn.Embedding)}
    )
    head = _inspect.pipeline._output_head(model)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = (
        head is not None
        and inputs is not None
        and getattr(head, "weight", None) is getattr(inputs, "weight", 0)
    )
    tied_note = (
        "; tied to the output head, so fp32 after compile" if fp32_residual else "; tied to the output head"
    )
    return "in " + ", ".join(dtypes) + (tied_note if tied else "")


def _is_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def plan_memory(
    path: str | Path,
    *,
    gpu_memory: int,
    seq_len: int = 512,
    batch_size: int = 1,
    r: int = 64,
    optim_bits: int = 32,
    gradient_checkpointing: bool = QLoRAConfig.gradient_checkpointing,
    optim_budget: int | None = None,
    paged: bool = True,
    dtype: str = "bfloat16",
    lora_dropout: float = 0.05,
    world_size: int = 1,
    cpu_offload: bool = False,
    fp32_residual: bool = QLoRAConfig.fp32_residual,
    lora_compute_dtype: torch.dtype | None = None,
    activation_memory_budget: float | None = None,
) -> Plan:
    """Predict the device memory of QLoRA training of the model at `path` (folder or config.json).

    The defaults are compile()'s (`QLoRAConfig`'s): r=64, dropout 0.05, paged 32-bit AdamW, gradient
    checkpointing on.

    Args:
        gpu_memory: the device's bytes (`qlora_compile.units.parse_size("48GB")`).
        dtype: the dense weights' dtype as loaded before compile ("auto": the config's).
        optim_budget: device bytes for paged optimizer states (None: 10% of the paged states).
        world_size: ranks of a `distributed.shard`ed run: the plan is rank 0's (`distributed/plan.py`),
            `batch_size` per rank.
        cpu_offload: `shard(cpu_offload=True)`: sharded parameters, gradients and states in host memory.
        fp32_residual, lora_compute_dtype, activation_memory_budget: as `QLoRAConfig`'s.
    """
    check_world_size(world_size)
    if seq_len < 1 or batch_size < 1:
        raise InvalidArgumentError("--seq-len and --batch-size must be at least 1")
    if gpu_memory <= 0:
        raise InvalidArgumentError("--gpu-memory must be positive")
    config = QLoRAConfig(r=r, optim_bits=optim_bits, paged=paged, lora_dropout=lora_dropout,
                         gradient_checkpointing=gradient_checkpointing, fp32_residual=fp32_residual,
                         lora_compute_dtype=lora_compute_dtype,
                         activation_memory_budget=activation_memory_budget)  # fmt: skip
    hf_config = _inspect.read_config(path)
    weights_dtype = _inspect.resolve_dtype(dtype, hf_config)
    model = _inspect.meta_model(hf_config, weights_dtype)
    rewrites = _inspect.prepare_meta(model, config)
    persistent = persistent_breakdown(model, world_size, cpu_offload)
    trainable = [p for p in model.parameters() if p.requires_grad]
    numels = [rank0_numel(p, world_size) for p in trainable]  # this rank's chunks
    lora_bytes = 4 * sum(numels)
    optim = optimizer_state_split(numels, optim_bits, paged, optim_budget)
    offloaded = sum(persistent_breakdown(model, world_size).values()) - sum(persistent.values())
    acts = activation_bytes(
        model, hf_config, batch_size=batch_size, seq_len=seq_len, r=r, lora_dropout=lora_dropout,
        fused_loss=pipeline.fused_loss_applies(model, config),
        residual_bytes=4 if fp32_residual else weights_dtype.itemsize,
        lora_input_bytes=(lora_compute_dtype or torch.float32).itemsize, budget=activation_memory_budget,
    )  # fmt: skip
    largest = max((math.prod(x.shape[-2:]) for x in rewrites if x.skipped is None), default=0)  # one expert
    workspace = largest * torch.empty((), dtype=config.compute_dtype).element_size()
    act_key, act_name, other = _activation_policy(gradient_checkpointing, activation_memory_budget)
    budget_note = "10% of the paged states" if optim_budget is None else "--optim-budget"
    terms = [
        Term(
            "4-bit weights",
            persistent["4-bit weights"],
            f"{sum(x.skipped is None for x in rewrites)} layers, packed NF4",
        ),
        Term("4-bit statistics", persistent["4-bit statistics"], "absmax codes, nested absmax, offsets"),
        Term("embeddings", persistent["embeddings"], _embedding_note(model, fp32_residual)),
        Term(
            "dense leftovers (output head)",
            persistent["dense leftovers (output head)"],
            "fp32 after compile" if fp32_residual else "in the weights' dtype (fp32_residual=False)",
        ),
        Term("norms (fp32)", persistent["norms (fp32)"]),
        Term("biases of 4-bit layers", persistent["biases of 4-bit layers"]),
        Term("other parameters and buffers", persistent["other parameters and buffers"]),
        Term(
            "LoRA parameters (fp32)",
            persistent["LoRA parameters (fp32)"],
            f"{sum(numels):,} parameters, r={r}",
        ),
        Term("LoRA gradients (fp32)", lora_bytes),
        Term(
            "optimizer states on device",
            optim["device"],
            f"{optim_bits}-bit; {optim['paged'] / 2**30:.2f} GiB paged, device budget {optim['budget'] / 2**30:.2f} GiB "
            f"({budget_note})"
            if paged
            else f"{optim_bits}-bit, not paged",
        ),
        Term(
            f"activations ({act_name})",
            acts[act_key],
            f"batch {batch_size} x {seq_len} tokens; {other.replace('_', ' ')}: {acts[other] / 2**30:.2f} GiB",
        ),
        Term("dequantize workspace", workspace, "the largest 4-bit weight in the compute dtype"),
        *_gather_terms(model, world_size),
    ]
    host = optim["host"]
    if cpu_offload:  # LoRA gradients and every optimizer state go to the host with the parameters
        host = offloaded + lora_bytes + optim["total"]
        terms = [Term(t.name, 0, "in host memory (cpu_offload)") if t.name.startswith(("LoRA", "optimizer")) else t
                 for t in terms]  # fmt: skip
    return Plan(
        model=str(path), gpu_memory=gpu_memory, terms=[t for t in terms if t.bytes or "4-bit" in t.name],
        persistent=persistent, optimizer=optim, activations=acts, host_bytes=host,
        settings={"seq_len": seq_len, "batch_size": batch_size, "r": r, "optim_bits": optim_bits,
                  "gradient_checkpointing": gradient_checkpointing, "paged": paged,
                  "fp32_residual": fp32_residual, "activation_memory_budget": activation_memory_budget,
                  "lora_compute_dtype": None if lora_compute_dtype is None else str(lora_compute_dtype).removeprefix("torch."),
                  "dtype": str(weights_dtype).removeprefix("torch."), "world_size": world_size,
                  "cpu_offload": cpu_offload},
        notes=["not counted: the CUDA context, allocator fragmentation, transient backward buffers"],
    )  # fmt: skip


def _activation_policy(checkpointing: bool, budget: float | None) -> tuple[str, str, str]:
    """(key of the activations kept, its name, key of the alternative the plan notes)."""
    if budget is not None:
        return "with_budget", f"memory budget {budget:g}, at most", "without_checkpointing"
    if checkpointing:
        return "with_checkpointing", "with checkpointing", "without_checkpointing"
    return "without_checkpointing", "without checkpointing", "with_checkpointing"


def _gather_terms(model: nn.Module, world_size: int) -> list[Term]:
    """What FSDP2 gathers on each rank (`distributed/plan.py`); nothing in one process."""
    if world_size == 1:
        return []
    gathered = gathered_bytes(model, list(pipeline.repeated_blocks(model)))
    return [
        Term(
            "all-gather buffers (blocks)",
            gathered["blocks"],
            "two blocks gathered whole (one computing, one prefetched)",
        ),
        Term(
            "root gathered",
            gathered["root"],
            "embeddings, output head, final norm: gathered from forward to backward",
        ),
    ]
