"""`qlora_compile.compile(model)`: make a PyTorch / Hugging Face model QLoRA-trainable, in place.

1. Storage rewrite: each selected linear becomes a `QLoRALinear` (4-bit base + LoRA adapters),
   layer by layer, its dense weight dropped at once; `modules_to_save` (by default the task head
   of a classification / QA model) stay dense and train in full; everything else is frozen, norms
   go to fp32.
2. `model.compile(backend=...)`: Dynamo hands our backend FX graphs; the passes in
   `qlora_compile/passes/` rewrite them (and count what they did), then Inductor (or aot_eager)
   compiles the result.
3. `model.qlora`: the handle with the config, the optimizer, a report and `save_adapter`.

The model object and its class are kept, so `generate()`, `transformers.Trainer` and the model's
config keep working.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import logging
import math
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import experts as _experts
from .checkpoint.skeleton import linear_kinds, modules_to_not_convert, should_convert
from .config import NO_QUANT, QLoRAConfig
from .errors import InvalidArgumentError, InvalidConfigError, UnsupportedError
from .format import QuantizedWeight, quantize_weight
from .lora import LoRA16Linear, LoRALayer, LoRALinear, QLoRALinear
from .loss import fusable_head, fuse_causal_lm_loss
from .modules import QuantizedLinear

logger = logging.getLogger(__name__)
_wrapper_ids = itertools.count()


@dataclass
class Rewrite:
    """One selected module (or 3-D expert weight): what it was and what it became."""

    name: str
    kind: str
    shape: tuple[int, ...]  # (out, in); (experts, out, in) as stored for an expert weight
    bytes_before: int
    bytes_after: int = 0
    skipped: str | None = None  # the reason, when it stayed as it was


@dataclass
class Report:
    """What `compile` did: rewritten and skipped modules, graph-pass counts, bytes."""

    rewrites: list[Rewrite] = field(default_factory=list)
    passes: dict[str, int] = field(default_factory=dict)
    graphs: int = 0
    compiled_blocks: int = 0  # blocks sharing one compiled function (compile_scope="layers"); 0: whole model
    fused_loss: bool = False  # training loss through qlora_compile.loss.linear_cross_entropy
    dense_lora: list[str] = field(default_factory=list)  # linears kept dense, with LoRA (`LoRALinear`)
    modules_to_save: dict[str, int] = field(default_factory=dict)  # module -> parameters trained in full
    trainable: int = 0  # trainable parameters: LoRA and modules_to_save (counted by `model.qlora.report()`)

    @property
    def rewritten(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.skipped is None]

    @property
    def skipped(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.skipped is not None]

    def totals(self) -> dict[str, float]:
        before = sum(r.bytes_before for r in self.rewritten)
        after = sum(r.bytes_after for r in self.rewritten)
        params = sum(math.prod(r.shape) for r in self.rewritten)
        return {"bytes_before": before, "bytes_after": after, "bits_per_param": 8 * after / max(params, 1)}

    def __str__(self) -> str:
        t = self.totals()
        lines = [
            f"rewritten {len(self.rewritten)} modules: {t['bytes_before'] / 2**20:.1f} MiB -> "
            f"{t['bytes_after'] / 2**20:.1f} MiB ({t['bits_per_param']:.3f} bits/param)",
        ]
        lines += [f"  skipped {r.name} ({r.kind}): {r.skipped}" for r in self.skipped]
        if self.dense_lora:
            lines.append(f"LoRA on {len(self.dense_lora)} linears kept dense: {', '.join(self.dense_lora)}")
        if self.trainable:
            lines.append(f"trainable parameters: {self.trainable:,}")
        lines += [
            f"  trained in full (modules_to_save): {n} ({k:,} parameters)"
            for n, k in self.modules_to_save.items()
        ]
        if self.graphs:
            lines.append(
                f"graphs compiled: {self.graphs}; " + ", ".join(f"{k}: {v}" for k, v in self.passes.items())
            )
        else:
            lines.append("graphs compiled: none yet (the first forward call traces the model)")
        return "\n".join(lines)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """(out_features, in_features) view of a Linear's or Conv1D's weight."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def select_targets(model: nn.Module, config: QLoRAConfig) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module `config.target_modules` selects, in order; experts
    modules (3-D expert weights) count as linear, and those owning a `target_parameters` entry are
    selected too."""
    kinds = linear_kinds() + (QuantizedLinear,)  # already 4-bit (load_quantized): wrapped as they are
    head = _output_head(model)
    targets = config.target_modules
    keep = kept_dense(model) if targets == "all-linear" else []
    saved = saved_modules(model, config)
    chosen = []
    for name, module in model.named_modules():
        if inside(name, saved):  # dense, trained in full: neither 4-bit nor LoRA
            continue
        linear = (isinstance(module, kinds) or _experts.is_experts(module)) and module is not head
        if callable(targets) and not isinstance(targets, str):
            selected = targets(module, name)
        elif targets == "all-linear":
            selected = linear and name.split(".")[-1] != "lm_head" and should_convert(name, keep)
        else:
            selected = linear and _experts.matches(name, targets)
        if selected or _targets_parameter(name, module, config):
            chosen.append((name, module))
    if not isinstance(targets, str) and not callable(targets):
        found = {t for t in targets if any(_experts.matches(n, [t]) for n, _ in chosen)}
        missing = [t for t in targets if t not in found]
        if missing:
            names = sorted(
                {
                    n.split(".")[-1]
                    for n, m in model.named_modules()
                    if isinstance(m, kinds) or _experts.is_experts(m)
                }
            )
            if any(_experts.matches(n, missing) and inside(n, saved) for n, _ in model.named_modules()):
                raise InvalidConfigError(
                    f"target_modules {missing} select only modules inside modules_to_save {saved}, which stay "
                    "dense and train in full: name them in one of the two, not both"
                )
            raise InvalidConfigError(
                f"target_modules {missing} match no Linear/Conv1D module; the model has: {names}"
            )
    _check_target_parameters(model, config)
    return chosen


# PEFT's task heads: its SEQ_CLS and TOKEN_CLS models add "classifier" and "score" to
# modules_to_save, QUESTION_ANS adds "qa_outputs" (peft_model.py); by the model class's suffix.
_TASK_HEADS = (
    ("ForSequenceClassification", ("classifier", "score")),
    ("ForTokenClassification", ("classifier", "score")),
    ("ForQuestionAnswering", ("qa_outputs",)),
)


def inside(name: str, modules: list[str]) -> bool:
    """Whether module `name` is one of `modules` or lies inside one."""
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def task_head_names(model: nn.Module) -> tuple[str, ...]:
    """The names PEFT's task type for this model class puts in modules_to_save (may not exist)."""
    cls = type(model).__name__
    return next((heads for suffix, heads in _TASK_HEADS if cls.endswith(suffix)), ())


def saved_modules(model: nn.Module, config: QLoRAConfig) -> list[str]:
    """Full names of the modules `config.modules_to_save` keeps dense and trains in full: the
    outermost modules whose names match (as target_modules' names match); None: the task head.

    Raises:
        ValueError: a name given that matches no module (the message names the closest ones), or a
            saved module whose parameters are tied to others (training it would train them too).
    """
    names = config.modules_to_save
    given = names is not None
    names = names if given else task_head_names(model)
    modules = [n for n, _ in model.named_modules() if n]
    saved = []
    for name in modules:
        if _experts.matches(name, names) and not inside(name, saved):
            saved.append(name)
    missing = [t for t in names if not any(_experts.matches(n, [t]) for n in modules)] if given else []
    if missing:
        candidates = sorted({n.rsplit(".", 1)[-1] for n in modules} | set(modules))
        closest = {t: difflib.get_close_matches(t, candidates, n=3, cutoff=0.4) for t in missing}
        raise InvalidConfigError(
            f"modules_to_save {missing} match no module of the model; closest: {closest}"
        )
    _check_untied(model, saved)
    return saved


def _check_untied(model: nn.Module, saved: list[str]) -> None:
    outside = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not inside(name.rpartition(".")[0], saved):
            outside.setdefault(id(p), name)
    for module in saved:
        for name, p in model.get_submodule(module).named_parameters():
            if id(p) in outside:
                raise InvalidConfigError(
                    f"modules_to_save: {module}.{name} is tied to {outside[id(p)]}; training it in full would "
                    "train that one too (PEFT trains a copy instead): untie the weights or leave it out"
                )


def dense_lora_targets(model: nn.Module, config: QLoRAConfig) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the linears "all-linear" keeps dense (`kept_dense`: T5's `wo`) that get
    LoRA on their dense weight, as PEFT's "all-linear" adapts every linear but the output head:
    every `nn.Linear` that `select_targets` leaves out, except the output head, `lm_head` and
    modules_to_save. None with another target_modules."""
    if config.target_modules != "all-linear":
        return []
    head, saved = _output_head(model), saved_modules(model, config)
    chosen = {id(m) for _, m in select_targets(model, config)}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not isinstance(m, LoRALayer)
        and id(m) not in chosen
        and m is not head
        and name.split(".")[-1] != "lm_head"
        and not inside(name, saved)
    ]


def kept_dense(model: nn.Module) -> list[str]:
    """Module-name patterns that "all-linear" leaves dense on a transformers model: the rule of
    transformers' bitsandbytes quantizer (output head, tied weights, the last module,
    `_keep_in_fp32_modules`) plus `_keep_in_fp32_modules_strict`, the same rule `convert` applies.
    T5's `wo`, for example, stays dense (its feed-forward casts its input to `wo.weight.dtype`)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    return modules_to_not_convert(model, None)


def _targets_parameter(name: str, module: nn.Module, config: QLoRAConfig) -> bool:
    return any(
        _experts.matches(f"{name}.{p}", config.target_parameters) for p in _experts.expert_parameters(module)
    )


def _check_target_parameters(model: nn.Module, config: QLoRAConfig) -> None:
    keys = [f"{n}.{p}" for n, m in model.named_modules() for p in _experts.expert_parameters(m)]
    missing = [t for t in config.target_parameters if not any(_experts.matches(k, [t]) for k in keys)]
    if missing:
        names = sorted({k.rsplit(".", 1)[-1] for k in keys})
        raise InvalidConfigError(
            f"target_parameters {missing} match no 3-D expert weight of a transformers experts module; "
            f"the model has: {names or 'none'}"
        )


Quantize = Callable[[torch.Tensor], QuantizedWeight]


def quantizer(config: QLoRAConfig) -> Quantize:
    """`quantize_weight` with the config's format: a dense matrix -> its 4-bit weight."""

    def quantize(weight: torch.Tensor) -> QuantizedWeight:
        if weight.device.type == "meta":
            raise InvalidArgumentError("weight is on the meta device (no values to quantize)")
        return quantize_weight(
            weight.detach(),
            quant_type=config.quant_type,
            blocksize=config.blocksize,
            double_quant=config.double_quant,
        )

    return quantize


def _new_layer(module: nn.Module, config: QLoRAConfig, quantize: Quantize) -> QLoRALinear | LoRA16Linear:
    weight = _dense_weight(module)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight dtype {weight.dtype} is not a float dtype (already quantized?)")
    if config.quant_type == NO_QUANT:
        if not isinstance(module, nn.Linear):
            raise UnsupportedError(f"quant_type='none' wraps nn.Linear only, not {type(module).__name__}")
        return LoRA16Linear(module, **config.lora_kwargs())
    fan_in_fan_out = not isinstance(module, nn.Linear)  # Conv1D stores (in, out), as PEFT notes
    return QLoRALinear(quantize(weight), module.bias, fan_in_fan_out=fan_in_fan_out, **config.lora_kwargs())


def _stored_bytes(layer: nn.Module) -> int:
    """Bytes of a new layer's frozen base weight: 4-bit storage, or the 16-bit weight kept."""
    if isinstance(layer, QLoRALinear):
        return layer.quantized_weight.nbytes
    return layer.weight.numel() * layer.weight.element_size()


def rewrite_storage(model: nn.Module, config: QLoRAConfig, quantize: Quantize | None = None) -> list[Rewrite]:
    """Swap each target for a QLoRALinear, one at a time, so at most one dense layer is extra.

    `quantize` maps a dense (out, in) weight to its 4-bit weight (default: `quantizer(config)`;
    `qlora_compile.inspect` passes one that makes meta tensors of the sizes quantization makes)."""
    quantize = quantize or quantizer(config)
    kinds = linear_kinds()
    rewrites = []
    _dequantize_saved(model, saved_modules(model, config))
    for name, module in select_targets(model, config):
        kind = type(module).__name__
        if _experts.is_experts(module):
            if config.quant_type == NO_QUANT:  # stays as it is: frozen, 16-bit, no LoRA
                rewrites.append(
                    Rewrite(name, kind, (0, 0), 0, skipped="quant_type='none': experts kept 16-bit")
                )
                continue
            rewrite_experts(name, module, config, rewrites, quantize=quantize)
            continue
        if type(module) is QuantizedLinear:  # keep its bytes: no dequantize / requantize
            if config.quant_type == NO_QUANT:
                raise InvalidConfigError(
                    f"quant_type='none' (16-bit LoRA), but {name} is already 4-bit (a bitsandbytes folder, "
                    "load_quantized): load the 16-bit model instead"
                )
            qw = module.quantized_weight
            layer = QLoRALinear(qw, module.bias, fan_in_fan_out=module.fan_in_fan_out, **config.lora_kwargs())
            replace_module(model, name, module, layer)
            rewrites.append(Rewrite(name, kind, tuple(qw.shape), qw.nbytes, bytes_after=qw.nbytes))
            continue
        if not isinstance(module, kinds):
            rewrites.append(Rewrite(name, kind, (0, 0), 0, skipped="not an nn.Linear or transformers Conv1D"))
            continue
        weight = _dense_weight(module)
        record = Rewrite(name, kind, tuple(weight.shape), weight.numel() * weight.element_size())
        rewrites.append(record)
        try:
            layer = _new_layer(module, config, quantize)
        except (ValueError, TypeError, NotImplementedError) as e:
            record.skipped = str(e)
            logger.warning("qlora_compile: skipping %s: %s", name, e)
            continue
        replace_module(model, name, module, layer)
        record.bytes_after = _stored_bytes(layer)
        del module, weight, layer  # the dense weight goes now, not at the end of the loop
    return rewrites


def add_dense_lora(model: nn.Module, config: QLoRAConfig, targets: list[tuple[str, nn.Linear]]) -> list[str]:
    """Give each of `targets` (from `dense_lora_targets`, chosen before the storage rewrite) LoRA on
    its dense weight: a `LoRALinear` that takes over the module's parameters. Returns the names."""
    kwargs = {
        k: v for k, v in config.lora_kwargs().items() if k != "compute_dtype"
    }  # the base stays as it is
    for name, module in targets:
        replace_module(model, name, module, LoRALinear(module, **kwargs))
    return [name for name, _ in targets]


def _dequantize_saved(model: nn.Module, saved: list[str]) -> None:
    """A 4-bit linear (from `load_quantized`) inside a module trained in full becomes an nn.Linear
    with its dequantized weight: a trained head cannot stay 4-bit."""
    for name, module in list(model.named_modules()):
        if type(module) is QuantizedLinear and inside(name, saved):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.to(device=module.weight_packed.device, dtype=module.weight_dtype)
            with torch.no_grad():
                dense.weight.copy_(module.quantized_weight.dequantize())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            logger.info("qlora_compile: %s is 4-bit but in modules_to_save: dequantized to train it", name)
            replace_module(model, name, module, dense)


def replace_module(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` is, at `name`, in `old`'s train/eval mode (new modules start in
    training mode; a model from `from_pretrained` is in eval mode, where LoRA dropout must stay
    off: generate() would otherwise sample dropout masks)."""
    new.train(old.training)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def rewrite_experts(
    name: str,
    module: nn.Module,
    config: QLoRAConfig,
    rewrites: list[Rewrite],
    quantize: Quantize | None = None,
) -> None:
    """Quantize an experts module's 3-D weights per expert (`experts.rewrite_experts`), LoRA on those
    that `config.target_parameters` names; appends one Rewrite per weight to `rewrites`.
    `quantize` (default `quantizer(config)`) maps one (out, in) matrix."""
    quantize = quantize or quantizer(config)

    def record(pname: str, kind: str, shape: tuple[int, ...], nbytes: int) -> Rewrite:
        rewrites.append(Rewrite(f"{name}.{pname}", kind, shape, nbytes))
        return rewrites[-1]

    _experts.rewrite_experts(
        name, module, quantize=quantize, compute_dtype=config.compute_dtype,
        lora=(config.r, config.lora_alpha, config.use_rslora), target_parameters=config.target_parameters, record=record,
    )  # fmt: skip
    module.train(module.training)  # its new children take the module's mode


def _freeze_and_upcast_norms(model: nn.Module, saved: list[str] = (), fp32_residual: bool = True) -> None:
    """Freeze all but the adapters and the `saved` modules (modules_to_save, trained in full);
    norms to fp32, as QLoRA does.

    With `fp32_residual` (PEFT's prepare_model_for_kbit_training policy), fp32 norms turn the
    residual stream fp32, so dense layers left unquantized (the output head) go to fp32 too: the
    logits are then made in fp32 directly, which the loss needs anyway (a 16-bit head would add a
    16-bit copy of them). MoE routers (`MixtralTopKRouter`, ...: a bare weight, not an
    `nn.Linear`) read that stream too, so they go to fp32 as well (a 16-bit router fails on fp32
    hidden states). Without it, the norms compute in fp32 and return their input's dtype, so the
    stream stays in the model's dtype (half the activation bytes, no casts between layers), and
    the other dense layers keep theirs.
    Saved modules go to fp32 whole: their parameters are trained, as the adapters are, in fp32.
    """
    for name, param in model.named_parameters():
        lora = ".lora_A." in f".{name}" or ".lora_B." in f".{name}"
        param.requires_grad_(lora or inside(name.rpartition(".")[0], saved))
    kinds = linear_kinds()
    for name, module in model.named_modules():
        # LoRALinear (a linear kept dense): all fp32; QLoRALinear and LoRA16Linear keep their base
        dense = isinstance(module, kinds) and not isinstance(module, (QLoRALinear, LoRA16Linear))
        kind = type(module).__name__.lower()
        if "norm" in kind or name in saved or (fp32_residual and (dense or "router" in kind)):
            module.float()
        if "norm" in kind and not fp32_residual:
            module.register_forward_hook(_to_input_dtype)


def _to_input_dtype(module: nn.Module, args: tuple, output):
    """A forward hook: an fp32 norm's output back in its input's dtype (`fp32_residual=False`)."""
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output


class QLoRAHandle:
    """`model.qlora`: what compile() did, and the training pieces it attached."""

    def __init__(
        self, model: nn.Module, config: QLoRAConfig, report: Report, modules_to_save: list[str] = ()
    ):
        self._model = model
        self.config = config
        self.modules_to_save = list(
            modules_to_save
        )  # full names: dense, trained in full, saved with the adapter
        self._report = report
        self._optimizer: torch.optim.Optimizer | None = None
        self._hooks = None
        self.backend = None  # compile(distributed=True): what `distributed.shard` compiles the blocks with
        self.mesh = None  # the device mesh `distributed.shard` sharded the model over
        self.bytes_read: dict[str, int] = {}  # shard() of a model built on meta: bytes each rank read
        if config.step_in_backward:
            self.optimizer  # noqa: B018 (registers the hooks before the first backward)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._model.parameters() if p.requires_grad]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """`qlora_compile.optim.PagedAdamW` over the trainable parameters (LoRA, modules_to_save), from the config (made on first
        use; at once with `step_in_backward`, whose hooks must exist before the first backward)."""
        if self._optimizer is None:
            from .optim import PagedAdamW, step_in_backward

            c = self.config
            self._optimizer = PagedAdamW(
                self.trainable_parameters(),
                lr=c.lr,
                weight_decay=c.weight_decay,
                optim_bits=c.optim_bits,
                device_budget=c.device_budget if c.paged else None,
            )
            if c.step_in_backward:
                self._hooks = step_in_backward(
                    self.trainable_parameters(),
                    self._optimizer,
                    max_grad_norm=c.max_grad_norm,
                    per_parameter=c.clip_per_parameter,
                )
        return self._optimizer

    def reset_optimizer(self) -> None:
        """Drop the optimizer (and its step-in-backward hooks): the next `optimizer` is built over
        the parameters the model has then (`load_adapter` calls this when it re-creates adapters
        at another rank). Its states are lost."""
        if self._hooks is not None:
            self._hooks.remove()
        self._optimizer, self._hooks = None, None
        if self.config.step_in_backward:
            self.optimizer  # noqa: B018 (hooks on the new parameters before the next backward)

    def step(self) -> float:
        """Clip gradients to `max_grad_norm`, step the optimizer, zero the gradients; returns the
        global gradient norm (before clipping). With `step_in_backward` the steps already happened
        in backward: this only returns the norm of the gradients they used."""
        optimizer = self.optimizer
        if self.config.step_in_backward:
            return self._hooks.grad_norm()
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm
        if max_norm is None or self.config.clip_per_parameter:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            for p in params if max_norm is not None else ():
                torch.nn.utils.clip_grad_norm_(p, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # sharded (FSDP2) gradients are DTensors: their norm is the global one, replicated
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def report(self) -> Report:
        """What compile did, with the trainable parameters counted as the model has them now."""
        model, r = self._model, self._report
        r.modules_to_save = {
            n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in self.modules_to_save
        }
        r.trainable = sum(p.numel() for p in self.trainable_parameters())
        return r

    def save_adapter(self, directory: str | Path) -> Path:
        """PEFT's format. Sharded: every rank must call it (the weights are gathered), rank 0 writes."""
        from .adapters import save_adapter

        path = save_adapter(self._model, directory)
        if self.mesh is not None:
            torch.distributed.barrier()  # the other ranks return once rank 0 has written
        return path

    def save_checkpoint(self, directory: str | Path) -> Path:
        """The training state (trainable parameters, optimizer states and step, RNG) through
        `torch.distributed.checkpoint`, on every rank (`qlora_compile.distributed.save_checkpoint`)."""
        from .distributed import save_checkpoint

        return save_checkpoint(self._model, directory)

    def load_checkpoint(self, directory: str | Path) -> int:
        """Restore `save_checkpoint`'s folder on every rank; returns the optimizer step saved."""
        from .distributed import load_checkpoint

        return load_checkpoint(self._model, directory)


def compile(  # noqa: A001
    model: nn.Module, config: QLoRAConfig | None = None, *, distributed: bool = False, **overrides
) -> nn.Module:
    """Make `model` QLoRA-trainable and compiled, in place; returns the same object.

    Args:
        model: any nn.Module; Hugging Face models keep `generate()` and Trainer support.
        config: a QLoRAConfig (default: the paper's settings).
        distributed: prepare the model (4-bit storage, LoRA) but leave torch.compile to
            `qlora_compile.distributed.shard`, which compiles each block after `fully_shard`.
        **overrides: QLoRAConfig fields to change, e.g. `r=16, backend="aot_eager"`.

    Raises:
        ValueError: no eligible linear layer, a target name that does not exist, or a model that
            is already compiled.
    """
    from .passes import make_backend

    config = (config or QLoRAConfig()).with_overrides(**overrides)
    # QuantizedExperts alone may come from load_quantized, like QuantizedLinear: compiled as they are
    if hasattr(model, "qlora") or any(isinstance(m, LoRALayer) for m in model.modules()):
        raise InvalidArgumentError("model was already processed by qlora_compile.compile")
    compiled = getattr(model.forward, "_torchdynamo_orig_callable", None) is not None
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or model._compiled_call_impl or compiled:
        raise InvalidArgumentError(
            "model is already torch.compile'd: pass the original module to qlora_compile.compile"
        )
    saved = saved_modules(model, config)
    report = prepare_model(model, config)
    if not report.rewritten:
        reasons = (
            "; ".join(f"{r.name}: {r.skipped}" for r in report.skipped)
            or "no nn.Linear/Conv1D/experts selected"
        )
        raise InvalidArgumentError(f"no eligible linear layer to quantize ({reasons})")
    model.qlora = QLoRAHandle(model, config, report, saved)
    _warn_backend_bugs(model, config.backend)
    backend = make_backend(config, report)
    if distributed:  # compiled after sharding: Dynamo breaks the graph at FSDP's hooks otherwise
        model.qlora.backend = backend
        return model
    report.compiled_blocks = compile_model(model, backend, config.compile_scope, dynamic=config.dynamic)
    report.fused_loss = fused_loss_applies(model, config) and fuse_causal_lm_loss(model)
    return model


def fused_loss_applies(model: nn.Module, config: QLoRAConfig) -> bool:
    """Does compile() fuse `model`'s head and loss (`qlora_compile.loss`)? With `fused_loss`, for a
    model of a family it knows, when the layers are compiled and the head and loss run as they are
    around them (compile_scope="layers")."""
    return (
        config.fused_loss
        and config.compile_scope == "layers"
        and bool(repeated_blocks(model))
        and fusable_head(model) is not None
    )


def compile_model(model: nn.Module, backend, scope: str, dynamic: bool | None = None) -> int:
    """torch.compile `model` in place with `backend` (and torch.compile's `dynamic`), as
    `compile_scope` `scope` says: its repeated blocks ("layers", when it has them) or its whole
    forward. Returns how many blocks share the compiled code (0: the whole model).
    `qlora_compile.inspect` traces through this too.
    """
    blocks = repeated_blocks(model) if scope == "layers" else []
    # transformers' input-requires-grad hook (gradient_checkpointing_enable turns it on, as PEFT's
    # prepare_model_for_kbit_training does): with the whole model compiled it stays off, Dynamo
    # would break the graph at it. With the blocks compiled it is on: the first block's input
    # would need no gradient (the embeddings are frozen) and every other block's would, two
    # compiled variants of one block; the hook makes one serve all, for the first block's input
    # gradient. It runs outside the compiled blocks.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
        if blocks:
            model.enable_input_require_grads()
    if not blocks:
        _compile_forward(model, backend, dynamic)
        return 0
    compile_blocks(blocks, backend, dynamic)
    no_cache_by_default(model)
    return len(blocks)


def prepare_model(model: nn.Module, config: QLoRAConfig, quantize: Quantize | None = None) -> Report:
    """compile()'s changes to the module tree, without Dynamo: the storage rewrite, LoRA on the
    linears kept dense, freezing and fp32 norms, gradient checkpointing. `quantize`: as
    `rewrite_storage` takes it (`qlora_compile.inspect` runs this on meta models)."""
    saved = saved_modules(model, config)
    dense = dense_lora_targets(model, config)  # before the rewrite: after it, 4-bit layers are not nn.Linear
    report = Report(rewrite_storage(model, config, quantize))
    report.dense_lora = add_dense_lora(model, config, dense)
    _freeze_and_upcast_norms(model, saved, config.fp32_residual)
    checkpointing = config.gradient_checkpointing and config.activation_memory_budget is None
    if checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        _enable_checkpointing(model)
    return report


# Models a backend computes wrong on the torch we test, with or without us (README, "Tested model
# families"): (model_type, which configs, backend, what goes wrong and what to do).
_BACKEND_BUGS = (
    (
        "falcon",
        lambda c: getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False),
        "inductor",
        "Inductor (torch 2.13) computes the gradients of a multi-query Falcon's attention wrong, "
        "with or without qlora_compile; train it with backend='aot_eager'",
    ),
)


def _warn_backend_bugs(model: nn.Module, backend: str) -> None:
    config = getattr(model, "config", None)
    for model_type, applies, bad_backend, message in _BACKEND_BUGS:
        if backend == bad_backend and getattr(config, "model_type", None) == model_type and applies(config):
            logger.warning(message)


def _enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face's own non-reentrant checkpointing (its input-requires-grad hook is
    `compile_model`'s to keep or remove), the KV cache off for training forwards (as QLoRA's
    scripts do)."""
    with warnings.catch_warnings():  # transformers' own rename notice, nothing the user can act on
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Training forwards would warn "use_cache=True is incompatible with gradient checkpointing"
    # through a logger, which Dynamo cannot trace: it falls back to eager for the whole forward.
    no_cache_by_default(model)


def no_cache_by_default(model: nn.Module) -> None:
    """`config.use_cache = False` everywhere in the tree: forwards that do not ask for a KV cache
    get none (training forwards have no use for one). generate() still caches: it reads
    generation_config.use_cache. Encoder-decoders (T5) give their stacks configs of their own, so
    every config in the tree is set."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, which `compile_scope="layers"` compiles: the entries of each
    outermost `nn.ModuleList` whose entries share one class and hold a 4-bit or LoRA layer
    (decoder layers, T5 blocks, encoder and decoder stacks). Empty for a model without one."""
    ours = (LoRALayer, QuantizedLinear, _experts.QuantizedExperts)
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or inside(name, taken):
            continue
        if len({type(m) for m in module}) == 1 and any(isinstance(m, ours) for m in module.modules()):
            blocks.extend(module)
            taken.append(name)
    return blocks


def compile_blocks(blocks: list[nn.Module], backend, dynamic: bool | None = None) -> None:
    """Regional compilation: one compiled function serves every block of the model.

    It takes the block as its first argument, so Dynamo traces it as an input and the code
    compiled for one block is reused by every block of the same structure (a recompile only for
    another structure, another input's requires_grad or dynamic sizes). Its code object is this
    model's own (see `_unique_code`). A call that carries a KV cache runs the block as it is.
    """
    from transformers.cache_utils import Cache

    def block_forward(block, *args, **kwargs):
        return type(block).forward(block, *args, **kwargs)

    compiled = _floats_as_constants(
        torch.compile(_unique_code(block_forward, "qlora_block"), backend=backend, dynamic=dynamic)
    )

    def forward(block, *args, **kwargs):
        if any(isinstance(v, Cache) for v in (*args, *kwargs.values())):
            return type(block).forward(block, *args, **kwargs)
        return compiled(block, *args, **kwargs)

    for block in blocks:
        block.forward = types.MethodType(forward, block)


def _compile_forward(model: nn.Module, backend, dynamic: bool | None = None) -> None:
    """Replace the instance's forward by a compiled wrapper of it.

    Not `nn.Module.compile`: its entry frame is inside torch.nn, which Dynamo skips for torch.nn
    containers (an nn.Sequential would run eagerly, layer by layer). A wrapper defined here is
    traced and inlines the original forward, giving one graph; `functools.wraps` keeps the
    signature that `generate()` and Trainer inspect.
    """
    original = model.forward

    def forward(*args, **kwargs):
        return original(*args, **kwargs)

    forward = _unique_code(forward, "qlora_forward")
    functools.update_wrapper(forward, original)
    model.forward = _floats_as_constants(torch.compile(forward, backend=backend, dynamic=dynamic))


def _floats_as_constants(compiled: Callable) -> Callable:
    """`compiled`, traced with Dynamo's `specialize_float` on. With `dynamic=True` Dynamo
    otherwise makes every float attribute a graph input (`config.specialize_float` is False in
    torch 2.13): LoRA's `scaling`, the dropout's `p`, the norms' epsilon. Our passes need them as
    constants (`fuse_lora` matched no layer: 0 fusions and a second graph per block on a tiny
    Llama). They are constants of the model, so nothing is lost."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    return call


def _unique_code(fn: Callable, name: str) -> Callable:
    """`fn` with a code object of its own. Dynamo caches compiled code per code object, up to
    recompile_limit (8) variants: a wrapper shared by every model would stop compiling after the
    eighth model. Each model gets its own."""
    code = fn.__code__.replace(co_name=f"{name}_{next(_wrapper_ids)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, None, fn.__closure__)
