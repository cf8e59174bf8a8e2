"""`QLoRAConfig`: every knob of `qlora_compile.compile`, with the paper's defaults."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .codes import BLOCKSIZES, QUANT_TYPES
from .dtypes import FLOAT_DTYPES
from .errors import InvalidConfigError

FilterFn = Callable[[nn.Module, str], bool]
_BACKENDS = ("inductor", "aot_eager", "eager")
_SCOPES = ("layers", "model")
NO_QUANT = "none"  # quant_type of 16-bit LoRA: the base is not quantized


@dataclass(frozen=True)
class QLoRAConfig:
    """Configuration of `qlora_compile.compile` (defaults from Dettmers et al., 2023).

    Attributes:
        quant_type: data type of the frozen base weights: "nf4" or "fp4" (bitsandbytes' 4-bit
            types), "int4" (symmetric absmax, 15 levels; not a bitsandbytes type, so never written
            to or read from a bitsandbytes folder), or "none": no quantization, the base keeps its
            16-bit weights (`LoRA16Linear`: 16-bit LoRA with everything else as QLoRA does it, the
            paper's baseline). blocksize and double_quant do not apply to "none".
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        double_quant: quantize the absmax values too (4.127 instead of 4.5 bits per parameter).
        compute_dtype: dtype the base matmul runs in (inputs are cast to it, outputs cast back).
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator; the branch is scaled by lora_alpha / r.
        use_rslora: rank-stabilized LoRA: scale by lora_alpha / sqrt(r) instead (PEFT's rule).
        lora_dropout: dropout on the LoRA branch's input.
        lora_compute_dtype: dtype of the LoRA branch's two products: its input and the adapters
            are cast to it, as `torch.autocast` does to PEFT's layers under Trainer(bf16=True);
            the adapters, their gradients and the optimizer states stay fp32 (the master copy).
            None (default): the adapters' dtype, fp32, as PEFT computes without autocast.
        target_modules: "all-linear" (every nn.Linear and transformers Conv1D except the output
            head), a list of module names (the last component, as "q_proj", or a full path), or a
            `filter_fn(module, fqn) -> bool`. "all-linear" also quantizes the 3-D expert weights of
            transformers' mixture-of-experts modules (frozen; LoRA on them only by
            `target_parameters`); by name, "experts" (or a path) selects such a module.
        target_parameters: expert weights that get LoRA, as PEFT's `LoraConfig(target_parameters=...)`
            names them: "gate_up_proj", "down_proj" or a longer suffix of "<module path>.<parameter>".
            Needs lora_dropout=0 (PEFT's ParamWrapper refuses dropout there).
        modules_to_save: modules that stay dense (not quantized, no LoRA inside them) and train in
            full, as PEFT's `LoraConfig(modules_to_save=...)`: names matched as target_modules' names
            are (the last component, as "classifier", or a full path; a dotted suffix of the path).
            None (default): the model's task head as PEFT's task types name it, where the model has
            it: "classifier" / "score" for *ForSequenceClassification and *ForTokenClassification,
            "qa_outputs" for *ForQuestionAnswering; nothing for other models. () for none.
            A name that matches no module raises ValueError at compile, naming the closest ones.
        fp32_residual: norms in fp32 make the residual stream fp32, and the output head and other
            dense layers go to fp32 with it, as PEFT's prepare_model_for_kbit_training does
            (default). False: the norms keep fp32 weights and compute in fp32 but return their
            input's dtype, so the activations between layers stay in the model's dtype (bf16)
            and the head stays in it too (the loss still reduces in fp32).
        gradient_checkpointing: turn on the model's own (Hugging Face, non-reentrant) checkpointing.
        activation_memory_budget: instead of checkpointing whole layers, let AOTAutograd's
            partitioner choose what each compiled graph saves for backward and what it recomputes
            (`torch._functorch.config.activation_memory_budget`): the fraction, in [0, 1], of the
            activations the graph would save without recomputation that it may keep (1: recompute
            nothing; 0: as little as it can, about what checkpointing keeps). It recomputes the
            cheap ops first and keeps the matmul outputs. Set, it replaces the model's own
            checkpointing (gradient_checkpointing is then not applied). Needs backend "inductor"
            or "aot_eager". None (default): checkpointing as `gradient_checkpointing` says.
        lr, weight_decay: settings of `model.qlora.optimizer` (a `qlora_compile.optim.PagedAdamW`).
        max_grad_norm: `model.qlora.step()` clips gradients to this global norm; None: no clipping.
        paged: page optimizer states out of device memory beyond `device_budget`.
        optim_bits: 32 or 8-bit optimizer states (8: bitsandbytes' blockwise AdamW8bit scheme).
        device_budget: with `paged`, the most bytes of optimizer state kept on the device (the rest
            in pinned host memory on CUDA, a memory-mapped file on CPU); None: no limit.
        step_in_backward: step each parameter inside backward as soon as its gradient is ready and
            free that gradient (`qlora_compile.optim.step_in_backward`); needs max_grad_norm=None
            or clip_per_parameter=True.
        clip_per_parameter: clip each parameter's gradient to max_grad_norm on its own instead of
            by the global norm.
        backend: what compiles the graph after our passes: "inductor", "aot_eager" or "eager".
        compile_scope: "layers" (default): regional compilation. Each repeated block of the model
            (the classes transformers lists in `_no_split_modules`, such as LlamaDecoderLayer) is
            compiled once, and that code serves every layer of the same structure; the embeddings,
            final norm, head and loss run as they are. Forwards that carry a KV cache (`generate()`)
            run the blocks uncompiled: Dynamo specializes a block on its cache slot, so one
            compiled block cannot serve every layer there. A model without such blocks is
            compiled whole. "model": one graph of the whole forward, `generate()` included
            (compile time grows with depth).
        dynamic: torch.compile's `dynamic`: None (default) compiles the first shape static and
            recompiles once with symbolic sizes at the second; True compiles symbolic sizes at
            once (one graph for every batch and sequence size; `qlora-compile train` uses it);
            False specializes on every shape.
        fused_loss: with compile_scope="layers", a causal LM of a family in
            `qlora_compile.loss.FUSED_LOSS_MODELS` (Llama, Mistral, Qwen2/3, Phi-3) computes its
            training loss with the output head and the cross-entropy fused, over chunks of
            tokens, without the full logits (`qlora_compile.loss`); such a forward returns
            `logits=None`. Calls without labels, in eval mode or without gradients are unchanged.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_compute_dtype: torch.dtype | None = None
    use_rslora: bool = False
    target_modules: str | Sequence[str] | FilterFn = "all-linear"
    target_parameters: Sequence[str] = ()
    modules_to_save: Sequence[str] | None = None
    fp32_residual: bool = True
    gradient_checkpointing: bool = True
    activation_memory_budget: float | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 0.3
    paged: bool = True
    optim_bits: int = 32
    device_budget: int | None = None
    step_in_backward: bool = False
    clip_per_parameter: bool = False
    backend: str = "inductor"
    compile_scope: str = "layers"
    dynamic: bool | None = None
    fused_loss: bool = True

    def __post_init__(self) -> None:
        _one_of("quant_type", self.quant_type, (*QUANT_TYPES, NO_QUANT))
        _one_of("blocksize", self.blocksize, BLOCKSIZES)
        _one_of("compute_dtype", self.compute_dtype, tuple(FLOAT_DTYPES.values()))
        _one_of("lora_compute_dtype", self.lora_compute_dtype, (None, *FLOAT_DTYPES.values()))
        _one_of("optim_bits", self.optim_bits, (32, 8))
        _one_of("backend", self.backend, _BACKENDS)
        _one_of("compile_scope", self.compile_scope, _SCOPES)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise InvalidConfigError(f"r must be a positive int, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise InvalidConfigError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.lr > 0:
            raise InvalidConfigError(f"lr must be positive, got {self.lr!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidConfigError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.device_budget is not None:
            if (
                isinstance(self.device_budget, bool)
                or not isinstance(self.device_budget, int)
                or self.device_budget <= 0
            ):
                raise InvalidConfigError(
                    f"device_budget must be a positive int (bytes) or None, got {self.device_budget!r}"
                )
            if not self.paged:
                raise InvalidConfigError("device_budget needs paged=True")
        if self.step_in_backward and self.max_grad_norm is not None and not self.clip_per_parameter:
            raise InvalidConfigError(
                "step_in_backward steps each parameter before the other gradients exist, so global-norm "
                "clipping (max_grad_norm) is impossible: set clip_per_parameter=True to clip each "
                "gradient on its own, or max_grad_norm=None"
            )
        budget = self.activation_memory_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 <= budget <= 1:
                raise InvalidConfigError(
                    f"activation_memory_budget must be in [0, 1] or None, got {budget!r}"
                )
            if self.backend == "eager":
                raise InvalidConfigError(
                    "activation_memory_budget is applied by AOTAutograd's partitioner: it needs backend "
                    "'inductor' or 'aot_eager', not 'eager'"
                )
        if self.weight_decay < 0:
            raise InvalidConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check_target_parameters(self)
        if self.quant_type == NO_QUANT and self.target_parameters:
            raise InvalidConfigError(
                "quant_type='none' keeps MoE expert weights as they are, without LoRA: target_parameters "
                f"{list(self.target_parameters)} needs a 4-bit quant_type"
            )
        _check_modules_to_save(self)
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                raise InvalidConfigError(
                    f"target_modules must be 'all-linear', a list of names or a filter_fn; got {targets!r}"
                )
        elif not callable(targets):
            if not all(isinstance(t, str) for t in targets) or not targets:
                raise InvalidConfigError(f"target_modules list must hold module names, got {targets!r}")
            object.__setattr__(self, "target_modules", tuple(targets))

    @property
    def scaling(self) -> float:
        from .lora import lora_scaling

        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def lora_kwargs(self) -> dict:
        """The `QLoRALinear` keyword arguments this config sets."""
        return dict(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            compute_dtype=self.compute_dtype,
            lora_compute_dtype=self.lora_compute_dtype,
        )

    def with_overrides(self, **overrides) -> QLoRAConfig:
        """A copy with some fields changed (unknown names raise TypeError listing the known ones)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown QLoRAConfig field(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)


def _check_target_parameters(config: QLoRAConfig) -> None:
    names = config.target_parameters
    if isinstance(names, str) or not all(isinstance(t, str) and t for t in names):
        raise InvalidConfigError(f"target_parameters must be a list of parameter names, got {names!r}")
    object.__setattr__(config, "target_parameters", tuple(names))
    if names and config.lora_dropout:
        raise InvalidConfigError(
            f"target_parameters needs lora_dropout=0 (got {config.lora_dropout}): PEFT folds the experts' "
            "update into their weights (ParamWrapper), where dropout cannot apply, and refuses such an adapter"
        )


def _check_modules_to_save(config: QLoRAConfig) -> None:
    names = config.modules_to_save
    if names is None:
        return
    if isinstance(names, str) or not all(isinstance(t, str) and t for t in names):
        raise InvalidConfigError(f"modules_to_save must be a list of module names or None, got {names!r}")
    object.__setattr__(config, "modules_to_save", tuple(names))


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise InvalidConfigError(f"{name} must be one of {allowed}, got {value!r}")
