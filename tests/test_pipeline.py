"""qlora_compile.compile on real model families: it trains compiled, adds no graph break, and its
passes do what they count."""

import copy
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn

import qlora_compile
from qlora_compile import LoRALinear, QLoRAConfig, QLoRALinear
from tests.models import CONFIGS, MODEL_CLASSES, graphs_without_us, save_tiny, tiny_model
from tests.peft_oracle import ours

FAST = {"backend": "aot_eager", "r": 4, "compute_dtype": torch.float32}

FAMILIES = [f for f in CONFIGS if f not in MODEL_CLASSES]  # the causal LMs


# products merged by fuse_shared_input, and the groups they form, in one decoder layer (the graph
# compile_scope="layers" compiles once for every layer): q/k/v and gate/up (Llama-like); q/k/v
# (OPT); q/k/v + fc1, which all read the layer norm's output (Phi); GPT-2's c_attn already holds
# q/k/v, and its c_fc reads another input.
SHARED_INPUT = {"llama": 5, "mistral": 5, "qwen2": 5, "gemma2": 5, "phi": 4, "opt": 3, "gpt2": 0}
SHARED_GROUPS = {"llama": 2, "mistral": 2, "qwen2": 2, "gemma2": 2, "phi": 1, "opt": 1, "gpt2": 0}


def count_layers(model) -> int:
    return sum(isinstance(m, QLoRALinear) for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_train_compiled(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 12))
    reference = copy.deepcopy(model).train()
    # the same model with the same (HF, non-reentrant) checkpointing, without us
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    qlora_compile.compile(model, **FAST)
    model.train()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    layers = count_layers(model)
    report = model.qlora.report()
    assert torch.isfinite(loss) and layers == len(report.rewritten) > 0
    # one graph of one decoder layer serves both layers
    assert report.compiled_blocks == 2 and report.graphs == 1
    per_layer = layers // 2
    assert report.passes["fuse_lora"] == per_layer  # every QLoRA layer became one fused node
    assert report.passes["fuse_shared_input"] == SHARED_INPUT[family]
    groups = SHARED_GROUPS[family]
    assert (
        sum(v for k, v in report.passes.items() if k.startswith("kernel:"))
        == per_layer - SHARED_INPUT[family] + groups
    )
    graphs = graphs_without_us(reference, model, lambda m: m(ids, labels=ids, use_cache=False))
    assert report.graphs == graphs  # no graph break of ours
    grads = [m.lora_B.weight.grad for m in model.modules() if isinstance(m, QLoRALinear)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    head = model.get_output_embeddings()
    assert not isinstance(head, QLoRALinear)


def test_gpt2_conv1d_is_transposed():
    model = tiny_model("gpt2").eval()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        dense = model(ids).logits
    qlora_compile.compile(model, **FAST, lora_dropout=0.0)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QLoRALinear) and (layer.out_features, layer.in_features) == (192, 64)
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - dense).abs().max() < 0.1 * dense.abs().max()


def test_sequential_of_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    qlora_compile.compile(model, **FAST, lora_dropout=0.0, gradient_checkpointing=False)
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            nn.init.normal_(m.lora_B.weight)
    x = torch.randn(5, 64)
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    with torch.compiler.set_stance("force_eager"):
        y_eager = model(x)
        y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(g, p.grad)
    assert model.qlora.report().graphs == 1 and model.qlora.report().passes["fuse_lora"] == 2


@pytest.mark.slow
def test_smollm2_real_weights(smollm2_dir):
    """SmolLM2's real weights and shapes (576 wide, 9 query and 3 key-value heads), cut to its first
    4 decoder layers: the other 26 are the same code, and tracing them took 40 s of the suite."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, num_hidden_layers=4
    )
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        dense = model(ids, labels=ids).loss.item()
    qlora_compile.compile(model, **FAST)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - dense) < 0.05 * dense, (loss.item(), dense)  # B = 0: the 4-bit base alone
    report = model.qlora.report()
    assert count_layers(model) == 4 * 7 and report.compiled_blocks == 4
    assert report.passes["fuse_lora"] == 7 * report.graphs


@pytest.mark.slow
def test_bert_minilm_real_weights(minilm_dir):
    model = transformers.AutoModel.from_pretrained(minilm_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["QLoRA quantizes the frozen base.", "Adapters train."], return_tensors="pt", padding=True)
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
    qlora_compile.compile(model, **FAST, lora_dropout=0.0)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    cos = nn.functional.cosine_similarity(out.flatten(1), dense.flatten(1))
    assert (cos > 0.95).all()  # 4-bit weights keep the embedding's direction
    model.train()
    model(**batch).last_hidden_state.square().mean().backward()
    assert count_layers(model) == 6 * 6 + 1  # q, k, v, attn out, intermediate, output per layer; pooler
    grads = {n: m.lora_B.weight.grad for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    # the pooler is not in this loss: under the whole-model graph AOTAutograd gave it zeros, and
    # outside the compiled layers it keeps None, as eager PyTorch does
    assert grads.pop("pooler.dense") is None and all(g is not None for g in grads.values())
    assert model.qlora.report().compiled_blocks == 6


def test_generate_compiled_equals_eager():
    """compile_scope="model": generate() runs the compiled whole model, KV cache included."""
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    qlora_compile.compile(model, **FAST, lora_dropout=0.0, compile_scope="model")
    ids = torch.randint(0, 128, (1, 6))
    compiled = model.generate(ids, max_new_tokens=8, do_sample=False)
    with torch.compiler.set_stance("force_eager"):
        eager = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(compiled, eager) and compiled.shape == (1, 14)
    assert model.qlora.report().compiled_blocks == 0 and model.qlora.report().graphs >= 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_checkpointing_recomputes_the_forward_dropout_masks(tmp_path, backend):
    """HF non-reentrant checkpointing + lora_dropout > 0 + compile (PEFT + compile fails here,
    peft#3020): the recompute must draw the forward's masks, so the LoRA gradients equal those of
    the same seed without checkpointing, on every backend (issue 15: eager was 0.7 off)."""
    base = save_tiny(tmp_path / "base", num_hidden_layers=1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def lora_grads(model, seed):
        model.zero_grad()
        torch.manual_seed(seed)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    models = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same lora_A init
        models.append(ours(base, lora_dropout=0.1, backend=backend, gradient_checkpointing=checkpointing))
    plain, checkpointed = models
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    want, got, other_masks = lora_grads(plain, 1), lora_grads(checkpointed, 1), lora_grads(plain, 2)
    assert len(want) == 14  # lora_A and lora_B of 7 linears
    for name, grad in want.items():
        assert (got[name] - grad).norm() <= 1e-5 * grad.norm(), name
    # the masks matter: another seed moves the gradients far beyond that tolerance
    assert max(((other_masks[n] - g).norm() / g.norm()).item() for n, g in want.items()) > 0.05
    assert checkpointed.qlora.report().passes["fuse_lora"] == 7
    # Inductor on the CPU draws the masks by hash (passes/hash_dropout.py), one per LoRA input
    assert checkpointed.qlora.report().passes.get("hash_dropout", 0) == (7 if backend == "inductor" else 0)


def test_trainer_trains_compiled_model(tmp_path):
    model = tiny_model("llama")
    qlora_compile.compile(model, **FAST, lora_dropout=0.0)
    ids = torch.randint(0, 128, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 4 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, QLoRALinear))


def test_lora_init_as_peft_and_norms_fp32():
    model = tiny_model("llama").to(torch.bfloat16)
    qlora_compile.compile(model, backend="aot_eager", r=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_B.weight.abs().sum() == 0 and layer.lora_A.weight.abs().sum() > 0
    bound = 1 / layer.in_features**0.5  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32  # dense leftovers follow the fp32 residual stream
    assert layer.compute_dtype == torch.bfloat16 and layer.scaling == 16 / 8
    model.train()  # bf16 embeddings, fp32 norms and head: one compiled step runs
    ids = torch.randint(0, 128, (2, 12))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.lora_B.weight.grad is not None


def test_target_modules_by_name_and_filter():
    model = tiny_model("llama")
    qlora_compile.compile(model, **FAST, target_modules=["q_proj", "v_proj"])
    assert count_layers(model) == 4 and not isinstance(model.model.layers[0].mlp.up_proj, QLoRALinear)
    model = tiny_model("llama")
    qlora_compile.compile(
        model, **FAST, target_modules=lambda m, fqn: isinstance(m, nn.Linear) and "mlp" in fqn
    )
    assert count_layers(model) == 6


def test_bad_input():
    with pytest.raises(ValueError, match="no eligible linear layer"):
        qlora_compile.compile(nn.Sequential(nn.Conv2d(3, 3, 3)), **FAST)
    with pytest.raises(
        ValueError, match=r"target_modules \['qkv'\] match no Linear/Conv1D module; the model has: \["
    ):
        qlora_compile.compile(tiny_model("llama"), **FAST, target_modules=["q_proj", "qkv"])
    model = tiny_model("llama")
    qlora_compile.compile(model, **FAST)
    with pytest.raises(ValueError, match="already processed"):
        qlora_compile.compile(model, **FAST)
    with pytest.raises(ValueError, match="already torch.compile'd"):
        qlora_compile.compile(torch.compile(nn.Sequential(nn.Linear(4, 4))), **FAST)
    with pytest.raises(TypeError, match="unknown QLoRAConfig field"):
        qlora_compile.compile(tiny_model("llama"), rank=4)


def test_unquantizable_module_is_skipped_and_reported():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[3, 7] = float("nan")
    qlora_compile.compile(model, **FAST)
    report = model.qlora.report()
    assert [r.name for r in report.rewritten] == ["0"]
    assert report.skipped[0].name == "2" and "1 non-finite value(s)" in report.skipped[0].skipped
    assert "skipped 2 (Linear)" in str(report)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"quant_type": "int8"}, "quant_type must be one of"),
        ({"blocksize": 48}, "blocksize must be one of"),
        ({"r": 0}, "r must be a positive int"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"target_modules": "all"}, "target_modules must be 'all-linear'"),
        ({"compute_dtype": torch.int8}, "compute_dtype must be one of"),
        ({"optim_bits": 16}, "optim_bits must be one of"),
        ({"backend": "tvm"}, "backend must be one of"),
    ],
)
def test_config_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        QLoRAConfig(**kwargs)


def test_config_defaults_are_the_papers():
    c = QLoRAConfig()
    assert (c.quant_type, c.blocksize, c.double_quant, c.compute_dtype) == ("nf4", 64, True, torch.bfloat16)
    assert (c.r, c.lora_alpha, c.lora_dropout, c.target_modules) == (64, 16, 0.05, "all-linear")
    assert (c.lr, c.weight_decay, c.max_grad_norm, c.paged, c.optim_bits) == (2e-4, 0.0, 0.3, True, 32)
    assert c.gradient_checkpointing


_PEAK_PROBE = """
import resource, torch, transformers, qlora_compile
cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=8)
model = transformers.LlamaForCausalLM(cfg)
layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
qlora_compile.compile(model, backend="eager", r=8)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
new = model.qlora.report().totals()["bytes_after"] + sum(p.numel() * 4 for p in model.qlora.trainable_parameters())
dense = sum(r.bytes_before for r in model.qlora.report().rewritten)
print(peak - base, layer, new, dense)
"""


def test_compile_peak_memory_is_model_plus_one_layer():
    """Storage rewrite frees each dense weight as it goes: two dense copies never coexist.

    Peak RSS grows by at most one decoder layer (the one being quantized) plus the tensors compile
    must create (4-bit weights, LoRA adapters), far below a second dense copy of the weights. (The
    allocator may or may not reuse freed dense memory for the new tensors, so they are allowed for.)
    """
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, check=True)
    growth, layer, new, dense = map(int, out.stdout.split())
    assert growth <= layer + new, (
        f"peak grew {growth / 2**20:.0f} MiB; one layer {layer / 2**20:.0f} MiB, new {new / 2**20:.0f} MiB"
    )
    assert growth < dense / 4  # a second dense copy would be 512 MiB


def test_many_models_each_compile():
    """Dynamo caches per code object (8 variants): every model gets its own, so the 10th compiles too."""
    for _ in range(10):
        model = nn.Sequential(nn.Linear(32, 32))
        qlora_compile.compile(model, **FAST, gradient_checkpointing=False)
        model(torch.randn(2, 32))
        assert model.qlora.report().graphs == 1 and model.qlora.report().passes["fuse_lora"] == 1


@pytest.mark.slow
def test_dynamic_shapes_keep_kernel_auto_and_train():
    """New sequence lengths make Dynamo recompile with symbolic sizes: products stay 'auto'."""
    model = tiny_model("llama", num_hidden_layers=1)
    qlora_compile.compile(model, **FAST, lora_dropout=0.1)
    model.train()
    for seq in (12, 20, 28):
        ids = torch.randint(0, 128, (2, seq))
        model(ids, labels=ids).loss.backward()
    passes = model.qlora.report().passes
    assert passes.get("kernel:auto", 0) > 0 and passes.get("kernel:dequant_matmul", 0) > 0
    assert model.qlora.report().graphs >= 2


def test_symbolic_sizes_from_the_first_step_fuse_as_static_ones():
    """dynamic=True (what `qlora-compile train` uses): Dynamo would make LoRA's scaling, the dropout's
    p and the norms' epsilon graph inputs; compile() traces floats as constants, so every layer is
    fused as with static shapes, in one graph that serves every length, with the same loss."""
    ids = [torch.randint(0, 128, (2, seq)) for seq in (12, 20)]
    losses, reports = {}, {}
    for dynamic in (None, True):
        torch.manual_seed(0)
        model = tiny_model("llama", num_hidden_layers=1)
        qlora_compile.compile(model, **FAST, lora_dropout=0.0, dynamic=dynamic)
        losses[dynamic] = [model(x, labels=x).loss.item() for x in ids]
        reports[dynamic] = model.qlora.report()
    # None: a static graph, then a symbolic one at the second length; True: one graph, fused alike
    assert reports[None].graphs == 2 and reports[True].graphs == 1
    fused = {k: v for k, v in reports[True].passes.items() if not k.startswith("kernel:")}
    assert fused == {"fuse_lora": 7, "fuse_shared_input": 5}
    assert {k: v for k, v in reports[None].passes.items() if not k.startswith("kernel:")} == {
        k: 2 * v for k, v in fused.items()
    }
    assert losses[True] == pytest.approx(losses[None], abs=1e-5)


def test_eval_mode_model_stays_in_eval_mode():
    """from_pretrained returns a model in eval mode: the new layers follow it, so LoRA dropout stays
    off (generate() would otherwise sample dropout masks) until the user calls train()."""
    model = tiny_model("llama").eval()
    qlora_compile.compile(model, **FAST, lora_dropout=0.5)
    assert not any(m.training for m in model.modules())
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            nn.init.normal_(m.lora_B.weight)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
        with torch.compiler.set_stance("force_eager"):
            eager = model(ids).logits
    assert torch.equal(first, second) and torch.equal(first, eager)
    model.train()
    assert all(m.training for m in model.modules() if isinstance(m, QLoRALinear))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, first)  # dropout draws in training mode


def tiny_t5() -> nn.Module:
    # T5's own graph break (its decoder sets `position_bias.requires_grad` under checkpointing, with
    # or without us) makes Dynamo compile transformers' shared frames per model, up to
    # recompile_limit (8): a fresh Dynamo per T5 keeps each test's count its own
    torch._dynamo.reset()
    return tiny_model("t5")


def test_keep_in_fp32_modules_stay_dense_as_transformers_bitsandbytes_keeps_them():
    """T5 declares `_keep_in_fp32_modules = ["wo"]`: "all-linear" leaves every `wo` dense, with the
    converter's rule (transformers' bitsandbytes quantizer's), with LoRA on its dense weight (as
    PEFT's "all-linear"), and T5 then trains compiled."""
    from qlora_compile.checkpoint.skeleton import modules_to_not_convert, quantized_modules

    model = tiny_t5()
    expected = set(quantized_modules(model, modules_to_not_convert(model, None)))
    qlora_compile.compile(model, **FAST)
    ours = {name for name, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert ours == expected and len(ours) == 14  # q, k, v, o: 3 attentions; wi: 2 feed-forwards
    wo = [m for name, m in model.named_modules() if name.endswith(".wo")]
    assert len(wo) == 2 and all(type(m) is LoRALinear and m.weight.dtype == torch.float32 for m in wo)
    assert sorted(model.qlora.report().dense_lora) == sorted(
        n for n, _ in model.named_modules() if n.endswith(".wo")
    )
    assert not any(m.weight.requires_grad for m in wo)
    model.train()
    ids, labels = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 5))
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(
        m.lora_B.weight.grad is not None for m in model.modules() if isinstance(m, (QLoRALinear, LoRALinear))
    )


@pytest.mark.slow
def test_weight_reads_the_dequantized_weight_without_storing_it():
    """Code outside our control reads `.weight` (T5's feed-forward: `wo.weight.dtype`). A targeted
    `wo` answers with its dequantized weight; T5 runs compiled with no graph break of ours."""
    model = tiny_t5()
    qlora_compile.compile(
        model, **FAST, gradient_checkpointing=False, target_modules=["q", "k", "v", "o", "wi", "wo"]
    )
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, QLoRALinear)
    w = wo.weight
    assert (w.shape, w.dtype, w.device, w.requires_grad) == (
        (32, 64),
        torch.float32,
        torch.device("cpu"),
        False,
    )
    assert torch.equal(w, wo.quantized_weight.dequantize())
    assert not any(k.endswith("wo.weight") for k in model.state_dict())  # never stored
    model.train()
    ids, labels = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 5))
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and wo.lora_B.weight.grad is not None
    plain = tiny_t5()
    qlora_compile.compile(plain, **FAST, gradient_checkpointing=False)
    plain.train()
    plain(input_ids=ids, labels=labels).loss.backward()
    assert model.qlora.report().graphs == plain.qlora.report().graphs  # reading .weight breaks nothing
    gpt2 = tiny_model("gpt2")
    dense = gpt2.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in, out)
    qlora_compile.compile(gpt2, **FAST)
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert c_attn.fan_in_fan_out and c_attn.weight.shape == dense.shape == (64, 192)
    assert (c_attn.weight - dense).abs().max() < 0.2 * dense.abs().max()  # 4-bit of the same layout
