"""Hugging Face-style checkpoint directories: quantize file to file, read, verify, inspect.

A checkpoint directory holds ``config.json`` and one or more ``*.safetensors`` shards (with
``model.safetensors.index.json`` when there are several). Everything here works shard by shard
through lazy (memory-mapped) readers, so memory holds one output shard plus one tensor.

Quantized checkpoints come in four flavours, told apart by ``quantization_config.quant_method``:
``"int4tensor"`` (ours: :func:`int4tensor.serialization.save_file` shards), and the imported
formats of :mod:`int4tensor.formats` (``"compressed-tensors"``, ``"awq"``, ``"gptq"``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from int4tensor.formats import compressed_tensors as ct
from int4tensor.formats import format_module
from int4tensor.serialization import (
    _Reader,
    _umask,
    atomic_write_path,
    check_layout,
    save_file,
)
from int4tensor.config import Int4WeightOnlyConfig
from int4tensor import native_format
from int4tensor.tensors import Int4BaseTensor

__all__ = [
    "Checkpoint",
    "quantize_checkpoint",
    "convert_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "inspect_checkpoint",
    "DEFAULT_IGNORE",
]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
#: Regexes (``re.search`` on the tensor name) of weights kept in high precision by default.
DEFAULT_IGNORE = ("lm_head",)
# Embedding tables are 2D ``.weight``s but not linear layers: never quantized.
_EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe)\.")
_NATIVE = native_format.QUANT_METHOD
_SEP = native_format.FIELD_SEPARATOR  # quantized fields: "layer.weight__qdata"


# ---- reading ----------------------------------------------------------------------------------
class Checkpoint:
    """A lazily read checkpoint: a directory (config.json + shards) or one safetensors file.

    ``names()`` lists logical tensors: for quantized modules of any supported format the dense
    name (``prefix.weight``), whose ``get`` returns an :class:`Int4Tensor`; for the rest the
    stored name and plain tensor. ``dtype`` is the scale dtype for imported formats (float32,
    exact; see docs/formats.md).
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32):
        self.path = os.fspath(path)
        self.dtype = dtype
        if os.path.isfile(self.path):
            self.dir, self.config = os.path.dirname(self.path), {}
            self.files = [os.path.basename(self.path)]
        elif os.path.isdir(self.path):
            self.dir = self.path
            self.config = _read_json(os.path.join(self.dir, CONFIG_NAME), required=False) or {}
            self.files = _shard_files(self.dir)
        else:
            raise FileNotFoundError(f"no such checkpoint file or directory: {self.path}")
        self.quantization_config = self.config.get("quantization_config")
        self.quant_method = (self.quantization_config or {}).get("quant_method")
        self.format = None  # the format module for imported checkpoints
        self.format_config = None
        if self.quant_method not in (None, _NATIVE):
            self.format = format_module(self.quant_method)
            try:
                self.format_config = self.format.parse_config(self.quantization_config)
            except ValueError as e:
                raise ValueError(f"{os.path.join(self.dir, CONFIG_NAME)}: {e}") from e
        self._readers: dict[str, _Reader] = {}
        self._location: dict[str, str] = {}  # stored (logical for native) name -> file
        for f in self.files:
            for key in self.reader(f).keys():
                self._location[key] = f

    def reader(self, file: str) -> _Reader:
        if file not in self._readers:
            self._readers[file] = _Reader(os.path.join(self.dir, file),
                                          resolve_raw=self._raw_from_any_shard)
        return self._readers[file]

    def _raw_from_any_shard(self, key: str) -> torch.Tensor:
        """A stored tensor of any shard (a quantized tensor's fields may span shards)."""
        for f in self.files:
            r = self.reader(f)
            if key in r.raw_keys():
                return r.get_raw(key)
        raise ValueError(f"{self.path}: tensor field {key!r} is in no shard (a shard is missing "
                         "or incomplete)")

    def stored_names(self, file: str | None = None) -> list[str]:
        files = self.files if file is None else [file]
        return [k for f in files for k in self.reader(f).keys()]

    def _module_prefixes(self) -> set[str]:
        marker = "." + self.format.MARKER
        return {k[: -len(marker)] for k in self._location if k.endswith(marker)}

    def names(self, file: str | None = None) -> list[str]:
        """Logical names (of the tensors in ``file`` only, if given)."""
        stored = self.stored_names(file)
        if self.format is None:
            return stored
        prefixes = self._module_prefixes()
        out = []
        for key in stored:
            prefix, _, suffix = key.rpartition(".")
            if prefix in prefixes and suffix in self.format.SUFFIXES:
                if suffix == self.format.MARKER:
                    out.append(f"{prefix}.weight")
            else:
                out.append(key)
        return out

    def is_quantized(self, name: str) -> bool:
        if self.format is None:
            return name in self._location and name in self.reader(self._location[name]).described
        return name.endswith(".weight") and name[: -len(".weight")] in self._module_prefixes()

    def get_stored(self, key: str) -> torch.Tensor:
        if key not in self._location:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return self.reader(self._location[key]).get(key)

    def get(self, name: str) -> torch.Tensor:
        if self.format is None or not self.is_quantized(name):
            return self.get_stored(name)
        prefix = name[: -len(".weight")]
        parts = {s: self.get_stored(f"{prefix}.{s}") for s in self.format.SUFFIXES
                 if f"{prefix}.{s}" in self._location}
        try:
            return self.format.import_weight(parts, self.format_config, prefix, self.dtype)
        except ValueError as e:
            raise ValueError(f"{os.path.join(self.dir, self.file_of(name))}: {e}") from e

    def file_of(self, name: str) -> str:
        if self.format is not None and self.is_quantized(name):
            return self._location[f"{name[: -len('.weight')]}.{self.format.MARKER}"]
        return self._location[name]

    def __contains__(self, name: str) -> bool:
        return name in self._location or (self.format is not None and self.is_quantized(name))


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict:
    """A whole checkpoint (ours, compressed-tensors, AWQ or GPTQ) as a state dict with
    :class:`Int4Tensor` weights; load it into a model quantized on the meta device with
    ``load_state_dict(sd, assign=True)``."""
    ckpt = Checkpoint(path, dtype)
    return {name: ckpt.get(name) for name in ckpt.names()}


def _read_json(path: str, required: bool = True) -> dict | None:
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"missing {path}")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _shard_files(directory: str) -> list[str]:
    index = _read_json(os.path.join(directory, INDEX_NAME), required=False)
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{os.path.join(directory, INDEX_NAME)} has no weight_map")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.isfile(os.path.join(directory, f)):
                raise FileNotFoundError(f"{directory}: shard {f!r} listed in {INDEX_NAME} is "
                                        "missing")
        return files
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors file")
    return files


# ---- writing a checkpoint directory atomically ---------------------------------------------
class _OutputDir:
    """Builds DST under a temporary sibling name and renames it into place on success."""

    def __init__(self, dst: str, overwrite: bool):
        self.dst = os.path.abspath(dst)
        if os.path.exists(self.dst) and not (os.path.isdir(self.dst) and not os.listdir(self.dst)):
            if not overwrite:
                raise FileExistsError(f"{self.dst} exists and is not empty (pass overwrite=True "
                                      "/ --overwrite to replace it)")
        os.makedirs(os.path.dirname(self.dst), exist_ok=True)

    def __enter__(self) -> str:
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.", suffix=".tmp",
                                    dir=os.path.dirname(self.dst))
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.dst):
            old = self.tmp + ".old"
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        return False


def _copy_side_files(src: str, tmp: str) -> list[str]:
    """Copy tokenizer files etc.: everything but shards, the index and config.json."""
    copied = []
    for entry in sorted(os.listdir(src)):
        if entry.endswith(".safetensors") or entry in (INDEX_NAME, CONFIG_NAME) or \
                entry.startswith("."):
            continue
        path = os.path.join(src, entry)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(tmp, entry))
        else:
            shutil.copy2(path, os.path.join(tmp, entry))
        copied.append(entry)
    return copied


def _write_dir_metadata(tmp: str, config: dict, weight_map: dict, total_size: int) -> None:
    with atomic_write_path(os.path.join(tmp, CONFIG_NAME)) as p, open(p, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with atomic_write_path(os.path.join(tmp, INDEX_NAME)) as p, open(p, "w") as f:
        json.dump(index, f, indent=2)


def _bytes(t: torch.Tensor) -> int:
    if isinstance(t, Int4BaseTensor):
        return sum(v.numel() * v.element_size() for v in t._tensors().values())
    return t.numel() * t.element_size()


# ---- quantize ---------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What a conversion did: quantized names, kept names with the reason, bytes."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    src_bytes: int = 0
    dst_bytes: int = 0


def _skip_reason(name: str, t: torch.Tensor, ignore: list[re.Pattern], group_size: int,
                 fmt: str, k_dim: int) -> str | None:
    """None if ``name`` should be quantized, else why not."""
    if t.ndim not in (2, 3):
        return f"{t.ndim}D"
    if not t.is_floating_point():
        return f"{t.dtype}"
    if t.ndim == 2 and not name.endswith(".weight"):
        return "2D but not a .weight"
    if _EMBEDDING.search(name):
        return "embedding"
    for pattern in ignore:
        if pattern.search(name):
            return f"matches ignore pattern {pattern.pattern!r}"
    if fmt == "compressed-tensors" and not name.endswith(".weight"):
        return "compressed-tensors stores only module .weight tensors quantized"
    if fmt == "compressed-tensors" and k_dim != -1:
        return "compressed-tensors has no [E, K, N] layout"
    if t.shape[k_dim] % group_size:
        return f"K = {t.shape[k_dim]} is not a multiple of group size {group_size}"
    return None


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    group_size: int = 128,
    format: str = "native",
    symmetric: bool = False,
    ignore=DEFAULT_IGNORE,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    expert_k_dim: int = -1,
) -> ConversionReport:
    """Quantize the linear weights of the HF-style checkpoint ``src`` into directory ``dst``.

    Shard by shard (one shard and one tensor in memory): 2D ``*.weight`` tensors and 3D expert
    weights ``[E, N, K]`` become int4 with groups of ``group_size`` along K; embeddings, norms,
    biases, weights matching a regex in ``ignore`` (default ``lm_head``) or whose K is not a
    multiple of the group size are copied as they are. Other files (tokenizer, generation
    config) are copied; ``config.json`` gets a ``quantization_config``; a new index is written.

    Args:
        format: ``"native"`` (our safetensors, :func:`~int4tensor.serialization.load_file`)
            or ``"compressed-tensors"`` (pack-quantized W4A16; vLLM/SGLang read it).
        symmetric: zero point 0 (``zero_point_domain="none"``). Otherwise native uses fbgemm's
            float zero points and compressed-tensors integer ones (so export is exact).
        device: where to quantize (default: CUDA if available, else CPU).
        expert_k_dim: K of 3D expert weights: ``-1`` for ``[E, N, K]`` (Mixtral/Qwen-MoE
            style), ``-2`` for ``[E, K, N]`` (Llama4/gpt-oss style; stored as transposed
            Int4Tensors, native format only).
    """
    if format not in ("native", "compressed-tensors"):
        raise ValueError(f"format must be 'native' or 'compressed-tensors', got {format!r}")
    from int4tensor.quant_primitives import SUPPORTED_GROUP_SIZES

    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = Checkpoint(src)
    if not os.path.isdir(ckpt.path):
        raise ValueError(f"{ckpt.path}: SRC must be a checkpoint directory")
    if ckpt.quant_method is not None:
        raise ValueError(f"{ckpt.path} is already quantized (quant_method="
                         f"{ckpt.quant_method!r}); quantize a high-precision checkpoint")
    if expert_k_dim not in (-1, -2):
        raise ValueError(f"expert_k_dim must be -1 or -2, got {expert_k_dim!r}")
    patterns = [re.compile(p) for p in ignore]
    domain = "none" if symmetric else ("float" if format == "native" else "int")
    configs = {nd: Int4WeightOnlyConfig(group_size, zero_point_domain=domain,
                                        k_dim=expert_k_dim if nd == 3 else -1) for nd in (2, 3)}
    report = ConversionReport()
    weight_map: dict[str, str] = {}
    ct_ignored: set[str] = {"lm_head"} if any(p.search("lm_head") for p in patterns) else set()

    with _OutputDir(dst, overwrite) as tmp:
        for file in tqdm(ckpt.files, desc="shards", unit="shard", disable=not progress):
            out: dict[str, torch.Tensor] = {}
            reader = ckpt.reader(file)
            for name in tqdm(reader.keys(), desc=file, unit="tensor", leave=False,
                             disable=not progress):
                t = reader.get(name)
                report.src_bytes += _bytes(t)
                k_dim = configs[t.ndim].k_dim if t.ndim in configs else -1
                reason = _skip_reason(name, t, patterns, group_size, format, k_dim)
                if reason is not None:
                    report.kept[name] = reason
                    if t.ndim == 2 and name.endswith(".weight") and reason != "embedding":
                        ct_ignored.add(name[: -len(".weight")])
                    out[name] = t
                    continue
                q = configs[t.ndim].quantize_weight(t.to(device)).to("cpu")
                report.quantized.append(name)
                if format == "native":
                    out[name] = q
                else:
                    prefix = name[: -len(".weight")]
                    parts = ct.export_weight(q, symmetric=symmetric, name=name)
                    out.update({f"{prefix}.{s}": v for s, v in parts.items()})
                del t
            save_file(out, os.path.join(tmp, file), field_separator=_SEP)
            for key, v in out.items():
                report.dst_bytes += _bytes(v)
                if isinstance(v, Int4BaseTensor):  # the index lists what the file holds
                    weight_map.update({f"{key}{_SEP}{f}": file for f in v._tensors()})
                else:
                    weight_map[key] = file
            del out
        config = dict(ckpt.config)
        if format == "native":
            config["quantization_config"] = native_format.quantization_config_dict(
                configs[2], None, True, ignore=list(ignore), expert_k_dim=expert_k_dim,
                not_converted=sorted(n.removesuffix(".weight") for n, r in report.kept.items()
                                     if n.endswith(".weight") and r not in ("1D", "embedding")))
        else:
            config["quantization_config"] = ct.quantization_config(
                group_size, symmetric, sorted(ct_ignored))
        _copy_side_files(ckpt.dir, tmp)
        _write_dir_metadata(tmp, config, weight_map, report.dst_bytes)
    return report


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Import an AWQ / GPTQ / compressed-tensors checkpoint into our native format, exactly
    (with the default float32 scale dtype), shard by shard; or rewrite a native checkpoint of
    int4tensor 0.1 (fields named ``NAME.qdata``) in the current format, bit for bit."""
    ckpt = Checkpoint(src, dtype)
    legacy = native_format.is_legacy_native(ckpt.quantization_config)
    if ckpt.format is None and not legacy:
        raise ValueError(f"{ckpt.path}: not an AWQ/GPTQ/compressed-tensors checkpoint nor one "
                         f"of int4tensor 0.1 (quant_method={ckpt.quant_method!r})")
    report = ConversionReport()
    weight_map: dict[str, str] = {}
    with _OutputDir(dst, overwrite) as tmp:
        for file in tqdm(ckpt.files, desc="shards", unit="shard", disable=not progress):
            out = {}
            for name in tqdm(ckpt.names(file), desc=file, unit="tensor", leave=False,
                             disable=not progress):
                t = ckpt.get(name)
                (report.quantized.append(name) if isinstance(t, Int4BaseTensor)
                 else report.kept.__setitem__(name, "not quantized in SRC"))
                out[name] = t
            save_file(out, os.path.join(tmp, file), field_separator=_SEP)
            for key, v in out.items():
                report.dst_bytes += _bytes(v)
                keys = [f"{key}{_SEP}{f}" for f in v._tensors()] if isinstance(v, Int4BaseTensor) \
                    else [key]
                weight_map.update(dict.fromkeys(keys, file))
        config = dict(ckpt.config)
        if legacy:  # int4tensor 0.1's CLI output: the same tensors, fields renamed
            old = ckpt.quantization_config
            config["quantization_config"] = native_format.quantization_config_dict(
                Int4WeightOnlyConfig(old.get("group_size", 128),
                                     zero_point_domain=old.get("zero_point_domain", "float")),
                None, True, ignore=old.get("ignore"), expert_k_dim=old.get("expert_k_dim", -1))
        else:
            config["quantization_config"] = native_format.quantization_config_dict(
                None, None, True, tensor_type="Int4Tensor",
                imported_from=ckpt.quantization_config)
        _copy_side_files(ckpt.dir, tmp)
        _write_dir_metadata(tmp, config, weight_map, report.dst_bytes)
    return report


# ---- verify -----------------------------------------------------------------------------------
@dataclass
class VerifyRow:
    name: str
    shape: tuple
    sqnr_db: float
    max_abs_err: float
    ok: bool
    note: str = ""


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``20 log10(||ref|| / ||ref - out||)`` in float64 (inf when equal)."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).norm().item()
    if noise == 0:
        return math.inf
    signal = ref.norm().item()
    return -math.inf if signal == 0 else 20 * math.log10(signal / noise)


def verify_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    threshold_db: float = 15.0,
    progress: bool = True,
) -> tuple[list[VerifyRow], dict]:
    """Dequantize every quantized tensor of ``dst`` and compare it with ``src``'s.

    Returns ``(rows, summary)``: one row per quantized tensor (SQNR, max abs error, ok when
    SQNR >= ``threshold_db``), and a summary with counts; tensors kept in high precision must
    be bit-identical to ``src``'s (each mismatch is a failing row). A scrambled nibble order
    shows up as an SQNR near 0 dB.
    """
    ref, out = Checkpoint(src), Checkpoint(dst)
    rows: list[VerifyRow] = []
    kept_same = 0
    for file in tqdm(out.files, desc="verify", unit="shard", disable=not progress):
        for name in out.names(file):
            t = out.get(name)
            if name not in ref:
                rows.append(VerifyRow(name, tuple(t.shape), math.nan, math.nan, False,
                                      "missing in SRC"))
                continue
            r = ref.get(name)
            if tuple(r.shape) != tuple(t.shape):
                rows.append(VerifyRow(name, tuple(t.shape), math.nan, math.nan, False,
                                      f"shape differs from SRC {list(r.shape)}"))
                continue
            if isinstance(t, Int4BaseTensor):
                d, r32 = t.dequantize(torch.float32), r.to(torch.float32)
                err = (d - r32).abs().max().item() if d.numel() else 0.0
                s = sqnr_db(r32, d)
                rows.append(VerifyRow(name, tuple(t.shape), s, err, s >= threshold_db))
            elif t.dtype == r.dtype and torch.equal(t, r):
                kept_same += 1
            else:
                rows.append(VerifyRow(name, tuple(t.shape), sqnr_db(r.double(), t.double()),
                                      math.nan, False, "kept tensor differs from SRC"))
    quantized = [r for r in rows if not r.note]
    summary = {
        "quantized": len(quantized),
        "kept_identical": kept_same,
        "failed": sum(not r.ok for r in rows),
        "min_sqnr_db": min((r.sqnr_db for r in quantized), default=math.nan),
        "threshold_db": threshold_db,
    }
    return rows, summary


# ---- inspect ----------------------------------------------------------------------------------
@dataclass
class InspectRow:
    name: str
    format: str
    shape: tuple
    dtype: str
    group_size: int | None
    nbytes: int
    check: str


def inspect_checkpoint(path: str | os.PathLike) -> tuple[list[InspectRow], dict]:
    """Per logical tensor: format, shape, dtype, group size, stored bytes, and ``check`` (``"ok"``
    or the problem: fields that contradict the metadata/config, an unreadable tensor).

    For imported formats the check is a full decode (shapes, dtypes, group count against the
    config, zero-point conventions, g_idx); a nibble order that the metadata misstates cannot
    be seen without the original weights: ``verify`` against them catches that.
    """
    ckpt = Checkpoint(path)
    fmt = ckpt.quant_method or "dense"
    rows = []
    for name in ckpt.names():
        quantized = ckpt.is_quantized(name)
        try:
            t = ckpt.get(name)
            problem = check_layout(t) if isinstance(t, Int4BaseTensor) else None
            check = problem or "ok"
        except (ValueError, KeyError) as e:
            rows.append(InspectRow(name, fmt if quantized else "dense", (), "?", None, 0,
                                   f"ERROR: {e}"))
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        if quantized and ckpt.format is not None:
            prefix = name[: -len(".weight")]
            parts = [ckpt.get_stored(f"{prefix}.{s}") for s in ckpt.format.SUFFIXES
                     if f"{prefix}.{s}" in ckpt._location]
            nbytes = sum(_bytes(p) for p in parts)
            # the stored scale dtype, not the float32 we import into
            dtype = next((str(p.dtype).removeprefix("torch.") for p in parts
                          if p.is_floating_point()), dtype)
        else:
            nbytes = _bytes(t)
        is_q = isinstance(t, Int4BaseTensor)
        rows.append(InspectRow(
            name, (fmt if ckpt.format is not None else type(t).__name__) if is_q else "dense",
            tuple(t.shape), dtype,
            getattr(t, "block_size", (None,))[-1] if is_q else None, nbytes, check))
    summary = {
        "path": ckpt.path, "quant_method": fmt, "files": len(ckpt.files),
        "tensors": len(rows), "quantized": sum(r.group_size is not None for r in rows),
        "bytes": sum(r.nbytes for r in rows),
        "problems": sum(r.check != "ok" for r in rows),
    }
    return rows, summary
