"""QuantizedLinear and quantize_linears_ on real transformers models."""

import pytest
import torch
from torch import nn

from qlora_compile.modules import QuantizedLinear, quantize_linears_
from tests import bnb_oracle
from tests.models import tiny_model


def test_quantized_linear_matches_bitsandbytes_linear4bit():
    import bitsandbytes as bnb

    linear = nn.Linear(128, 48, bias=True)
    ours = QuantizedLinear.from_linear(linear)
    theirs = bnb.nn.Linear4bit(128, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move to a device
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    packed, _, entries = bnb_oracle.quantize(linear.weight.detach(), "nf4", 64, True)
    assert torch.equal(ours.weight_packed, packed)
    assert "nf4" in repr(ours) and "double_quant" in repr(ours)


def test_quantize_linears_on_llama_keeps_lm_head_and_generates():
    model = tiny_model("llama").eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        dense_logits = model(ids).logits
    names = quantize_linears_(model)
    assert len(names) == 2 * 7 and "lm_head" not in " ".join(names)
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # 4-bit weights move the logits a little, not a lot
    assert (logits - dense_logits).abs().max() < 0.2 * dense_logits.abs().max()
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)


def test_quantized_linear_rejects_non_2d():
    from qlora_compile import quantize_weight

    with pytest.raises(ValueError, match="2-D weight"):
        QuantizedLinear(quantize_weight(torch.randn(64)))
