"""`convert_checkpoint`: a Hugging Face safetensors folder in, a bitsandbytes 4-bit folder out, streaming.

The output is what `from_pretrained(SRC, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
...)).save_pretrained(DST)` writes, tensor for tensor and byte for byte, without ever loading the
model: tensors are read one at a time (in slices of rows, through safetensors' memory map),
quantized or cast, and written shard by shard. Peak memory is one output shard plus the tensor
being read plus a constant.

The folder is read through `ModelFolder` and written through `OutputFolder`: into `DST.partial/`,
renamed to DST at the end (a killed run never leaves a DST), with a manifest of the finished
shards and their SHA-256, so running the same conversion again reuses the shards that still
verify and writes the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..codes import BLOCKSIZES, BNB_QUANT_TYPES
from ..dtypes import parse_dtype
from ..format import QuantizedWeight, quantize_weight
from ..kernels import cpu as _torch_kernels
from ..kernels import dispatch
from ..units import parse_size
from . import model_folder, skeleton
from .expert_layout import ExpertWeight, expert_weights, renamer
from .model_folder import ConversionError, ModelFolder
from .output_folder import DEFAULT_MAX_SHARD_SIZE, Entry, OutputFolder
from .safetensors_file import DTYPES, TensorInfo, TensorSpec, row_chunks

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22  # elements read per slice (16 MB of fp32)
_FLOAT_SOURCES = ("F32", "F16", "BF16", "F64")


@dataclass
class ConversionResult:
    """What `convert_checkpoint` did."""

    dst: Path
    bytes_in: int
    bytes_out: int
    parameters: int
    quantized_parameters: int
    quantized_bytes: int
    quantized_modules: int  # linear weights and MoE expert matrices (one per expert)
    shards: int
    reused_shards: int
    seconds: float
    skipped_modules: list[str] = field(default_factory=list)

    @property
    def bits_per_parameter(self) -> float:
        """Output bits per parameter over the whole model (dense leftovers included)."""
        return 8 * self.bytes_out / max(self.parameters, 1)

    @property
    def quantized_bits_per_parameter(self) -> float:
        """Bits per parameter of the quantized weights alone (4.127 for NF4 + double quant at 64)."""
        return 8 * self.quantized_bytes / max(self.quantized_parameters, 1)

    def summary(self) -> str:
        mb_s = self.bytes_in / 1e6 / max(self.seconds, 1e-9)
        reused = f", {self.reused_shards} reused" if self.reused_shards else ""
        return (
            f"{self.dst}: {self.quantized_modules} linear weights quantized, {self.parameters / 1e6:.1f}M parameters; "
            f"{self.bytes_in / 1e6:.1f} MB in, {self.bytes_out / 1e6:.1f} MB out; "
            f"{self.bits_per_parameter:.2f} bits per parameter ({self.quantized_bits_per_parameter:.3f} in the "
            f"quantized weights); {self.shards} shard(s){reused}; {self.seconds:.1f} s ({mb_s:.0f} MB/s)"
        )


@dataclass
class _Item:
    """One source tensor (or one expert's matrix) and what becomes of it."""

    info: TensorInfo
    key: str  # output name (the model's); an expert: `<experts module>.<e>.<param>.weight`
    dtype: torch.dtype  # dense: the stored dtype; quantized: the dtype quantized from
    quantize: bool
    conv1d: bool
    out_bytes: int
    expert: tuple[ExpertWeight, int, dict[str, TensorInfo]] | None = None  # (weight, e, its sources)

    @property
    def numel(self) -> int:
        return math.prod(self.expert[0].shape) if self.expert else self.info.numel

    @property
    def nbytes(self) -> int:
        """Bytes read from the source."""
        return self.numel * DTYPES[self.info.dtype].itemsize if self.expert else self.info.nbytes


def _main_dtype(config, infos: list[TensorInfo]) -> torch.dtype:
    """The dtype transformers loads the model in with dtype="auto": the config's, else the first float tensor's."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if isinstance(dtype, torch.dtype):
        return dtype
    first_file = infos[0].file if infos else None
    for info in infos:
        if info.file == first_file and info.dtype in _FLOAT_SOURCES:
            return DTYPES[info.dtype]
    return DTYPES.get(infos[0].dtype, torch.float32) if infos else torch.float32


def _quantized_size(numel: int, blocksize: int, double_quant: bool) -> int:
    blocks = -(-numel // blocksize)
    size = (numel + 1) // 2 + 64 + 200  # packed, quant_map, the JSON state (about)
    size += blocks if double_quant else 4 * blocks
    if double_quant:
        size += 4 * -(-blocks // 256) + 1024
    return size


def _plan(config, infos, cls, *, skip, blocksize, double_quant):
    """(items, main dtype, quantized module names, skipped module names)."""
    model = skeleton.skeleton(config, cls)
    main_dtype = _main_dtype(config, infos)
    not_convert = skeleton.modules_to_not_convert(model, skip)
    chosen = skeleton.quantized_modules(model, not_convert)
    fp32 = skeleton.fp32_patterns(model, main_dtype)
    keys = set(model.state_dict().keys())
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    prefix = getattr(model, "base_model_prefix", "")
    has_prefix = bool(prefix) and any(k.startswith(prefix + ".") for k in keys)
    buffers = {n for n, _ in model.named_buffers()}
    items, unmatched, dropped = [], [], []
    experts = _expert_sources(model, infos, not_convert)
    rename = renamer(model)
    for info in infos:
        key = info.name
        if info.name in experts:  # one item per expert, where its first source tensor is
            items += _expert_items(*experts.pop(info.name), main_dtype, blocksize, double_quant)
            continue
        if key not in keys and prefix:
            if has_prefix and f"{prefix}.{key}" in keys:
                key = f"{prefix}.{key}"
            elif not has_prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in keys:
                key = key[len(prefix) + 1 :]
        if key in tied:
            continue  # a tied copy: transformers does not save it either
        if key not in keys and key in buffers:
            # a non-persistent buffer an older version saved: transformers drops it
            dropped.append(info.name)
            continue
        if key not in keys and rename(key) not in keys:
            unmatched.append(info.name)  # kept as it is (a name transformers renames is kept too)
        if info.dtype not in DTYPES:
            raise ConversionError(f"{info.name} in {info.file.name}: unsupported dtype {info.dtype}")
        module, _, leaf = key.rpartition(".")
        quantize = leaf == "weight" and module in chosen and len(info.shape) == 2
        if quantize and info.dtype not in _FLOAT_SOURCES:
            raise ConversionError(
                f"{info.name} in {info.file.name}: unsupported dtype {info.dtype} for a weight to quantize "
                "(expected F32, F16 or BF16; is the checkpoint already quantized?)"
            )
        if info.dtype in _FLOAT_SOURCES:
            dtype = torch.float32 if skeleton.keeps_fp32(key, fp32) else main_dtype
        else:
            dtype = DTYPES[info.dtype]
        if quantize:
            size = _quantized_size(info.numel, blocksize, double_quant)
        else:
            size = info.numel * torch.empty((), dtype=dtype).element_size()
        items.append(_Item(info, key, dtype, quantize, quantize and chosen[module], size))
    if dropped:
        logger.info("dropped non-persistent buffers, as transformers does: %s", ", ".join(dropped))
    if unmatched:
        logger.warning(
            "%d tensor(s) are not in %s's state dict and are copied unchanged: %s",
            len(unmatched), cls.__name__, ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else ""),
        )  # fmt: skip
    skipped = sorted(
        n for n, m in model.named_modules() if isinstance(m, skeleton.linear_kinds()) and n not in chosen
    )
    return items, main_dtype, sorted(chosen), skipped


def _expert_sources(model, infos: list[TensorInfo], not_convert: list[str]) -> dict[str, tuple]:
    """{first source tensor's name: (ExpertWeight, its sources by name)} of the expert weights to
    quantize (their experts modules selected as `compile` selects them); their other sources map to
    `(None, None)` so that the plan skips them."""
    by_name = {i.name: i for i in infos}
    weights = expert_weights(model, list(by_name), {i.name: i.shape for i in infos})
    out: dict[str, tuple] = {}
    for weight in weights.values():
        if not skeleton.should_convert(weight.module, not_convert):
            continue
        keys = weight.source_keys()
        bad = [k for k in keys if by_name[k].dtype not in _FLOAT_SOURCES]
        if bad:
            raise ConversionError(f"{bad[0]}: unsupported dtype {by_name[bad[0]].dtype} for an expert weight")
        first = min(keys, key=[i.name for i in infos].index)
        out.update(dict.fromkeys(keys, (None, None)))
        out[first] = (weight, {k: by_name[k] for k in keys})
    return out


def _expert_items(weight, sources, main_dtype, blocksize, double_quant) -> list[_Item]:
    if weight is None:
        return []  # a later source of an expert weight already planned
    first = next(iter(sources.values()))
    size = _quantized_size(math.prod(weight.shape), blocksize, double_quant)
    return [
        _Item(first, f"{weight.key(e)}.weight", main_dtype, True, False, size, (weight, e, sources))
        for e in range(weight.num_experts)
    ]


def _nonfinite_error(item: _Item, chunk: torch.Tensor, row0: int, allow_hint: bool) -> ConversionError:
    bad = ~torch.isfinite(chunk)
    first = bad.nonzero()[0].tolist()
    first[0] += row0
    nan, inf = int(torch.isnan(chunk).sum()), int(torch.isinf(chunk).sum())
    hint = (
        "; pass --allow-nonfinite (allow_nonfinite=True) to keep them"
        if allow_hint
        else "; a weight to quantize cannot hold them"
    )
    return ConversionError(
        f"{item.info.name} in {item.info.file.name} holds non-finite values ({nan} NaN, {inf} Inf in rows "
        f"{row0}..{row0 + chunk.shape[0] - 1}), first at index {tuple(first)}{hint}"
    )


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t` (min and max propagate NaN; 15x faster than isfinite().all() here)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _read_dense(item: _Item, allow_nonfinite: bool) -> torch.Tensor:
    info = item.info
    check = info.dtype in _FLOAT_SOURCES and not allow_nonfinite
    if len(info.shape) == 0 or info.numel <= _CHUNK_ELEMENTS:
        t = model_folder.read(info)
        if check and not _all_finite(t):
            raise _nonfinite_error(item, t.reshape(1, -1) if t.dim() < 2 else t, 0, True)
        return t.to(item.dtype)
    out = torch.empty(info.shape, dtype=item.dtype)
    for a, b in row_chunks(info, _CHUNK_ELEMENTS):
        chunk = model_folder.read(info, a, b)
        if check and not _all_finite(chunk):
            raise _nonfinite_error(item, chunk, a, True)
        out[a:b] = chunk
        del chunk
    return out


def _read_quantized(item: _Item, quant_type: str, blocksize: int, double_quant: bool) -> QuantizedWeight:
    """Quantize the weight in slices of whole blocks: the bytes equal quantizing it whole."""
    info = item.info
    rows_stored, cols_stored = info.shape
    out_f, in_f = (cols_stored, rows_stored) if item.conv1d else (rows_stored, cols_stored)
    n = out_f * in_f
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    multiple = blocksize // math.gcd(in_f, blocksize)  # rows per slice: whole blocks
    per_row = max(1, _CHUNK_ELEMENTS // in_f)
    step = max(multiple, per_row - per_row % multiple)
    for a in range(0, out_f, step):
        b = min(out_f, a + step)
        chunk = model_folder.read(info, a, b, columns=item.conv1d)
        if item.conv1d:
            chunk = chunk.t()
        flat = chunk.to(item.dtype).reshape(-1)
        p, am, bad = dispatch.quantize_4bit(flat, quant_type, blocksize)
        if bad:
            raise _nonfinite_error(item, chunk, a, False)
        start = a * in_f
        packed[start // 2 : start // 2 + p.numel()] = p
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        del chunk, flat, p, am
    qw = QuantizedWeight(
        packed.view(-1, 1), absmax, quant_type, blocksize, torch.Size((out_f, in_f)), item.dtype
    )
    if double_quant:
        codes, nested, offset = _torch_kernels.quantize_nested(absmax)
        qw = dataclasses.replace(qw, absmax=codes, nested_absmax=nested, offset=offset)
    return qw


def _read_expert(item: _Item, quant_type: str, blocksize: int, double_quant: bool) -> QuantizedWeight:
    """One expert's matrix, read from its source tensors alone and quantized as `compile` quantizes it."""
    weight, expert, sources = item.expert

    def read(key: str, index: int | None) -> torch.Tensor:
        t = (
            model_folder.read(sources[key])
            if index is None
            else model_folder.read(sources[key], index, index + 1)[0]
        )
        if not _all_finite(t):
            raise _nonfinite_error(
                dataclasses.replace(item, info=sources[key]), t.reshape(t.shape[0], -1), 0, False
            )
        return t

    matrix = weight.matrix(expert, read).to(item.dtype)
    return quantize_weight(matrix, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)


def bnb_quantization_config(
    quant_type: str, double_quant: bool, compute_dtype: str | torch.dtype, skip: list[str] | None
) -> dict:
    """config.json's quantization_config for a bitsandbytes 4-bit folder, as transformers writes it."""
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=parse_dtype(compute_dtype, "compute dtype"),
        llm_int8_skip_modules=skip,
    ).to_dict()


def _write_config(config, dst: Path, main_dtype, options: dict, skip_list) -> None:
    config.dtype = main_dtype
    config.quantization_config = bnb_quantization_config(
        options["quant_type"], options["double_quant"], options["compute_dtype"], skip_list
    )
    config.save_pretrained(str(dst))


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "bfloat16",
    skip: list[str] | tuple[str, ...] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Convert a Hugging Face safetensors folder into a bitsandbytes 4-bit folder, streaming.

    Args:
        src: a model folder: config.json and model.safetensors (or shards with an index).
        dst: the folder to create; `from_pretrained(dst)` loads it with bitsandbytes installed.
        quant_type, blocksize, double_quant, compute_dtype: the BitsAndBytesConfig options
            (`bnb_4bit_quant_type`, blocksize 64 is bitsandbytes', `bnb_4bit_use_double_quant`,
            `bnb_4bit_compute_dtype`).
        skip: module name patterns kept dense, on top of transformers' defaults (output head,
            tied weights, `_keep_in_fp32_modules`); written to `llm_int8_skip_modules`.
        max_shard_size: largest output shard ("2GB", "500MB", or bytes).
        overwrite: replace an existing `dst`.
        allow_nonfinite: keep NaN/Inf in tensors that stay dense (weights to quantize never can).
        progress: show a tqdm bar on stderr.

    Raises:
        ConversionError (a ValueError): missing or non-HF folder, truncated or corrupt safetensors,
            non-finite values, an unsupported dtype, `dst` exists. Nothing is left at `dst`.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if quant_type not in BNB_QUANT_TYPES:  # int4 too: the output is a bitsandbytes folder
        raise ConversionError(
            f"quant_type must be one of bitsandbytes' 4-bit types {BNB_QUANT_TYPES}, got {quant_type!r}"
        )
    if blocksize not in BLOCKSIZES:
        raise ConversionError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    compute_dtype = parse_dtype(compute_dtype, "compute dtype")
    max_bytes = parse_size(max_shard_size, "max_shard_size")
    folder = ModelFolder(src)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (pass --overwrite / overwrite=True to replace it)")
    if dst.resolve() == src.resolve():
        raise ConversionError("source and destination are the same folder")
    config = folder.config()
    if getattr(config, "quantization_config", None) is not None:
        raise ConversionError(
            f"{src}: the checkpoint is already quantized (config.json has a quantization_config)"
        )
    infos = list(folder.infos.values())
    cls = skeleton.model_class(config)
    items, main_dtype, chosen, skipped = _plan(
        config, infos, cls, skip=list(skip or []), blocksize=blocksize, double_quant=double_quant
    )
    options = {
        "quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
        "compute_dtype": str(compute_dtype).removeprefix("torch."), "skip": list(skip or []),
        "max_shard_size": max_bytes, "allow_nonfinite": allow_nonfinite,
    }  # fmt: skip
    bytes_in = sum(i.nbytes for i in items)
    bar = tqdm(total=bytes_in, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", file=sys.stderr,
               disable=not progress)  # fmt: skip

    def entries(item: _Item) -> tuple[list[Entry], int]:
        """The item's tensors (a 4-bit weight computed now, a dense tensor when written) and its 4-bit bytes."""
        if not item.quantize:
            spec = TensorSpec(item.key, item.dtype, item.info.shape)
            return [Entry(spec, lambda: _read_dense(item, allow_nonfinite))], 0
        read = _read_expert if item.expert else _read_quantized
        qw = read(item, quant_type, blocksize, double_quant)
        part = [Entry.of(k, t) for k, t in qw.to_bnb(item.key.removesuffix(".weight")).items()]
        return part, sum(e.spec.nbytes for e in part)

    with bar, OutputFolder(dst, inputs=folder.files, options=options, max_shard_size=max_bytes,
                           bad_input=ConversionError) as out:  # fmt: skip
        written = out.write_weights(
            items,
            entries,
            size=lambda i: i.out_bytes,
            on_item=lambda i: bar.update(i.nbytes),
            total_parameters=sum(i.numel for i in items),
        )
        skip_list = (
            sorted(set(skeleton.modules_to_not_convert(skeleton.skeleton(config, cls), [])) | set(skip))
            if skip
            else None
        )
        _write_config(config, out.path, main_dtype, options, skip_list)
        folder.copy_extras(out.path)
    return ConversionResult(
        dst=dst,
        bytes_in=bytes_in,
        bytes_out=written.bytes_out,
        parameters=sum(i.numel for i in items),
        quantized_parameters=sum(i.numel for i in items if i.quantize),
        quantized_bytes=sum(written.notes),
        quantized_modules=len([i for i in items if i.quantize]),
        shards=len(written.shards),
        reused_shards=written.reused,
        seconds=time.perf_counter() - start,
        skipped_modules=skipped,
    )
