"""The reference stack as a test oracle: a small random Llama (or any saved HF model), our
compiled copy of it, and the same weights in transformers + bitsandbytes 4-bit (+ PEFT LoRA).

bitsandbytes repacks 4-bit weights for its CPU kernel, rounding absmax to bf16, on its first
eval-mode forward on AVX512-BF16 CPUs; compare with it in train mode (dropout 0) to stay on its
exact path.
"""

import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils.other import ModulesToSaveWrapper

import qlora_compile
from qlora_compile.lora import LoRALayer
from tests.models import save_tiny

R, ALPHA = 8, 16


def llama_folder(path):
    """A small random Llama saved as an HF folder at `path`."""
    return save_tiny(
        path, "llama", vocab_size=256, hidden_size=128, intermediate_size=256, max_position_embeddings=128
    )


def classifier_folder(path):
    """A small random RoBERTa sequence classifier (3 labels, dropout 0) saved as an HF folder at `path`."""
    return save_tiny(
        path, "roberta", vocab_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def t5_folder(path):
    """A small random T5 (its feed-forward output `wo` stays dense: `_keep_in_fp32_modules`) at `path`."""
    return save_tiny(
        path, "t5", vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_decoder_layers=1, dropout_rate=0.0
    )


def ours(base_dir, seed=1, model_cls=transformers.AutoModelForCausalLM, dtype=torch.float32, **overrides):
    """Our compiled `model_cls` of `base_dir` (loaded in `dtype`, fp32 compute unless overridden,
    r=R, alpha=ALPHA, no dropout), lora_B random."""
    model = model_cls.from_pretrained(base_dir, dtype=dtype)
    settings = dict(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, compute_dtype=torch.float32,
        backend="aot_eager", gradient_checkpointing=False,
    )  # fmt: skip
    qlora_compile.compile(model, **{**settings, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer):  # a non-zero B, so the branch matters (4-bit or dense base)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
    return model.train()


def bnb_base(base_dir, model_cls=transformers.AutoModelForCausalLM, skip_modules=None):
    """transformers + bitsandbytes 4-bit (NF4, double quant, fp32 compute); `skip_modules` stay dense
    (`llm_int8_skip_modules`, as the QLoRA recipe keeps a classifier head out of 4-bit)."""
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip_modules,
    )  # fmt: skip
    return model_cls.from_pretrained(
        base_dir, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )


def peft_lora_modules(model):
    """PEFT's LoRA layers of `model` by their base-model name."""
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and "default" in m.lora_A
    }


def peft_saved_modules(model):
    """The trained copies of PEFT's `modules_to_save` (ModulesToSaveWrapper) by base-model name."""
    return {
        name.removeprefix("base_model.model."): m.modules_to_save["default"]
        for name, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    }


def assert_lora_grads_match(our_model, ref, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Every LoRA A and B gradient of `our_model` equals PEFT's (`ref`) for the same module."""
    layers = dict(our_model.named_modules())
    for name, m in peft_lora_modules(ref).items():
        for ab in ("A", "B"):
            grad = getattr(layers[name], f"lora_{ab}").weight.grad
            grad_ref = getattr(m, f"lora_{ab}")["default"].weight.grad
            torch.testing.assert_close(grad, grad_ref, rtol=rtol, atol=atol, msg=f"{name}.lora_{ab}")


def as_qlora_prepares(model, dtype: torch.dtype):
    """Prepare PEFT LoRA on a 16-bit (`dtype`) base as `compile` prepares a model, in place: norms
    and output head in fp32 (as `prepare_model_for_kbit_training` leaves a 4-bit model), and each
    LoRA base layer's product in `dtype` on its input cast to `dtype`, cast back to fp32 (as
    bitsandbytes' Linear4bit does with its compute dtype; every linear reads the fp32 stream of the
    fp32 norms). The reference for `quant_type="none"` (`LoRA16Linear`)."""
    for name, m in model.named_modules():
        if "norm" in type(m).__name__.lower() or name.endswith("lm_head"):
            m.float()
    for m in peft_lora_modules(model).values():
        m.base_layer.register_forward_pre_hook(lambda _, args: (args[0].to(dtype), *args[1:]))
        m.base_layer.register_forward_hook(lambda _, args, out: out.to(torch.float32))
        assert m.base_layer.weight.dtype == dtype and m.lora_A["default"].weight.dtype == torch.float32
    return model


def peft_reference(
    base_dir,
    our_model,
    model_cls=transformers.AutoModelForCausalLM,
    target_modules="all-linear",
    modules_to_save=None,
):
    """PEFT LoRA (`target_modules`, r=R, alpha=ALPHA, dropout 0) on `bnb_base`, holding our LoRA
    weights, in train mode. Both sides must put LoRA on the same modules. `modules_to_save` stay
    dense in bitsandbytes (`llm_int8_skip_modules`) and train in full in PEFT, from our weights."""
    model = get_peft_model(
        bnb_base(base_dir, model_cls, skip_modules=modules_to_save),
        LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
        ),
    )
    layers = dict(our_model.named_modules())
    theirs = peft_lora_modules(model)
    mine = {name for name, m in layers.items() if isinstance(m, LoRALayer)}
    assert mine == set(theirs), (
        f"LoRA only here: {sorted(mine - set(theirs))}; only in PEFT: {sorted(set(theirs) - mine)}"
    )
    saved = peft_saved_modules(model)
    assert set(saved) == set(our_model.qlora.modules_to_save), (set(saved), our_model.qlora.modules_to_save)
    with torch.no_grad():
        for name, m in theirs.items():
            m.lora_A["default"].weight.copy_(layers[name].lora_A.weight)
            m.lora_B["default"].weight.copy_(layers[name].lora_B.weight)
        for name, m in saved.items():
            m.load_state_dict(layers[name].state_dict())
    return model.train()
