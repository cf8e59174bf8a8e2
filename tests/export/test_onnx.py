"""ONNX export: MatMulBnb4 for every 4-bit linear, run in ONNX Runtime's CPU provider."""

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import qlora_compile
from qlora_compile.export.base import BaseModel
from qlora_compile.export.onnx import build_model
from qlora_compile.tools import cli
from tests.export.export_helpers import input_ids

N_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)
BASE_MATMULS = 2 * 2 + 1  # attention's two products per layer, and the tied output head


def run(path, ids, mask):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda ids, mask: torch.from_numpy(
        session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    )


def shapes():
    """Two shapes through the same session; the second pads its first row on the left."""
    first = input_ids(2, 12)
    second = input_ids(3, 5, seed=4)
    mask = torch.ones_like(second)
    mask[0, :2] = 0
    return [(first, torch.ones_like(first)), (second, mask)]


def initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def check_only_4bit(path, model):
    """No float initializer has a quantized linear's dense shape; packed bytes are the model's."""
    inits = initializers(path)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulBnb4"]
    dense_shapes = {(m.out_features, m.in_features) for m in model.modules() if hasattr(m, "weight_packed")}
    dense_shapes |= {s[::-1] for s in dense_shapes}
    floats = [n for n, a in inits.items() if a.dtype.kind == "f" and tuple(a.shape) in dense_shapes]
    assert not floats
    packed = {n.input[1]: inits[n.input[1]] for n in nodes}  # the operator's B inputs
    assert len(packed) == N_LINEARS
    for name, m in model.named_modules():
        if hasattr(m, "weight_packed"):
            key = next(k for k in packed if k.endswith(f"{name}.weight_packed"))
            assert torch.equal(torch.from_numpy(packed[key].copy()).view(-1), m.weight_packed.view(-1))
    return inits


@pytest.mark.slow
def test_onnx_with_lora_branch(llama_dir, trained, tmp_path):
    model, adapter = trained
    out = tmp_path / "model.onnx"
    assert (
        cli.main(["export", "onnx", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(out)])
        == 0
    )
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulBnb4") == N_LINEARS
    assert ops.count("MatMul") == BASE_MATMULS + 2 * N_LINEARS  # LoRA: (x A^T) B^T per linear
    assert {n.domain for n in graph.node if n.op_type == "MatMulBnb4"} == {"com.microsoft"}

    # packed bytes unchanged (those `compile` made), absmax de-nested to fp32
    inits = check_only_4bit(out, model)
    q = model.model.layers[0].self_attn.q_proj.quantized_weight
    absmax = next(a for n, a in inits.items() if n.endswith("layers.0.self_attn.q_proj.weight_absmax"))
    assert absmax.dtype.name == "float32"
    assert torch.equal(torch.from_numpy(absmax.copy()), q.absmax_fp32())
    node = next(n for n in graph.node if n.op_type == "MatMulBnb4")
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["block_size"] == 64 and attrs["quant_type"] == 1

    # file size: the 4-bit bytes + fp32 absmax + the dense rest, not the dequantized weights
    four_bit = sum(
        m.weight_packed.numel() + 4 * m.weight_absmax.numel()
        for m in model.modules()
        if hasattr(m, "weight_packed")
    )
    lora = sum(4 * p.numel() for n, p in model.named_parameters() if "lora_" in n)
    rest = sum(4 * p.numel() for n, p in model.named_parameters() if "lora_" not in n)  # embedding, norms
    size = out.stat().st_size
    assert four_bit + lora + rest < size < (four_bit + lora + rest) * 1.05 + 100_000
    dense_linears = sum(
        4 * m.out_features * m.in_features for m in model.modules() if hasattr(m, "weight_packed")
    )
    assert size < rest + lora + dense_linears / 4  # under 8 bits per linear weight

    session = run(out, None, None)
    for ids, mask in shapes():
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
        got = session(ids, mask)
        assert got.shape == ref.shape
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)


def test_onnx_merged_equals_nf4_export(llama_dir, trained, tmp_path):
    """--merge: the weights of `export nf4` (merged, re-quantized), no LoRA branch."""
    _, adapter = trained
    merged = qlora_compile.export_onnx(llama_dir, adapter, tmp_path / "merged.onnx", merge=True)
    qlora_compile.export_nf4(llama_dir, adapter, tmp_path / "nf4")
    ops = [n.op_type for n in onnx.load(str(merged)).graph.node]
    assert ops.count("MatMulBnb4") == N_LINEARS and ops.count("MatMul") == BASE_MATMULS
    reference = build_model(BaseModel(tmp_path / "nf4"))  # PyTorch, from the bitsandbytes folder
    check_only_4bit(merged, reference)
    session = run(merged, None, None)
    for ids, mask in shapes():
        with torch.no_grad():
            ref = reference(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(session(ids, mask)[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)


def test_merge_needs_adapter(llama_dir, tmp_path, capsys):
    argv = ["export", "onnx", "--base", str(llama_dir), "--merge", "--out", str(tmp_path / "m.onnx")]
    assert cli.main(argv) == 2
    assert "--merge needs an adapter" in capsys.readouterr().err


def test_fused_lora_linear_translates(tmp_path):
    """The fused op that compile's passes make also lowers to MatMulBnb4 + the low-rank branch."""
    from qlora_compile.export.onnx import MS_DOMAIN, translation_table

    qw = qlora_compile.quantize_weight(torch.randn(96, 64), double_quant=False)
    a, b, bias = torch.randn(4, 64), torch.randn(96, 4), torch.randn(96)

    class Fused(torch.nn.Module):
        def forward(self, x):
            return torch.ops.qlora.lora_linear(
                x,
                x,
                qw.packed.view(-1),
                qw.absmax,
                None,
                None,
                bias,
                a,
                b,
                0.5,
                "nf4",
                64,
                [96, 64],
                torch.float32,
            )

    x = torch.randn(3, 5, 64)
    dim = torch.export.Dim("rows")
    program = torch.onnx.export(
        Fused().eval(),
        (x,),
        dynamo=True,
        dynamic_shapes={"x": {1: dim}},
        custom_translation_table=translation_table(),
    )
    path = tmp_path / "fused.onnx"
    program.save(str(path))
    assert [n.domain for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulBnb4"] == [MS_DOMAIN]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (5, 9):
        x = torch.randn(3, rows, 64)
        ref = Fused()(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_onnx_biases_untied_head_no_adapter(tmp_path):
    """Biases on every linear and an untied head, against transformers with our 4-bit linears."""
    from qlora_compile.modules import quantize_linears_
    from tests.export.export_helpers import tiny_llama

    model = tiny_llama(tie=False, bias=True)
    model.save_pretrained(tmp_path / "base")
    out = qlora_compile.export_onnx(tmp_path / "base", None, tmp_path / "m.onnx")
    assert quantize_linears_(model) and model.model.layers[0].mlp.up_proj.bias is not None
    check_only_4bit(out, model)
    session = run(out, None, None)
    for ids, mask in shapes():
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(session(ids, mask)[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
