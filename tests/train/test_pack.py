"""Packing: every example once, rows within max_length, each example's positions restarting and
its first label ignored; attention kept inside each example (the packed row's logits equal each
example's alone) through the compiled model; a packed run through the command line."""

import json

import datasets
import pytest
import torch
import transformers

import qlora_compile
from qlora_compile.tools import cli
from qlora_compile.train import data, run
from qlora_compile.train.config import load_config
from qlora_compile.train.pack import pack
from tests.models import tiny_model


def examples(lengths: list[int]) -> data.Split:
    rows = [{"input_ids": list(range(10 + i, 10 + i + n)), "labels": [-100] * 2 + list(range(12 + i, 10 + i + n)),
             "length": n} for i, n in enumerate(lengths)]  # fmt: skip
    return data.Split(datasets.Dataset.from_list(rows), data.Counts(kept=len(rows)))


def test_pack_rows():
    lengths = [5, 9, 3, 12, 7, 4, 4, 11, 2, 6]
    packed = pack(examples(lengths), max_length=16, seed=0)
    rows = packed.dataset[:]
    assert packed.counts.packed_rows == len(rows["input_ids"]) < len(lengths)
    assert all(len(r) <= 16 for r in rows["input_ids"]) and rows["length"] == [
        len(r) for r in rows["input_ids"]
    ]
    found = []
    for ids, labels, pos in zip(rows["input_ids"], rows["labels"], rows["position_ids"], strict=True):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            assert pos[a:b] == list(range(b - a))
            assert labels[a] == -100 and labels[a + 1 : b] == ([-100] + ids[a + 2 : b])[: b - a - 1]
            found.append(ids[a:b])
    originals = examples(lengths).dataset["input_ids"][:]
    assert sorted(found) == sorted(originals)  # each example once, whole
    # first fit in the shuffled order: no row could have taken the next row's first example
    sizes = rows["length"]
    first = [len(r[: r.index(0, 1)] if 0 in r[1:] else r) for r in rows["position_ids"]]
    assert all(sizes[i] + first[i + 1] > 16 for i in range(len(sizes) - 1))


def test_collate_packed_rows():
    batch = data.collate({"input_ids": [[5, 6, 7, 8], [9, 10]], "labels": [[-100, 6, -100, 8], [-100, 10]],
                          "position_ids": [[0, 1, 0, 1], [0, 1]]}, pad_id=0)  # fmt: skip
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 10, -100, -100]]
    assert batch["use_cache"] is False


def test_attention_stays_inside_each_example():
    """A row of three examples through the compiled model (aot_eager): each example's logits equal
    its logits alone, and equal none of the row's when positions do not restart (the check has
    power: without the restart the later examples see the earlier ones)."""
    model = tiny_model("llama", vocab_size=128)
    qlora_compile.compile(model, backend="aot_eager", lora_dropout=0.0, gradient_checkpointing=False)
    model.eval()
    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 128, (n,), generator=g) for n in (5, 7, 4)]
    row = torch.cat(parts)[None]
    positions = torch.cat([torch.arange(len(p)) for p in parts])[None]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        plain = model(input_ids=row, use_cache=False).logits[0]
        start = 0
        for p in parts:
            alone = model(input_ids=p[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(p)], alone, rtol=1e-5, atol=1e-5)
            if start:
                assert not torch.allclose(plain[start : start + len(p)], alone, atol=1e-3)
            start += len(p)


def test_packed_run(tiny_lm, chat_jsonl, tmp_path):
    """Two packed steps through the command line. The first step's loss (before any update, lora_B
    zero) equals the loss of the same examples one at a time, unpacked: in training, with the
    compiled model, no example saw another."""
    out = tmp_path / "out"
    args = ["--model", str(tiny_lm), "--data", str(chat_jsonl), "--output_dir", str(out),
            "--qlora.backend", "aot_eager", "--dtype", "float32", "--packing", "true", "--max_length", "128",
            "--batch_size", "2", "--max_steps", "2", "--no-progress"]  # fmt: skip
    assert cli.main(["train", *args, "--export", "nf4"]) == 0
    report = json.loads((out / "report.json").read_text())
    # --export nf4: the adapter merged and re-quantized, a bitsandbytes 4-bit folder
    assert report["exports"] == {"nf4": str(out / "nf4")}
    quant = json.loads((out / "nf4" / "config.json").read_text())["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4"
    n_rows = report["data"]["packed_rows"]
    assert report["train_examples"] == n_rows and 24 * 30 // 128 <= n_rows < 24
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2

    cfg = load_config(None, args[:-1])  # without --no-progress, a command-line flag
    p = run.prepare(cfg)
    first = data.micro_batches(data.epoch_order(p.train.lengths, 2, cfg.seed, 0, True), 2)[0]
    rows = p.train.dataset[first]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    qlora_compile.compile(model, backend="eager", gradient_checkpointing=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, pos in zip(rows["input_ids"], rows["labels"], rows["position_ids"], strict=True):
            starts = [i for i, x in enumerate(pos) if x == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:], strict=False):
                logits = model(input_ids=torch.tensor([ids[a:b]])).logits[0, :-1]
                target = torch.tensor(labels[a + 1 : b])
                total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
                count += int((target != -100).sum())
    assert losses[0] == pytest.approx(total / count, rel=1e-5)
