"""Data: formats detected and encoded, answer-only labels checked against the tokenizer's own chat
template, max_length counts, every file kind read the same, length grouping, per-batch padding."""

import json
import types

import numpy as np
import pytest
import torch

from qlora_compile.errors import InvalidArgumentError, InvalidFolderError
from qlora_compile.train import data, encode
from tests.train.conftest import chat_records, write_jsonl

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]


def settings(**kw):
    base = dict(format="auto", model="m", max_length=512, overflow="truncate", train_on_inputs=False,
                system_prompt=None)  # fmt: skip
    return types.SimpleNamespace(**{**base, **kw})


def spans(labels: list[int]) -> list[list[int]]:
    """The runs of trained (non -100) labels."""
    out, run = [], []
    for t in labels + [encode.IGNORE]:
        if t != encode.IGNORE:
            run.append(t)
        elif run:
            out, run = out + [run], []
    return out


def test_chat_labels_are_the_assistant_turns(tokenizer):
    """Hand-check with the template's own text: the ids are the rendered conversation, and the
    trained spans are exactly each answer and its end-of-turn, nothing of the prompts."""
    ids, labels = encode.encode_chat(tokenizer, CHAT)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode(s) for s in spans(labels)] == ["4<|im_end|>\n", "6<|im_end|>\n"]
    first = labels.index(next(t for t in labels if t != encode.IGNORE))
    assert tokenizer.decode(ids[:first]).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert [i for i, t in enumerate(labels) if t != encode.IGNORE] == [
        i for i, (t, lab) in enumerate(zip(ids, labels, strict=True)) if lab == t
    ]
    ids2, labels2 = encode.encode_chat(tokenizer, CHAT, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids


def test_instruction_record(tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
    ids, labels = encode.encode_record(tokenizer, record, "instruction", False, "Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                {"role": "assistant", "content": "4"}]  # fmt: skip
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert [tokenizer.decode(s) for s in spans(labels)] == ["4<|im_end|>\n"]


def test_instruction_without_chat_template_uses_alpaca(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    record = {"instruction": "Add the numbers.", "input": None, "output": "4"}
    ids, labels = encode.encode_record(tokenizer, record, "instruction", False, None)
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n")  # fmt: skip
    head = tokenizer(prompt)["input_ids"]
    assert ids == head + tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels == [-100] * len(head) + ids[len(head) :]


def test_completion_and_text(tokenizer):
    ids, labels = encode.encode_record(
        tokenizer, {"prompt": "Q: hi\nA:", "completion": " hello"}, "completion", False, None
    )
    head = tokenizer("Q: hi\nA:")["input_ids"]
    assert ids == head + tokenizer(" hello", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels[: len(head)] == [-100] * len(head) and labels[len(head) :] == ids[len(head) :]
    ids, labels = encode.encode_record(tokenizer, {"text": "plain words"}, "text", False, None)
    assert ids == tokenizer("plain words")["input_ids"] + [tokenizer.eos_token_id] and labels == ids


@pytest.mark.parametrize(
    ("columns", "expected"),
    [(["messages", "id"], "chat"), (["instruction", "input", "output"], "instruction"),
     (["prompt", "completion"], "completion"), (["text", "meta"], "text"), (["question", "answer"], None)],
)  # fmt: skip
def test_format_detection(columns, expected):
    assert encode.detect_format(columns) == expected


def test_explicit_format_checks_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(
        InvalidArgumentError, match=r"format 'completion' needs column\(s\) \['prompt', 'completion'\]"
    ):
        data.prepare([str(path)], tokenizer, settings(format="completion"))


def test_max_length_counts(tmp_path, tokenizer):
    """Truncate and drop, counted against lengths and labels computed here with the encoder."""
    records = chat_records(30, seed=1)
    records.append(
        {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "x"}]}
    )
    path = write_jsonl(tmp_path / "c.jsonl", records)
    encoded = [encode.encode_chat(tokenizer, r["messages"]) for r in records]
    lengths = [len(ids) for ids, _ in encoded]
    limit = sorted(lengths)[15]
    longer = sum(n > limit for n in lengths)
    empty = sum(all(t == -100 for t in labels[1:limit]) for _, labels in encoded)  # no answer token left
    assert 0 < longer < len(records) and empty >= 1  # the long prompt at least
    kept, _ = data.prepare([str(path)], tokenizer, settings(max_length=limit, overflow="drop"))
    c = kept.counts
    assert (c.examples, c.dropped_too_long, c.truncated, c.dropped_no_labels) == (31, longer, 0, 0)
    assert sorted(kept.lengths.tolist()) == sorted(n for n in lengths if n <= limit)
    cut, _ = data.prepare([str(path)], tokenizer, settings(max_length=limit))
    c = cut.counts
    assert (c.truncated, c.dropped_no_labels, c.dropped_too_long, c.kept) == (
        longer - empty,
        empty,
        0,
        31 - empty,
    )
    assert cut.lengths.max() == limit
    assert c.tokens == sum(min(n, limit) for n, (_, lab) in zip(lengths, encoded, strict=True)
                           if any(t != -100 for t in lab[1:limit]))  # fmt: skip


def test_every_file_kind_reads_the_same(tmp_path, tokenizer):
    import datasets

    records = [{"prompt": f"Q{i}: " + "x " * i, "completion": f" answer {i}"} for i in range(7)]
    write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    ds = datasets.Dataset.from_list(records)
    ds.to_csv(tmp_path / "d.csv", index=False)
    ds.to_parquet(tmp_path / "d.parquet")
    ds.save_to_disk(tmp_path / "saved")
    results = {}
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved"):
        split, fmt = data.prepare([str(tmp_path / name)], tokenizer, settings())
        assert fmt == "completion"
        results[name] = (split.dataset["input_ids"][:], split.dataset["labels"][:])
    expected = [encode.encode_completion(tokenizer, r["prompt"], r["completion"]) for r in records]
    for name, (ids, labels) in results.items():
        assert list(zip(ids, labels, strict=True)) == [tuple(map(list, e)) for e in expected], name
    two, _ = data.prepare([str(tmp_path / "d.jsonl"), str(tmp_path / "d.parquet")], tokenizer, settings())
    assert len(two) == 14


def test_length_grouped_order():
    """A permutation fixed by (seed, epoch) alone; batches inside each mega-batch sorted by length,
    longest first, the longest example of all in the first batch (transformers' group_by_length)."""
    lengths = np.random.default_rng(0).integers(5, 200, size=100)
    order = data.epoch_order(lengths, 4, seed=7, epoch=0, group_by_length=True)
    assert sorted(order) == list(range(100))
    assert order == data.epoch_order(lengths, 4, seed=7, epoch=0, group_by_length=True)
    assert order != data.epoch_order(lengths, 4, seed=7, epoch=1, group_by_length=True)
    assert lengths[order[0]] == lengths.max()
    mega = 4 * min(100 // 16, 50)  # transformers' default mega-batch: 50 batches or a quarter of the data
    for start in range(0, 100, mega):
        chunk = [lengths[i] for i in order[start : start + mega]][1:]  # the first may be swapped in
        assert chunk == sorted(chunk, reverse=True)
    padding = sum(max(lengths[b]) * len(b) - sum(lengths[b]) for b in data.micro_batches(order, 4))
    shuffled = data.epoch_order(lengths, 4, seed=7, epoch=0, group_by_length=False)
    random_padding = sum(max(lengths[b]) * len(b) - sum(lengths[b]) for b in data.micro_batches(shuffled, 4))
    assert padding < random_padding / 3


def test_collate_pads_per_batch():
    batch = data.collate({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]]}, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_eval_file_and_split(tmp_path, tiny_lm, chat_jsonl):
    """eval_data: its own file, encoded in the training data's format; eval_split: held out of the
    training data, the same examples for the same seed."""
    from qlora_compile.train import run
    from qlora_compile.train.config import load_config

    dev = write_jsonl(tmp_path / "dev.jsonl", chat_records(5, seed=9))
    base = ["--model", str(tiny_lm), "--data", str(chat_jsonl), "--output_dir", str(tmp_path / "o")]
    p = run.prepare(load_config(None, [*base, "--eval_data", str(dev)]))
    assert (len(p.train), len(p.eval), p.fmt) == (24, 5, "chat")
    a = run.prepare(load_config(None, [*base, "--eval_split", "0.25"]))
    b = run.prepare(load_config(None, [*base, "--eval_split", "0.25"]))
    assert (len(a.train), len(a.eval)) == (18, 6)
    assert a.eval.dataset["input_ids"][:] == b.eval.dataset["input_ids"][:]
    held = {tuple(x) for x in a.eval.dataset["input_ids"][:]}
    assert not held & {tuple(x) for x in a.train.dataset["input_ids"][:]}
    assert not (tmp_path / "o").exists()  # prepare writes nothing


def test_dataset_dict_folder(tmp_path, tokenizer):
    import datasets

    records = [{"text": f"example {i}"} for i in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(tmp_path / "dd")
    split, fmt = data.prepare([str(tmp_path / "dd")], tokenizer, settings())
    assert (len(split), fmt) == (4, "text")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(records)}).save_to_disk(tmp_path / "val")
    with pytest.raises(InvalidFolderError, match=r"has splits \['validation'\] and no 'train'"):
        data.prepare([str(tmp_path / "val")], tokenizer, settings())
