"""Hugging Face-style checkpoint directories: quantize file to file, read, verify, inspect.

A checkpoint directory holds ``config.json`` and one or more ``*.safetensors`` shards (with
``model.safetensors.index.json`` when there are several). Everything here works shard by shard
through lazy (memory-mapped) readers, so memory holds one output shard plus one tensor.

Quantized checkpoints come in four flavours, told apart by ``quantization_config.quant_method``:
``"int4tensor"`` (ours: :func:`int4tensor.serialization.save_file` shards), and the imported
formats of :mod:`int4tensor.formats` (``"compressed-tensors"``, ``"awq"``, ``"gptq"``).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from int4tensor.formats import compressed_tensors as ct
from int4tensor.formats import format_module
from int4tensor.serialization import (
    Reader,
    current_umask,
    atomic_write_path,
    check_layout,
    save_file,
)
from int4tensor.config import Int4WeightOnlyConfig
from int4tensor import native_format
from int4tensor.quant_primitives import check_group_size
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
        self.index: dict[str, str] | None = None  # weight_map of the index, if there is one
        if os.path.isfile(self.path):
            # one shard: the quantization_config of the directory it sits in, if any
            self.dir = os.path.dirname(self.path) or "."
            sibling = os.path.join(self.dir, CONFIG_NAME)
            self.config = _read_config(sibling) if os.path.isfile(sibling) else {}
            self.files = [os.path.basename(self.path)]
        elif os.path.isdir(self.path):
            self.dir = self.path
            self.config = _read_config(os.path.join(self.dir, CONFIG_NAME), required=False)
            self.files, self.index = _shard_files(self.dir)
        else:
            raise FileNotFoundError(f"no such checkpoint file or directory: {self.path}")
        self.quantization_config = self.config.get("quantization_config")
        self.quant_method = (self.quantization_config or {}).get("quant_method")
        self.format = None  # the format module for imported checkpoints
        self.format_config = None
        if self.quant_method not in (None, _NATIVE):
            try:
                self.format = format_module(self.quant_method)
                self.format_config = self.format.parse_config(self.quantization_config)
            except ValueError as e:
                raise ValueError(f"{os.path.join(self.dir, CONFIG_NAME)}: {e}") from e
        self._readers: dict[str, Reader] = {}
        self._location: dict[str, str] = {}  # stored (logical for native) name -> file
        for f in self.files:
            for key in self.reader(f).keys():
                self._location[key] = f
        if self.quant_method is None and any(self.reader(f).described for f in self.files):
            self.quant_method = _NATIVE  # a shard of ours, read without its config.json
        self._check_index()
        if self.format is not None and os.path.isdir(self.path):
            # (one shard alone may hold a module's scales while another holds its weight)
            self._check_modules()

    def _check_index(self) -> None:
        """Every tensor the index names is in the shard it names: a missing one would otherwise
        vanish from a conversion without a word."""
        if self.index is None:
            return
        for key, file in self.index.items():
            if key not in self.reader(file).raw_keys():
                raise ValueError(f"{os.path.join(self.dir, INDEX_NAME)} lists tensor {key!r} in "
                                 f"{file}, which does not contain it (truncated or mismatched "
                                 "shard?)")

    def _check_modules(self) -> None:
        """Each quantized module has its packed weight: scales without ``weight_packed`` /
        ``qweight`` would otherwise be copied as dense tensors and the weight lost."""
        prefixes = self._module_prefixes()
        for key, file in self._location.items():
            prefix, _, suffix = key.rpartition(".")
            if suffix in self.format.SUFFIXES and suffix != self.format.MARKER and \
                    prefix not in prefixes:
                raise ValueError(f"{os.path.join(self.dir, file)}: {prefix!r} has {suffix!r} but "
                                 f"no {self.format.MARKER!r}: its quantized weight is missing")

    def reader(self, file: str) -> Reader:
        if file not in self._readers:
            self._readers[file] = Reader(os.path.join(self.dir, file),
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
    """A JSON object from ``path`` (None if absent and not ``required``)."""
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"missing {path}")
        return None
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    try:
        with open(path) as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def _read_config(path: str, required: bool = True) -> dict:
    """config.json: an object whose ``quantization_config``, if present, is an object too."""
    config = _read_json(path, required) or {}
    qcfg = config.get("quantization_config")
    if qcfg is not None and not isinstance(qcfg, dict):
        raise ValueError(f"{path}: quantization_config must be a JSON object, not a "
                         f"{type(qcfg).__name__}")
    return config


def _allowed_roots(directory: str) -> list[str]:
    """Where files of ``directory`` may resolve to: the directory itself, and for a Hugging
    Face hub cache snapshot (``.../snapshots/<rev>``, whose files are symlinks to
    ``../../blobs/<hash>``) that repository's ``blobs`` directory."""
    real = os.path.realpath(directory)
    roots = [real]
    parent = os.path.dirname(os.path.abspath(directory))
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.realpath(os.path.join(parent, "..", "blobs")))
    return roots


def _inside(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def safe_member(directory: str, name, what: str) -> str:
    """``os.path.join(directory, name)`` for a file name that comes from a file's contents (an
    index's shard name) or a listing: a plain name (no directory part, not absolute, no
    ``..``) that does not resolve outside ``directory`` through a symlink. Raises
    ``ValueError`` otherwise; the same name is then safe to create inside an output directory."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or \
            "\\" in name or os.sep in name or (os.altsep and os.altsep in name) or \
            "\0" in name or os.path.isabs(name):
        raise ValueError(f"{directory}: refusing {what} {name!r}: it must be a plain file name "
                         "inside the checkpoint directory (no directories, '..' or absolute "
                         "paths)")
    path = os.path.join(directory, name)
    if os.path.lexists(path) and not _inside(path, _allowed_roots(directory)):
        raise ValueError(f"{directory}: refusing {what} {name!r}: it resolves to "
                         f"{os.path.realpath(path)}, outside the checkpoint directory")
    return path


def _shard_files(directory: str) -> tuple[list[str], dict[str, str] | None]:
    """The shard names (from the index if there is one, else every ``*.safetensors``) and the
    index's weight_map."""
    index_path = os.path.join(directory, INDEX_NAME)
    index = _read_json(index_path, required=False)
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError(f"{index_path} has no weight_map (an object of tensor name -> "
                             "shard file name)")
        files = sorted(set(weight_map.values()))
        for f in files:
            path = safe_member(directory, f, f"shard name in {INDEX_NAME}")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{directory}: shard {f!r} listed in {INDEX_NAME} is "
                                        "missing")
        return files, weight_map
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors file")
    for f in files:
        safe_member(directory, f, "shard")
    return files, None


# ---- writing a checkpoint directory atomically ---------------------------------------------
_PARTIAL_MARKER = ".int4tensor-partial"  # inside an unfinished output: "<host> <pid>"


class _OutputDir:
    """Builds DST under a temporary sibling name and renames it into place on success.

    The temporary directory holds a marker naming this process; a run killed before it could
    clean up (SIGKILL, power loss) leaves it behind, and the next run to the same DST removes
    such leftovers whose process is gone (``removed`` lists them).
    """

    def __init__(self, dst: str, overwrite: bool, src: str | None = None):
        self.dst = os.path.abspath(dst)
        self.removed: list[str] = []
        parent = os.path.dirname(self.dst)
        if src is not None:
            _check_apart(os.path.abspath(src), self.dst)
        if os.path.lexists(self.dst) and not os.path.isdir(self.dst):
            raise FileExistsError(f"{self.dst} exists and is not a directory")
        if os.path.exists(self.dst) and os.listdir(self.dst) and not overwrite:
            raise FileExistsError(f"{self.dst} exists and is not empty (pass overwrite=True "
                                  "/ --overwrite to replace it)")
        existing = parent
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"cannot create {self.dst}: {existing} is a file, not a "
                                     "directory")
        os.makedirs(parent, exist_ok=True)
        self.removed = _remove_stale_temporaries(self.dst)

    def __enter__(self) -> str:
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.", suffix=".tmp",
                                    dir=os.path.dirname(self.dst))
        os.chmod(self.tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        with open(os.path.join(self.tmp, _PARTIAL_MARKER), "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        os.remove(os.path.join(self.tmp, _PARTIAL_MARKER))
        old = None
        if os.path.exists(self.dst):
            old = self.tmp + ".old"
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        return False


def _check_apart(src: str, dst: str) -> None:
    """SRC and DST must be different directories, neither inside the other: writing DST (or
    replacing it with --overwrite) must never touch SRC."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst:
        raise ValueError(f"DST {dst} is SRC; write the quantized checkpoint elsewhere")
    if real_dst.startswith(real_src.rstrip(os.sep) + os.sep):
        raise ValueError(f"DST {dst} is inside SRC {src}; write it outside the source checkpoint")
    if real_src.startswith(real_dst.rstrip(os.sep) + os.sep):
        raise ValueError(f"SRC {src} is inside DST {dst}; DST would replace it")


def _remove_stale_temporaries(dst: str) -> list[str]:
    """Remove ``.<DST name>.<random>.tmp`` directories next to DST that an interrupted run
    left: those whose marker names a process of this host that no longer runs, and unmarked
    ones (written by int4tensor 0.1.0, which had no marker)."""
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    pattern = re.compile(r"\." + re.escape(base) + r"\.[A-Za-z0-9_]{8}\.tmp(\.old)?")
    removed = []
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or os.path.islink(path) or not os.path.isdir(path):
            continue
        marker = os.path.join(path, _PARTIAL_MARKER)
        if os.path.isfile(marker):
            try:
                host, pid = open(marker).read().split()
                alive = host != socket.gethostname() or _process_alive(int(pid))
            except (OSError, ValueError):
                alive = False
            if alive:
                continue  # another run writing the same DST right now
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_side_files(src: str, tmp: str) -> list[str]:
    """Copy tokenizer files etc.: everything but shards, the index and config.json (a symlink
    that leads outside SRC is refused, as for shards)."""
    copied = []
    for entry in sorted(os.listdir(src)):
        if entry.endswith(".safetensors") or entry in (INDEX_NAME, CONFIG_NAME) or \
                entry.startswith("."):
            continue
        path = safe_member(src, entry, "file")
        if os.path.isdir(path):
            roots = _allowed_roots(src)
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    if not _inside(os.path.join(root, name), roots):
                        raise ValueError(f"{src}: refusing to copy {os.path.join(root, name)}: "
                                         "it resolves outside the checkpoint directory")
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
        return sum(v.numel() * v.element_size() for v in t.inner_tensors().values())
    return t.numel() * t.element_size()


# ---- quantize ---------------------------------------------------------------------------------
def _device(device) -> torch.device:
    """The device to quantize on (default: CUDA if available), checked to exist here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(device)!r} (e.g. 'cpu', 'cuda', 'cuda:1')") from e
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend and hasattr(backend, "is_available")
                                     and backend.is_available()):
        raise ValueError(f"device {str(device)!r} is not available in this torch build / on "
                         "this machine")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return device


#: Rows are quantized this many elements at a time: quantizing works in float32 with several
#: temporaries (about 6.5x a bf16 tensor's size), so a whole 11008 x 4096 weight would need
#: ~560 MiB on top of the output shard; chunks of rows give the same bits with ~50 MiB.
_CHUNK_ELEMENTS = 4 * 2**20


def _quantize_in_row_chunks(config: Int4WeightOnlyConfig, t: torch.Tensor,
                            device: torch.device) -> torch.Tensor:
    """``config.quantize_weight(t)`` on the CPU, computed a block of output rows (N) at a time
    on ``device`` and concatenated: groups lie along K within a row, so the result is
    bit-identical to quantizing the whole tensor at once."""
    n_dim = -1 if config.k_dim == -2 else -2
    n = t.shape[n_dim]
    step = max(1, _CHUNK_ELEMENTS // max(1, t.numel() // max(n, 1)))
    if step >= n:
        return config.quantize_weight(t.to(device)).to("cpu")
    parts = [config.quantize_weight(t.narrow(n_dim, start, min(step, n - start)).to(device))
             .to("cpu") for start in range(0, n, step)]
    return torch.cat(parts, dim=n_dim)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hand the heap memory freed by the last tensor's temporaries back to the OS: glibc keeps
    it otherwise (its mmap threshold grows after large frees), which measured as ~260 MiB of
    extra resident memory on a 1 GB shard (scripts/measure_quantize_memory.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class ConversionReport:
    """What a conversion did: quantized names, kept names with the reason, bytes."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    src_bytes: int = 0
    dst_bytes: int = 0
    #: leftovers of interrupted earlier runs to the same DST that were removed
    removed_temporaries: list[str] = field(default_factory=list)


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
    check_group_size(group_size, "group size")
    device = _device(device)
    patterns = []
    for p in ignore:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"ignore pattern {p!r} is not a valid regular expression: {e}") \
                from e
    ckpt = Checkpoint(src)
    if not os.path.isdir(ckpt.path):
        raise ValueError(f"{ckpt.path}: SRC must be a checkpoint directory")
    if not os.path.isfile(os.path.join(ckpt.dir, CONFIG_NAME)):
        raise FileNotFoundError(f"{ckpt.path} has no {CONFIG_NAME}: a quantized checkpoint needs "
                                "the model's config (with a quantization_config added) to load")
    if ckpt.quant_method is not None:
        raise ValueError(f"{ckpt.path} is already quantized (quant_method="
                         f"{ckpt.quant_method!r}); quantize a high-precision checkpoint")
    if expert_k_dim not in (-1, -2):
        raise ValueError(f"expert_k_dim must be -1 or -2, got {expert_k_dim!r}")
    domain = "none" if symmetric else ("float" if format == "native" else "int")
    configs = {nd: Int4WeightOnlyConfig(group_size, zero_point_domain=domain,
                                        k_dim=expert_k_dim if nd == 3 else -1) for nd in (2, 3)}
    report = ConversionReport()
    weight_map: dict[str, str] = {}
    ct_ignored: set[str] = {"lm_head"} if any(p.search("lm_head") for p in patterns) else set()

    output = _OutputDir(dst, overwrite, src=ckpt.path)
    report.removed_temporaries = output.removed
    with output as tmp:
        for file in tqdm(ckpt.files, desc="shards", unit="shard", disable=not progress):
            out: dict[str, torch.Tensor] = {}
            reader = ckpt.reader(file)
            for name in tqdm(reader.keys(), desc=file, unit="tensor", leave=False,
                             disable=not progress):
                # A fresh memory map per tensor: the pages read through it leave this process's
                # resident set with it (only kept tensors hold theirs), instead of the whole
                # shard staying mapped and resident until the shard is done.
                with Reader(os.path.join(ckpt.dir, file)) as once:
                    t = once.get(name)
                report.src_bytes += _bytes(t)
                k_dim = configs[t.ndim].k_dim if t.ndim in configs else -1
                reason = _skip_reason(name, t, patterns, group_size, format, k_dim)
                if reason is not None:
                    report.kept[name] = reason
                    if t.ndim == 2 and name.endswith(".weight") and reason != "embedding":
                        ct_ignored.add(name[: -len(".weight")])
                    out[name] = t
                    continue
                try:
                    q = _quantize_in_row_chunks(configs[t.ndim], t, device)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{os.path.join(ckpt.dir, file)}: cannot quantize {name!r}: "
                                     f"{e}") from e
                report.quantized.append(name)
                if format == "native":
                    out[name] = q
                else:
                    prefix = name[: -len(".weight")]
                    parts = ct.export_weight(q, symmetric=symmetric, name=name)
                    out.update({f"{prefix}.{s}": v for s, v in parts.items()})
                del t
                _return_freed_memory()
            save_file(out, os.path.join(tmp, file), field_separator=_SEP)
            for key, v in out.items():
                report.dst_bytes += _bytes(v)
                if isinstance(v, Int4BaseTensor):  # the index lists what the file holds
                    weight_map.update({f"{key}{_SEP}{f}": file for f in v.inner_tensors()})
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
    output = _OutputDir(dst, overwrite, src=ckpt.dir)
    report.removed_temporaries = output.removed
    with output as tmp:
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
                keys = [f"{key}{_SEP}{f}" for f in v.inner_tensors()] \
                    if isinstance(v, Int4BaseTensor) else [key]
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
    for name in ref.names():  # a tensor DST lost (a whole layer, say) is a failure too
        if name not in out:
            r = ref.get(name)
            rows.append(VerifyRow(name, tuple(r.shape), math.nan, math.nan, False,
                                  f"missing in DST (in SRC {ref.file_of(name)})"))
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
