"""Packing: short tokenized examples concatenated into rows of at most `max_length` tokens.

Each example keeps its own positions (`position_ids` restart at 0), and the first label of each
example is IGNORE: the last token of one example is never trained to predict the next one's first
(an unpacked example's first label is never a target either, so packed and unpacked runs train on
the same targets). Batches of packed rows go to the model with `position_ids`, no `attention_mask` and
`use_cache=False`: transformers 5 then builds a block-diagonal causal mask from where the positions
restart (`masking_utils.find_packed_sequence_indices`; it looks only when there is neither a mask
nor a KV cache), so attention stays inside each example, in
every model whose mask comes from `create_causal_mask` (Llama, Mistral, Qwen2/3, Gemma, Phi-3 and
most decoder-only models there), for eager and SDPA attention alike. A model that builds its
mask another way would attend across the examples of a row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from .data import Split, quiet_datasets
from .encode import IGNORE


def _fill(max_length: int):
    """A batched `Dataset.map` function: consecutive examples into rows, first fit in order."""

    def fill(batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
        row: dict[str, list] = {}

        def flush() -> None:
            if row:
                for key in ("input_ids", "labels", "position_ids"):
                    out[key].append(row[key])
                out["length"].append(len(row["input_ids"]))
                row.clear()

        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            if row and len(row["input_ids"]) + len(ids) > max_length:
                flush()
            if not row:
                row.update(input_ids=[], labels=[], position_ids=[])
            row["input_ids"] += ids
            row["labels"] += [IGNORE, *labels[1:]]
            row["position_ids"] += range(len(ids))
        flush()
        return out

    return fill


def pack(split: Split, max_length: int, seed: int) -> Split:
    """`split`'s examples shuffled with `seed` (an index mapping, nothing copied) and packed in
    map batches of 1000 examples; the counts gain `packed_rows`."""
    shuffled = split.dataset.shuffle(seed=seed)
    key = json.dumps([shuffled._fingerprint, max_length, "pack-v1"])
    with quiet_datasets():
        packed = shuffled.map(
            _fill(max_length),
            batched=True,
            batch_size=1000,
            remove_columns=shuffled.column_names,
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        )
    return Split(packed, replace(split.counts, packed_rows=len(packed)))
