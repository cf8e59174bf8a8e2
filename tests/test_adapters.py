"""Adapters PEFT writes load here at PEFT's scale (rsLoRA, rank and alpha patterns), ours load in
PEFT with every layer's rank and scale, and the exports read them the same way (one reader).

The oracle is PEFT's own LoRA on the transformers + bitsandbytes 4-bit base (tests/peft_oracle.py).
"""

import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

import qlora_compile
from qlora_compile import QLoRALinear
from qlora_compile.adapters import AdapterFolder
from qlora_compile.lora import LoRALayer
from tests.peft_oracle import (
    ALPHA,
    R,
    bnb_base,
    classifier_folder,
    llama_folder,
    ours,
    peft_lora_modules,
    peft_saved_modules,
    t5_folder,
)

TOL = dict(rtol=1e-5, atol=1e-5)  # as tests/test_exactness.py
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
CASES = {
    "rslora": dict(use_rslora=True),
    "rank_pattern": dict(rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12}),
    "alpha_pattern": dict(alpha_pattern={"v_proj": 64, "^model.layers.0.mlp.up_proj": 4}),
    "rslora_and_patterns": dict(
        r=16, lora_alpha=8, use_rslora=True, rank_pattern={r"mlp\..*_proj": 4}, alpha_pattern={"o_proj": 32}
    ),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("llama"))


def peft_adapter(base_dir, path, seed=4, **lora):
    """PEFT's LoRA on the bitsandbytes base, lora_B random (so the scale matters), saved to `path`."""
    config = LoraConfig(
        **{"r": R, "lora_alpha": ALPHA, **lora}, lora_dropout=0.0, target_modules="all-linear"
    )
    model = get_peft_model(bnb_base(base_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in peft_lora_modules(model).values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return model.train()  # train mode, dropout 0: bitsandbytes' exact CPU path


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def assert_layers_like_peft(model, peft_model):
    theirs = peft_lora_modules(peft_model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert layers.keys() == theirs.keys()
    for name, m in layers.items():
        t = theirs[name]
        assert (m.r, m.lora_alpha, m.scaling) == (
            t.r["default"],
            t.lora_alpha["default"],
            t.scaling["default"],
        )
        assert m.lora_A.weight.shape == t.lora_A["default"].weight.shape, name


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_at_peft_scale(base_dir, tmp_path, case):
    lora = CASES[case]
    ref = peft_adapter(base_dir, tmp_path / case, **lora)
    model = ours(base_dir)  # r=8, alpha=16 everywhere: replaced by the load
    qlora_compile.load_adapter(model, tmp_path / case)
    assert_layers_like_peft(model, ref)
    expected = logits(ref)
    torch.testing.assert_close(logits(model), expected, **TOL)
    # the old rule (config alpha / config r everywhere) is far off: the comparison can fail
    naive = lora.get("lora_alpha", ALPHA) / lora.get("r", R)
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            m.scaling = naive
    with torch.compiler.set_stance("force_eager"):
        assert (logits(model) - expected).abs().max() > 100 * TOL["atol"]


@pytest.mark.parametrize("in_backward", [False, True], ids=["step", "step_in_backward"])
def test_rank_change_rebuilds_the_optimizer(base_dir, tmp_path, in_backward):
    peft_adapter(base_dir, tmp_path / "a", rank_pattern={"q_proj": 4})
    settings = dict(step_in_backward=True, max_grad_norm=None) if in_backward else {}
    model = ours(base_dir, **settings)
    old = model.qlora.optimizer
    qlora_compile.load_adapter(model, tmp_path / "a")
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.shape == (4, 128) and q.lora_B.weight.shape == (128, 4)
    assert q.lora_A.weight.dtype == torch.float32 and q.lora_A.weight.requires_grad
    optimizer = model.qlora.optimizer
    assert optimizer is not old
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.qlora.trainable_parameters()}
    assert len(params) == 28 and any(p is q.lora_A.weight for p in params)
    before = q.lora_A.weight.detach().clone()
    model(IDS, labels=IDS).loss.backward()  # with step_in_backward, the new hooks step here
    if not in_backward:
        model.qlora.step()
    assert not torch.equal(q.lora_A.weight, before)
    assert q.lora_A.weight.grad is None


def test_mixed_ranks_and_alphas_save_for_peft(base_dir, tmp_path):
    model = ours(base_dir)
    layers = model.model.layers
    with torch.no_grad():
        for layer, r, alpha in ((layers[0].self_attn.q_proj, 4, 16), (layers[1].mlp.down_proj, 12, 3)):
            layer.set_rank(r)
            layer.set_scale(alpha)
            layer.lora_B.weight.normal_(0, 0.05)
        layers[1].self_attn.v_proj.set_scale(64)
    qlora_compile.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (R, ALPHA, False)
    assert config["rank_pattern"] == {
        r"^model\.layers\.0\.self_attn\.q_proj": 4,
        r"^model\.layers\.1\.mlp\.down_proj": 12,
    }
    assert config["alpha_pattern"] == {
        r"^model\.layers\.1\.self_attn\.v_proj": 64,
        r"^model\.layers\.1\.mlp\.down_proj": 3,
    }
    ref = PeftModel.from_pretrained(bnb_base(base_dir), tmp_path / "ours").train()
    assert_layers_like_peft(model, ref)
    torch.testing.assert_close(logits(model), logits(ref), **TOL)


def test_rslora_config_saves_for_peft(base_dir, tmp_path):
    model = ours(base_dir, use_rslora=True)
    assert model.model.layers[0].self_attn.q_proj.scaling == ALPHA / R**0.5
    qlora_compile.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_rslora"] is True
    ref = PeftModel.from_pretrained(bnb_base(base_dir), tmp_path / "ours").train()
    assert_layers_like_peft(model, ref)
    torch.testing.assert_close(logits(model), logits(ref), **TOL)


def test_dora_is_refused(base_dir, tmp_path):
    peft_adapter(base_dir, tmp_path / "dora", use_dora=True)
    model = ours(base_dir)
    with pytest.raises(ValueError, match=r"use_dora=True is not supported \(DoRA adds a learned magnitude"):
        qlora_compile.load_adapter(model, tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        qlora_compile.export_merged(base_dir, tmp_path / "dora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_merged_of_a_peft_rslora_adapter(base_dir, tmp_path):
    ref = peft_adapter(base_dir, tmp_path / "a", use_rslora=True, alpha_pattern={"o_proj": 4})
    qlora_compile.export_merged(base_dir, tmp_path / "a", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(ref), **TOL)
    model = ours(base_dir)
    qlora_compile.load_adapter(model, tmp_path / "a")
    torch.testing.assert_close(logits(merged), logits(model), atol=2e-6, rtol=1e-5)  # as tests/export


def _folder(path, config, tensors):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_reader_patterns_follow_peft(tmp_path):
    """rank/alpha per module as PEFT's get_pattern_key picks them (first matching key, regex on the
    full name); keys with an adapter name; delta = scaling * B @ A."""
    names = ["m.layers.0.q_proj", "m.layers.1.q_proj", "m.layers.10.q_proj", "m.layers.1.mlp.up_proj"]
    rank_pattern = {"^m.layers.10.q_proj": 5, "layers.1.q_proj": 2, r"layers\.1.*": 3}
    alpha_pattern = {"up_proj": 7, "q_proj": 9}
    tensors = {}
    for name in names:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), 4)
        tensors[f"base_model.model.{name}.lora_A.default.weight"] = torch.randn(r, 16)
        tensors[f"base_model.model.{name}.lora_B.default.weight"] = torch.randn(8, r)
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    adapter = AdapterFolder(_folder(tmp_path / "a", config, tensors))
    assert [adapter.rank(n) for n in names] == [4, 2, 5, 3]
    for name in names:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), 4)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), 8)
        assert (adapter.rank(name), adapter.alpha(name), adapter.scaling(name)) == (r, alpha, alpha / r)
    a = tensors["base_model.model.m.layers.0.q_proj.lora_A.default.weight"]
    b = tensors["base_model.model.m.layers.0.q_proj.lora_B.default.weight"]
    torch.testing.assert_close(adapter.delta("m.layers.0.q_proj"), 9 / 4 * b @ a)
    rs = AdapterFolder(_folder(tmp_path / "rs", {**config, "use_rslora": True}, tensors))
    assert rs.scaling("m.layers.10.q_proj") == 9 / 5**0.5


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"peft_type": "LOHA"}, "only LoRA adapters are supported, got peft_type 'LOHA'"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"init_lora_weights": "pissa_niter_4"}, "changed the base weights"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"rank_pattern": {"q_proj": 2}}, r"m.q_proj: lora_A \(4, 16\), lora_B \(8, 4\) for rank 2"),
    ],
)
def test_reader_refuses_what_it_cannot_express(tmp_path, config, match):
    tensors = {"base_model.model.m.q_proj.lora_A.weight": torch.zeros(4, 16)}
    tensors["base_model.model.m.q_proj.lora_B.weight"] = torch.zeros(8, 4)
    with pytest.raises(ValueError, match=match):
        AdapterFolder(_folder(tmp_path / "a", {"r": 4, "lora_alpha": 8, **config}, tensors))


def test_reader_refuses_two_adapters_in_one_file(tmp_path):
    tensors = {f"m.q_proj.lora_{ab}.{n}.weight": torch.zeros(4, 4) for ab in "AB" for n in ("x", "y")}
    with pytest.raises(ValueError, match="repeat a module"):
        AdapterFolder(_folder(tmp_path / "a", {"r": 4, "lora_alpha": 8}, tensors))


# ---- modules trained in full (PEFT's modules_to_save): a RoBERTa classifier's head ----
CLS = transformers.AutoModelForSequenceClassification


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return classifier_folder(tmp_path_factory.mktemp("roberta"))


def head_reference(classifier_dir):
    """transformers + bitsandbytes with the head dense (the QLoRA recipe: `llm_int8_skip_modules`)."""
    return bnb_base(classifier_dir, CLS, skip_modules=["classifier"])


def perturb(module, seed):
    """Move every tensor of `module` off its initial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_peft_head_adapter_loads(classifier_dir, tmp_path):
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"
    )
    ref = get_peft_model(head_reference(classifier_dir), config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in peft_lora_modules(ref).values():
            m.lora_B["default"].weight.copy_(
                torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.05
            )
    perturb(peft_saved_modules(ref)["classifier"], seed=5)
    ref.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(saved) == ["classifier", "score"]  # PEFT's SEQ_CLS names; this model has no "score"
    model = ours(classifier_dir, model_cls=CLS)  # default modules_to_save: the task head
    assert model.qlora.modules_to_save == ["classifier"]
    optimized = {id(p) for group in model.qlora.optimizer.param_groups for p in group["params"]}
    qlora_compile.load_adapter(model, tmp_path / "a")
    assert_layers_like_peft(model, ref)
    torch.testing.assert_close(logits(model), logits(ref.train()), **TOL)
    assert {id(p) for p in model.qlora.trainable_parameters()} == optimized  # loaded in place


def test_our_head_adapter_loads_in_peft(classifier_dir, tmp_path):
    model = ours(classifier_dir, model_cls=CLS)
    perturb(model.classifier, seed=6)
    qlora_compile.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["modules_to_save"], config["task_type"]) == (["classifier"], "SEQ_CLS")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as st:
        head = {k for k in st.keys() if ".lora_" not in k}  # noqa: SIM118
    assert head == {f"base_model.model.classifier.{k}" for k in model.classifier.state_dict()}
    ref = PeftModel.from_pretrained(head_reference(classifier_dir), tmp_path / "ours").train()
    assert_layers_like_peft(model, ref)
    expected = logits(model)
    torch.testing.assert_close(logits(ref), expected, **TOL)
    again = ours(classifier_dir, model_cls=CLS, seed=9)
    qlora_compile.load_adapter(again, tmp_path / "ours")
    torch.testing.assert_close(logits(again), expected, atol=0, rtol=0)


def test_head_adapter_mismatches_are_listed(classifier_dir, tmp_path):
    model = ours(classifier_dir, model_cls=CLS)
    qlora_compile.save_adapter(model, tmp_path / "ours")
    plain = ours(classifier_dir, model_cls=CLS, modules_to_save=())  # the head 4-bit with LoRA, as before
    with pytest.raises(ValueError, match=r"classifier: the adapter trains it in full .* the model does not"):
        qlora_compile.load_adapter(plain, tmp_path / "ours")
    qlora_compile.save_adapter(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="classifier is trained in full here but not in the adapter"):
        qlora_compile.load_adapter(model, tmp_path / "plain")
    with pytest.raises(ValueError, match=r"modules_to_save \['clasifier'\] match no module .*'classifier'"):
        ours(classifier_dir, model_cls=CLS, modules_to_save=["clasifier"])


def test_exports_keep_the_trained_head(classifier_dir, tmp_path):
    import onnxruntime

    from qlora_compile import quantize_weight

    model = ours(classifier_dir, model_cls=CLS)
    perturb(model.classifier, seed=7)
    qlora_compile.save_adapter(model, tmp_path / "a")
    expected = logits(model)
    head = {k: t.detach().clone() for k, t in model.classifier.state_dict().items()}

    qlora_compile.export_merged(classifier_dir, tmp_path / "a", tmp_path / "merged")
    merged = CLS.from_pretrained(tmp_path / "merged", dtype=torch.float32).train()
    for k, t in merged.classifier.state_dict().items():
        assert torch.equal(t, head[k]), k
    torch.testing.assert_close(logits(merged), expected, atol=2e-6, rtol=1e-5)

    _, reports = qlora_compile.export_nf4(classifier_dir, tmp_path / "a", tmp_path / "nf4")
    skip = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"][
        "llm_int8_skip_modules"
    ]
    assert {"classifier.dense", "classifier.out_proj"} <= set(skip)
    reloaded = CLS.from_pretrained(tmp_path / "nf4", device_map="cpu", dtype=torch.float32).train()
    assert type(reloaded.roberta.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    for k, t in reloaded.classifier.state_dict().items():  # dense, trained values
        assert torch.equal(t, head[k]), k
    with torch.no_grad():  # the merged model with its merged layers re-quantized: what nf4 holds
        for r in reports:
            w = merged.get_submodule(r.module).weight
            w.copy_(quantize_weight(w).dequantize())
    torch.testing.assert_close(logits(reloaded), logits(merged), atol=2e-6, rtol=1e-5)

    qlora_compile.export_onnx(classifier_dir, tmp_path / "a", tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = IDS.numpy()
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": torch.ones_like(IDS).numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=2e-5, rtol=1e-4)


# ---- LoRA on linears kept dense (T5's `wo`): PEFT's "all-linear" adapts them too ----
T5 = transformers.T5ForConditionalGeneration


def t5_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits


def test_dense_lora_adapters_both_ways_and_merged(tmp_path):
    t5_dir = t5_folder(tmp_path / "t5")
    model = ours(t5_dir, model_cls=T5)
    assert type(model.encoder.block[0].layer[1].DenseReluDense.wo) is qlora_compile.LoRALinear
    qlora_compile.save_adapter(model, tmp_path / "ours")
    assert "wo" in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]
    ref = PeftModel.from_pretrained(bnb_base(t5_dir, T5), tmp_path / "ours").train()
    assert_layers_like_peft(model, ref)
    expected = t5_logits(model)
    torch.testing.assert_close(t5_logits(ref), expected, **TOL)

    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    peft_model = get_peft_model(bnb_base(t5_dir, T5), config)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for m in peft_lora_modules(peft_model).values():
            m.lora_B["default"].weight.copy_(
                torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.05
            )
    peft_model.save_pretrained(tmp_path / "peft")
    again = ours(t5_dir, model_cls=T5, seed=3)
    qlora_compile.load_adapter(again, tmp_path / "peft")
    torch.testing.assert_close(t5_logits(again), t5_logits(peft_model.train()), **TOL)

    qlora_compile.export_merged(t5_dir, tmp_path / "ours", tmp_path / "merged")  # wo: W + s B A, dense
    merged = T5.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(t5_logits(merged), expected, atol=2e-6, rtol=1e-5)
