"""MoE checkpoints: the converter quantizes each expert's matrix as `compile` does, streaming one
expert at a time; `load_quantized` holds exactly those bytes; the result is compile's model.

transformers + bitsandbytes leaves experts dense (tests/test_experts.py), so the reference is
`compile` of the same 16-bit model, which tests/test_experts.py checks against the format.
"""

import pytest
import torch
import transformers

import qlora_compile
from qlora_compile.checkpoint import model_folder
from qlora_compile.experts import QuantizedExperts
from qlora_compile.lora import QLoRALinear
from tests.checkpoint.convert_helpers import bnb_reference, raw, read_tensors
from tests.models import train_steps
from tests.test_experts import save_moe

FAST = {"backend": "aot_eager", "r": 4, "lora_alpha": 8, "compute_dtype": torch.float32, "lora_dropout": 0.0}
EXPERTS = ["gate_up_proj", "down_proj"]
FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss"]


def _buffers(model, kind) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, kind) for b, t in m.named_buffers() if t is not None
    }  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """(family, 16-bit folder, NF4 folder, the largest tensor the converter read, in elements)."""
    tmp = tmp_path_factory.mktemp(request.param)
    src = tmp / "src"
    save_moe(src, request.param)
    reads = []
    original = model_folder.read

    def spy(info, *args, **kwargs):
        t = original(info, *args, **kwargs)
        reads.append((info.name, t.numel()))
        return t

    model_folder.read = spy
    try:
        qlora_compile.convert_checkpoint(src, tmp / "dst", compute_dtype="float32", progress=False)
    finally:
        model_folder.read = original
    return request.param, src, tmp / "dst", reads


def test_layout_one_bnb_weight_per_expert(converted):
    family, src, dst, reads = converted
    stored = read_tensors(dst)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src)
    experts = {n: m for n, m in reference.named_modules() if hasattr(m, "has_gate")}
    assert experts
    for name, module in experts.items():
        for param in EXPERTS:
            e, *_ = getattr(module, param).shape
            for x in range(e):
                prefix = f"{name}.{x}.{param}.weight"
                assert stored[prefix].dtype == torch.uint8
                assert (
                    f"{prefix}.quant_state.bitsandbytes__nf4" in stored
                    and f"{prefix}.nested_absmax" in stored
                )
    assert not [k for k in stored if k.endswith(("w1.weight", "gate_proj.weight", "experts.gate_up_proj"))]
    # streaming: never more than one expert's stored matrix (Mixtral: one of w1 / w3) in one read
    one_expert = max(getattr(m, p)[0].numel() for m in experts.values() for p in EXPERTS)
    expert_reads = [n for n, k in reads if "experts" in n]
    assert expert_reads and max(k for n, k in reads if "experts" in n) <= one_expert


def test_load_quantized_holds_the_bytes_and_logits_of_compile(converted):
    family, src, dst, _ = converted
    loaded = qlora_compile.load_quantized(dst)
    stacks = [m for m in loaded.modules() if isinstance(m, QuantizedExperts)]
    assert len(stacks) == 2 * len([m for m in loaded.modules() if hasattr(m, "has_gate")])
    assert all(m.compute_dtype == torch.float32 for m in stacks)  # the folder's bnb_4bit_compute_dtype
    # the file's bytes, untouched
    stored = read_tensors(dst)
    for name, m in loaded.named_modules():
        if isinstance(m, QuantizedExperts):
            module, _, param = name.rpartition(".")
            for x in range(m.num_experts):
                assert torch.equal(raw(m.weight_packed[x]), raw(stored[f"{module}.{x}.{param}.weight"]))
                assert torch.equal(
                    raw(m.weight_absmax[x]), raw(stored[f"{module}.{x}.{param}.weight.absmax"])
                )
    qlora_compile.compile(loaded, **FAST)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    qlora_compile.compile(reference, **FAST)
    for kind in (QuantizedExperts, QLoRALinear):
        ours, theirs = _buffers(loaded, kind), _buffers(reference, kind)
        assert ours.keys() == theirs.keys() and ours
        for key in theirs:
            assert torch.equal(raw(ours[key]), raw(theirs[key])), key
    rewrites = loaded.qlora.report().rewritten
    assert sum(r.kind == "QuantizedExperts" for r in rewrites) == len(stacks)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("converted", ["mixtral"], indirect=True)
def test_loaded_experts_take_lora_and_train(converted):
    _, _, dst, _ = converted
    model = qlora_compile.load_quantized(dst)
    before = {k: v.clone() for k, v in _buffers(model, QuantizedExperts).items()}
    qlora_compile.compile(model, **{**FAST, "lr": 1e-2}, target_parameters=EXPERTS)
    model.train()
    ids = torch.randint(0, 128, (2, 12))
    losses = train_steps(model, [{"input_ids": ids, "labels": ids, "use_cache": False}] * 3)
    assert losses[-1] < losses[0]
    stacks = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert stacks and all(m.lora_B.weight.abs().sum() > 0 for m in stacks)
    after = _buffers(model, QuantizedExperts)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_transformers_bnb_folder_loads_and_compiles_like_the_16bit_model(tmp_path):
    """transformers + bitsandbytes saves the experts dense, per expert: load_quantized stacks them
    as from_pretrained does, and compile quantizes them; the result is compile of the 16-bit model."""
    save_moe(tmp_path / "src", "mixtral")
    bnb_reference(
        tmp_path / "src", tmp_path / "bnb", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    loaded = qlora_compile.load_quantized(tmp_path / "bnb")
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dim() == 3  # dense until compile
    qlora_compile.compile(loaded, **FAST)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    qlora_compile.compile(reference, **FAST)
    for kind in (QuantizedExperts, QLoRALinear):
        ours, theirs = _buffers(loaded, kind), _buffers(reference, kind)
        assert ours.keys() == theirs.keys() and all(torch.equal(raw(ours[k]), raw(theirs[k])) for k in theirs)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_nonfinite_expert_is_named_and_nothing_is_left(tmp_path):
    from safetensors.torch import load_file, save_file

    save_moe(tmp_path / "src", "mixtral")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    tensors[key][5, 7] = float("nan")
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qlora_compile.ConversionError, match=rf"{key}.*1 NaN.*\(5, 7\)"):
        qlora_compile.convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()
