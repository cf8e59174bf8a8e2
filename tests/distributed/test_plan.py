"""`qlora-compile plan --world-size N`: rank 0's bytes against the real 2- and 3-rank runs of the
shared launches (every parameter's local shard and every buffer, counted there), and against FSDP2
itself on a Llama-2-70B config on the meta device under a fake process group."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_compile import QLoRAConfig, pipeline
from qlora_compile import inspect as qinspect
from qlora_compile.distributed import storage_to_parameters
from qlora_compile.modules import QuantizedLinear
from qlora_compile.plan import plan_memory
from qlora_compile.tools import cli
from tests.distributed import workers

GiB = 2**30
# Llama-2-70B's config.json (meta-llama/Llama-2-70b-hf)
LLAMA2_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-05, "torch_dtype": "float16", "tie_word_embeddings": False}  # fmt: skip


def _plan(folder, world: int, **kw):
    settings = workers.SETTINGS
    return plan_memory(
        folder, gpu_memory=2**30, world_size=world, r=settings["r"], lora_dropout=settings["lora_dropout"],
        dtype="float32", **kw,
    )  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_plan_per_rank_equals_the_real_runs(world, sharded, three_ranks, sharded_out):
    """The tiny Llama of the launches (its config.json): rank 0's 4-bit bytes, LoRA and every
    persistent byte, exactly; the other ranks hold no more."""
    real = [r["adamw32"]["local_bytes"] for r in (sharded if world == 2 else three_ranks)]
    plan = _plan(sharded_out / "dense", world)
    packed = [sum(b for n, b in r.items() if n.endswith("weight_packed")) for r in real]
    lora = [sum(b for n, b in r.items() if ".lora_" in n) for r in real]
    assert plan.persistent["4-bit weights"] == packed[0] == max(packed)
    assert plan.persistent["LoRA parameters (fp32)"] == lora[0] == max(lora)
    assert plan.persistent_bytes == sum(real[0].values()) == max(sum(r.values()) for r in real)
    one = _plan(sharded_out / "dense", 1)
    assert plan.persistent["4-bit weights"] < one.persistent["4-bit weights"] / world + 64
    terms = {t.name: t.bytes for t in plan.terms}
    assert terms["LoRA gradients (fp32)"] == lora[0]  # gradients of the local shards
    assert terms["all-gather buffers (blocks)"] > 0 and terms["root gathered"] > 0


def test_plan_of_llama2_70b_on_2_ranks_equals_fsdp2_under_a_fake_process_group(tmp_path, capsys):
    """FSDP2's own shards of the compiled-shaped 70B model on the meta device (rank 0 of 2, fake
    process group): the plan's 4-bit bytes per rank equal them, about 16.4 GiB."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_70B))
    model = qinspect.meta_model(qinspect.read_config(tmp_path), torch.bfloat16)
    qinspect.prepare_meta(model, QLoRAConfig())
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        storage_to_parameters(model)
        for block in pipeline.repeated_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        four_bit = 0  # packed bytes, absmax codes (shards), nested absmax and offsets (whole)
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                for name, t in [
                    *module.named_parameters(recurse=False),
                    *module.named_buffers(recurse=False),
                ]:
                    if not name.startswith("lora_") and name != "bias":
                        local = t.to_local() if hasattr(t, "to_local") else t
                        four_bit += local.numel() * local.element_size()
    finally:
        dist.destroy_process_group()
    plan = plan_memory(tmp_path, gpu_memory=24 * 10**9, world_size=2)
    assert plan.persistent["4-bit weights"] + plan.persistent["4-bit statistics"] == four_bit
    assert 16.3 * GiB < four_bit < 16.5 * GiB
    offloaded = plan_memory(tmp_path, gpu_memory=24 * 10**9, world_size=2, cpu_offload=True)
    assert offloaded.persistent["4-bit weights"] == 0 and offloaded.host_bytes > four_bit
    assert offloaded.total < plan.total - four_bit
    assert cli.main(["plan", str(tmp_path), "--gpu-memory", "24GB", "--world-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == plan.total
