"""Int4, the third 4-bit code table (`quant_type="int4"`), against the independent reference of the
fidelity benchmark (`benchmarks/fidelity/int4.py`: round(x * 7 / absmax), half to even), on both
CPU paths and the Triton kernels; and its refusal wherever bitsandbytes' format is written."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import qlora_compile
from qlora_compile import QLoRAConfig, quantize_weight
from qlora_compile.checkpoint.convert import ConversionError, convert_checkpoint
from qlora_compile.codes import bucket_bounds, code4
from qlora_compile.errors import InvalidConfigError, UnsupportedError
from qlora_compile.export import export_nf4, export_onnx
from qlora_compile.kernels import triton_dequant as td
from qlora_compile.kernels import triton_matmul as tm
from tests.models import build, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity"))
from int4 import quantize_int4  # noqa: E402  (the benchmark's reference, beside its script)


def levels(qw) -> torch.Tensor:
    """The stored integer levels q in -7..7 (4-bit value q + 7), first element in the high nibble."""
    packed = qw.packed.view(-1)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[: qw.numel]
    return nibbles.to(torch.int16) - 7


def at_tie(w: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Where x * 7 / absmax lies exactly halfway between two integers (float64: exact here)."""
    scaled = w.reshape(-1).double() * 7 / absmax.double().repeat_interleave(64)[: w.numel()]
    return (scaled - scaled.floor()) == 0.5


def test_code_table():
    code = code4("int4")
    assert torch.equal(code[:15], torch.arange(-7, 8, dtype=torch.float32) / 7) and code[15] == 1.0
    bounds, nibble = bucket_bounds("int4")
    assert bounds[-1] == 1.0 and torch.equal(nibble, torch.arange(16, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 200), (4097,)])  # blocks straddling rows; a partial last block
def test_matches_reference(dtype, double_quant, shape, cpu_path):
    w = (torch.randn(shape) * 0.05).to(dtype)
    w.view(-1)[:64] = 0  # a zero block
    w.view(-1)[64] = -w.view(-1)[64:128].abs().max()  # -absmax stores -7; +absmax never slot 15
    ref = quantize_int4(w, blocksize=64, double_quant=double_quant)
    qw = quantize_weight(w, quant_type="int4", blocksize=64, double_quant=double_quant)
    assert torch.equal(qw.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(qw.nested_absmax, ref.nested_absmax) and torch.equal(qw.offset, ref.offset)
    q = levels(qw)
    plain = quantize_int4(w, blocksize=64, double_quant=False).absmax
    differ = q != ref.codes
    # The rules differ only at exact ties, and there by one level (see int4.py)
    assert torch.equal(differ, differ & at_tie(w, plain))
    assert (q - ref.codes).abs().max() <= 1 and q.min() >= -7 and q.max() <= 7
    if dtype == torch.float32:
        assert not differ.any()  # random fp32 values do not land on ties
    ref.codes = q.to(torch.int8)  # the reference read-back of our codes: every value equal
    for out in (torch.float32, torch.bfloat16):
        assert torch.equal(qw.dequantize(out), ref.dequantize(out))


def test_exact_ties():
    """Values exactly halfway between two levels, x * 7 / absmax = k + 0.5 with absmax = 7: the
    reference rounds half to even; we threshold x * (1 / absmax) in fp32 at the fp32 midpoints of
    the code, a tie going to the lower code. Most land on the midpoint and go down; where fp32
    rounding puts x * (1 / 7) above the midpoint (6.5 here), up: never more than one level apart."""
    ties = torch.arange(-7, 7, dtype=torch.float32) + 0.5
    w = torch.nn.functional.pad(torch.cat([torch.tensor([7.0]), ties]), (0, 64 - 15))
    ref = quantize_int4(w, double_quant=False).codes[1:15]
    assert torch.equal(ref.float(), torch.round(ties))  # half to even: -6, -6, -4, -4, ..., 6, 6
    ours = levels(quantize_weight(w, quant_type="int4", double_quant=False))[1:15]
    bounds, _ = bucket_bounds("int4")
    scaled = ties * (1.0 / torch.tensor(7.0))
    expected = ties.floor() + (scaled > bounds[(ties.floor() + 7).long()]).float()
    assert torch.equal(ours.float(), expected)
    assert ours.tolist() == [-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 6]


@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_kernels_on_int4(double_quant, device):
    """Under TRITON_INTERPRET=1 on a CPU (CUDA when present): the dequantize kernel equals the CPU
    kernel bit for bit, and the fused matmul its pure-torch reference."""
    w = torch.randn(96, 200) * 0.05
    qw = quantize_weight(w, quant_type="int4", double_quant=double_quant)
    for dtype in (torch.float32, torch.bfloat16):
        got = td.dequantize(*qw.to(device).op_args(), "int4", 64, w.numel(), dtype)
        assert torch.equal(got.cpu().view(w.shape), qw.dequantize(dtype))
    x = torch.randn(2, 5, 200, device=device)
    args = (*qw.to(device).op_args(), None, "int4", 64, [96, 200])
    torch.testing.assert_close(
        tm.linear_forward(x, *args), tm.linear_reference(x, *args), rtol=2e-5, atol=1e-5
    )


def test_config_accepts_int4_and_none():
    assert QLoRAConfig(quant_type="int4").quant_type == "int4"
    assert QLoRAConfig(quant_type="none").quant_type == "none"
    with pytest.raises(InvalidConfigError, match="quant_type must be one of"):
        QLoRAConfig(quant_type="int8")
    with pytest.raises(InvalidConfigError, match="needs a 4-bit quant_type"):
        QLoRAConfig(quant_type="none", target_parameters=["down_proj"], lora_dropout=0.0)


def test_bitsandbytes_format_refuses_int4(tmp_path):
    qw = quantize_weight(torch.randn(8, 64), quant_type="int4")
    with pytest.raises(UnsupportedError, match="no Int4"):
        qw.to_bnb("layer")
    with pytest.raises(ConversionError, match="bitsandbytes' 4-bit types"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", quant_type="int4")
    with pytest.raises(UnsupportedError, match="NF4 export"):
        export_nf4(tmp_path / "src", None, tmp_path / "out", quant_type="int4")
    with pytest.raises(UnsupportedError, match="MatMulBnb4"):
        export_onnx(tmp_path / "src", None, tmp_path / "out.onnx", quant_type="int4")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "out").exists()


def test_compiled_int4_model_equals_reference_weights():
    """`compile(quant_type="int4")` (aot_eager, fp32) computes the model whose linears hold the
    reference's dequantized Int4 weights (fp32 weights: no ties, the codes are the reference's)."""
    model = build(tiny_config("llama"))
    ref = copy.deepcopy(model)
    qlora_compile.compile(model, quant_type="int4", compute_dtype=torch.float32, backend="aot_eager",
                          gradient_checkpointing=False, lora_dropout=0.0)  # fmt: skip
    linears = [(n, m) for n, m in ref.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    assert len(linears) == 14
    with torch.no_grad():
        for _, m in linears:
            m.weight.copy_(quantize_int4(m.weight, blocksize=64, double_quant=True).dequantize())
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
