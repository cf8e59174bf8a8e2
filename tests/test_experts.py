"""Mixture-of-experts models: the 3-D expert weights are stored in 4-bit per expert, LoRA on them
as PEFT's `target_parameters`, exact against a dense reference and PEFT.

transformers + bitsandbytes is no oracle for the experts: transformers 5.24's bitsandbytes 4-bit
quantizer replaces `nn.Linear` modules only, so it leaves the 3-D expert parameters dense in
their load dtype (tested below, on CPU). The experts' references are the format itself
(`quantize_weight` and bitsandbytes' `quantize_4bit` of each expert's matrix) and the same model
with the dequantized experts put back, run by transformers' own experts code.
"""

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn.utils import parametrize

import qlora_compile
from qlora_compile import QLoRAConfig, QLoRALinear, quantize_weight
from qlora_compile.experts import QuantizedExperts
from tests.bnb_oracle import quantize as bnb_quantize
from tests.models import build, graphs_without_us, train_steps

EXPERTS = ["gate_up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FAST = {"backend": "aot_eager", "r": 4, "lora_alpha": 8, "compute_dtype": torch.float32, "lora_dropout": 0.0}
SMALL = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts_per_tok": 2}  # fmt: skip
FAMILIES = {
    "mixtral": lambda n: transformers.MixtralConfig(
        **{**SMALL, "num_hidden_layers": n}, intermediate_size=128, num_local_experts=4
    ),
    "qwen3_moe": lambda n: transformers.Qwen3MoeConfig(
        **{**SMALL, "num_hidden_layers": n}, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        head_dim=16, norm_topk_prob=True,
    ),
}  # fmt: skip


def moe_model(family: str, layers: int = 2) -> nn.Module:
    return build(FAMILIES[family](layers), seed=None)


def save_moe(path, family: str):
    """A random MoE model of these configs (1 layer; gpt-oss: 2), fp32, as transformers'
    `save_pretrained` writes it (per expert for Mixtral and Qwen3-MoE, 3-D for gpt-oss); returns
    the model."""
    torch.manual_seed(0)
    if family in OTHER_FAMILIES:
        model = transformers.AutoModelForCausalLM.from_config(OTHER_FAMILIES[family]()).float()
    else:
        model = moe_model(family, layers=1)
    model.save_pretrained(path)
    return model


def experts_modules(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "has_gate")}  # transformers' experts


def randomize_lora(model) -> None:
    """Nonzero lora_B everywhere (PEFT starts it at zero, which would hide the LoRA path)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)


class _Fold(nn.Module):
    """W + scaling * B A (per expert for a 3-D weight), differentiable in A and B."""

    def __init__(self, layer, experts: bool, transposed: bool = False):
        super().__init__()
        self.A = nn.Parameter(layer.lora_A.weight.detach().clone())
        self.B = nn.Parameter(layer.lora_B.weight.detach().clone())
        self.scaling, self.layer, self.transposed = layer.scaling, layer if experts else None, transposed

    def forward(self, w):
        if self.layer is None:
            return w + self.scaling * (self.B @ self.A)
        e, r = self.layer.num_experts, self.layer.r
        a = self.A.view(e, r, -1)
        b = self.B.view(self.B.shape[0], r, e).permute(2, 0, 1)
        delta = torch.bmm(b, a)  # (E, out, in)
        return w + self.scaling * (delta.transpose(1, 2) if self.transposed else delta)


def dense_reference(original: nn.Module, compiled: nn.Module) -> tuple[nn.Module, dict[str, _Fold]]:
    """`original` with each 4-bit weight of `compiled` dequantized and put back, its LoRA folded
    into the weight by a parametrization; returns the model and its folds by compiled name."""
    ref = copy.deepcopy(original).train()
    ref.requires_grad_(False)
    folds = {}
    for name, m in compiled.named_modules():
        if isinstance(m, QLoRALinear):
            target, pname, w = ref.get_submodule(name), "weight", m.quantized_weight.dequantize(torch.float32)
        elif isinstance(m, QuantizedExperts):
            parent, _, pname = name.rpartition(".")
            target, w = ref.get_submodule(parent), m.dequantize(torch.float32)
            w = w.transpose(1, 2) if target.is_transposed else w  # stored (E, in, out) there
        else:
            continue
        getattr(target, pname).data.copy_(w)
        if m.lora_A is not None:
            folds[name] = _Fold(m, isinstance(m, QuantizedExperts), getattr(target, "is_transposed", False))
            parametrize.register_parametrization(target, pname, folds[name])
    return ref, folds


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_bytes_are_quantize_weight_and_bitsandbytes_per_expert(family):
    model = moe_model(family)
    dense = {
        n: {p: getattr(m, p).detach().clone() for p in EXPERTS} for n, m in experts_modules(model).items()
    }
    qlora_compile.compile(model, **FAST)
    for name, module in experts_modules(model).items():
        for pname in EXPERTS:
            stored = getattr(module, pname)
            assert isinstance(stored, QuantizedExperts) and stored.lora_A is None  # no target_parameters
            for e, w in enumerate(dense[name][pname]):
                ours, theirs = stored.quantized_weight(e), quantize_weight(w)
                for a, b in zip(ours.op_args(), theirs.op_args(), strict=True):
                    assert torch.equal(a.reshape(-1), b.reshape(-1))
                packed, state, _ = bnb_quantize(w, "nf4", 64, True)
                assert torch.equal(ours.packed.view(-1), packed.view(-1))
                assert torch.equal(ours.absmax, state.absmax)
                assert torch.equal(ours.nested_absmax, state.state2.absmax)
                assert ours.offset.item() == state.offset.item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_embeddings_norms_routers_and_head_stay_dense(family):
    model = moe_model(family)
    before = sum(p.numel() for p in model.parameters())
    qlora_compile.compile(model, **FAST)
    report = model.qlora.report()
    experts = [r for r in report.rewritten if r.kind.endswith("Experts")]
    assert len(experts) == 2 * 2  # gate_up_proj and down_proj of 2 layers
    assert sum(r.bytes_before for r in experts) == 4 * sum(
        m.dequantize().numel() for m in model.modules() if isinstance(m, QuantizedExperts)
    )
    assert all(r.bytes_after == model.get_submodule(r.name).nbytes for r in experts)
    frozen = [
        (n, t)
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.dtype.is_floating_point and not t.requires_grad
    ]
    statistics = ("weight_nested_absmax", "weight_offset")  # the 4-bit format's fp32 statistics
    dense = [n for n, _ in frozen if not n.endswith(statistics)]
    allowed = ("embed_tokens.weight", "norm.weight", "mlp.gate.weight", "lm_head.weight", "inv_freq")
    assert dense and all(n.endswith(allowed) for n in dense), dense
    left = sum(t.numel() for n, t in frozen if n in dense and not n.endswith("inv_freq"))
    assert left < before / 2  # the experts held most of the parameters


def check_dense_reference(original, seq_len: int = 12, **overrides):
    """Compile a copy of `original` with LoRA on its experts; its logits and LoRA gradients equal
    the dense reference's (fp32). Returns (the compiled model, the reference's folds)."""
    model = copy.deepcopy(original)
    ids = torch.randint(0, 128, (2, seq_len))
    qlora_compile.compile(model, **{**FAST, **overrides}, target_parameters=EXPERTS)
    randomize_lora(model)
    ref, folds = dense_reference(original, model)
    model.train()
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    expected = ref(ids, labels=ids, use_cache=False)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits, atol=2e-5, rtol=1e-5)
    for name, fold in folds.items():
        layer = model.get_submodule(name)
        for ours, theirs in (
            (layer.lora_A.weight.grad, fold.A.grad),
            (layer.lora_B.weight.grad, fold.B.grad),
        ):
            assert theirs.abs().sum() > 0
            assert (ours - theirs).norm() <= 1e-4 * theirs.norm(), name
    return model, folds


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_lora_grads_equal_the_dense_reference(family):
    model, _ = check_dense_reference(moe_model(family))
    assert sum(isinstance(m, QuantizedExperts) and m.lora_A is not None for m in model.modules()) == 4


OTHER_FAMILIES = {
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, intermediate_size=32, num_experts=4),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **SMALL, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4
    ),
    # experts stored (E, in, out), biases, an interleaved clamped gate (its own _apply_gate)
    "gpt_oss": lambda: transformers.GptOssConfig(
        **SMALL, intermediate_size=64, head_dim=16, num_local_experts=4, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_families_equal_the_dense_reference(family):
    original = transformers.AutoModelForCausalLM.from_config(OTHER_FAMILIES[family]()).float()
    with torch.no_grad():
        for name, p in original.named_parameters():
            if name.endswith("proj_bias"):  # gpt-oss's expert biases start at zero
                p.normal_(0, 0.02)
    plain = copy.deepcopy(original).train()
    model, folds = check_dense_reference(original)
    ids = torch.randint(0, 128, (2, 12))
    graphs = graphs_without_us(plain, model, lambda m: m(ids, labels=ids, use_cache=False))
    assert len(folds) > 8 and model.qlora.report().graphs == graphs


def test_no_graph_break_added():
    model = moe_model("mixtral")
    ids = torch.randint(0, 128, (2, 12))
    reference = copy.deepcopy(model).train()
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    qlora_compile.compile(model, **FAST, target_parameters=EXPERTS)
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    graphs = graphs_without_us(reference, model, lambda m: m(ids, labels=ids, use_cache=False))
    assert model.qlora.report().graphs == graphs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_falls_over_20_steps(family):
    model = moe_model(family)
    ids = torch.randint(0, 128, (4, 16))
    qlora_compile.compile(model, **{**FAST, "lr": 1e-2}, target_parameters=EXPERTS)
    model.train()
    losses = train_steps(model, [{"input_ids": ids, "labels": ids, "use_cache": False}] * 20)
    assert losses[-1] < 0.85 * losses[0] and all(
        b < a for a, b in zip(losses[:-1], losses[1:], strict=True)
    ), losses
    grads_seen = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert all(m.lora_B.weight.abs().sum() > 0 for m in grads_seen)  # every expert stack trained


@pytest.mark.slow
def test_inductor_compiles_forward_and_backward():
    """Inductor (the default backend) on a 1-layer Mixtral: its C++ compile took 49 s here."""
    model, _ = check_dense_reference(moe_model("mixtral", layers=1), seq_len=8, backend="inductor")
    assert model.qlora.report().graphs == 1


def peft_dense(original, compiled, config: QLoRAConfig):
    """PEFT on `original` with the 4-bit weights of `compiled` dequantized and put back."""
    dense, folds = dense_reference(original, compiled)
    for name in folds:  # plain dense weights: PEFT brings its own LoRA
        parent, _, pname = name.rpartition(".") if name.endswith(tuple(EXPERTS)) else (name, "", "weight")
        parametrize.remove_parametrizations(dense.get_submodule(parent), pname, leave_parametrized=False)
    lora = LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        target_modules=ATTENTION, target_parameters=list(config.target_parameters),
    )  # fmt: skip
    return dense, lora


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_round_trips_with_peft(family, tmp_path):
    original = moe_model(family)
    model = copy.deepcopy(original)
    ids = torch.randint(0, 128, (2, 12))
    config = QLoRAConfig(**FAST, target_parameters=EXPERTS)
    qlora_compile.compile(model, config)
    randomize_lora(model)
    model.train()
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
    # ours -> PEFT
    model.qlora.save_adapter(tmp_path / "ours")
    dense, lora = peft_dense(original, model, config)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / "ours").train()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids, use_cache=False).logits, ours, atol=2e-5, rtol=1e-5)
    # PEFT -> ours
    peft_model = get_peft_model(copy.deepcopy(dense), lora)
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    fresh = copy.deepcopy(original)
    qlora_compile.compile(fresh, config)
    qlora_compile.load_adapter(fresh, tmp_path / "peft")
    fresh.train()
    with torch.no_grad():
        expected = peft_model.train()(ids, use_cache=False).logits
        torch.testing.assert_close(fresh(ids, use_cache=False).logits, expected, atol=2e-5, rtol=1e-5)


def test_bitsandbytes_leaves_experts_dense(tmp_path):
    """transformers 5 + bitsandbytes on CPU quantizes the attention linears, not the 3-D experts,
    and its save_pretrained writes them dense, per expert (no quant state for them)."""
    from safetensors import safe_open

    model = moe_model("mixtral")
    model.save_pretrained(tmp_path / "src")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "src", device_map="cpu", quantization_config=bnb
    )
    experts = loaded.model.layers[0].mlp.experts
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.dim() == 3
    loaded.save_pretrained(tmp_path / "bnb")
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        expert_keys = [k for k in f.keys() if ".experts." in k]
        assert any(k.startswith("model.layers.0.self_attn.q_proj.weight.quant_state.") for k in f.keys())
        assert len(expert_keys) == 2 * 4 * 3  # w1, w2, w3 of 4 experts in 2 layers, nothing else
        assert all(k.endswith(("w1.weight", "w2.weight", "w3.weight")) for k in expert_keys)
        assert all(f.get_slice(k).get_dtype() == "F32" for k in expert_keys)


def test_target_parameters_validation():
    with pytest.raises(ValueError, match="lora_dropout=0"):
        QLoRAConfig(target_parameters=["gate_up_proj"])
    with pytest.raises(ValueError, match="list of parameter names"):
        QLoRAConfig(target_parameters="gate_up_proj", lora_dropout=0.0)
    with pytest.raises(ValueError, match=r"match no 3-D expert weight.*down_proj"):
        qlora_compile.compile(moe_model("mixtral"), **FAST, target_parameters=["w1"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inspect_and_plan_count_the_experts(family, tmp_path):
    """`inspect` (from config.json alone) gives the real compile's rewrite rows, expert weights
    included, and its graph; `plan`'s parameter and buffer bytes equal the compiled model's."""
    from qlora_compile.inspect import inspect_model, rewrite_rows
    from qlora_compile.plan import plan_memory

    hf_config = FAMILIES[family](2)
    hf_config.architectures = [type(moe_model(family, 1)).__name__]
    hf_config.to_json_file(tmp_path / "config.json")
    config = QLoRAConfig(**FAST, target_parameters=EXPERTS)
    result = inspect_model(tmp_path / "config.json", layers=None, seq_len=12, dtype="float32", config=config)
    model = moe_model(family)
    qlora_compile.compile(model, config)
    model.train()
    ids = torch.randint(0, 128, (1, 12))
    model(ids, labels=ids, use_cache=False).loss.backward()
    report = model.qlora.report()
    assert result["rewrites"] == rewrite_rows(report.rewrites)
    experts = [r for r in result["rewrites"] if r["name"].endswith(tuple(EXPERTS))]
    assert len(experts) == 4 and all(len(r["shape"]) == 3 and r["status"] == "quantized" for r in experts)
    assert result["totals"]["bytes_after"] == report.totals()["bytes_after"]
    assert result["totals"]["graphs"] == report.graphs == 1 and not result["graph_breaks"]
    # one graph serves both layers: gate_up_proj and down_proj, each with its LoRA products
    assert result["graphs"][0]["our_ops"]["qlora::experts_linear"] == 2
    assert result["graphs"][0]["our_ops"]["qlora::grouped_mm"] == 4

    plan = plan_memory(tmp_path / "config.json", gpu_memory=10**9, r=4, dtype="float32")
    plain = moe_model(family)
    qlora_compile.compile(plain, r=4, backend="eager")
    tensors = {id(t): t for t in [*plain.parameters(), *plain.buffers()]}.values()
    assert plan.persistent_bytes == sum(t.numel() * t.element_size() for t in tensors)
    packed = sum(m.weight_packed.numel() for m in plain.modules() if hasattr(m, "weight_packed"))
    assert plan.persistent["4-bit weights"] == packed


def test_bf16_model_trains_with_its_router_in_fp32():
    """compile makes the residual stream fp32 (fp32 norms); the router, a bare weight beside the
    experts, goes to fp32 with it (in bf16 its product with fp32 hidden states raised)."""
    model = moe_model("mixtral", layers=1).to(torch.bfloat16)
    qlora_compile.compile(model, **{**FAST, "compute_dtype": torch.bfloat16})
    model.train()
    ids = torch.randint(0, 128, (2, 12))
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # embeddings stay as loaded
