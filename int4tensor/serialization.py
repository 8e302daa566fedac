"""Safetensors files that hold int4tensor tensor subclasses next to plain tensors, no pickle.

A quantized entry ``name`` (any :class:`~int4tensor.tensors.Int4BaseTensor`) is stored as its
inner tensors ``"{name}.{field}"`` (``name.qdata``, ``name.scale``, ...), and the file's
metadata key ``"int4tensor"`` holds JSON that says how to rebuild it::

    {"format_version": 1,
     "tensors": {"layer.weight": {"type": "Int4Tensor", "version": 1,
                                  "fields": ["qdata", "scale", "zero_point"],
                                  "attributes": {"block_size": [1, 128], "shape": [256, 512]},
                                  "shape": [256, 512], "dtype": "bfloat16"}}}

The fields and attributes come from each class's own ``tensor_data_names`` /
``optional_tensor_data_names`` / ``tensor_attribute_names`` (``_tensors()``, ``_attributes()``,
``_build()``), so a new tensor class serializes once it is registered with
:func:`register_serializable`; no code here names a field.

Loading goes through ``safetensors.safe_open`` (a memory map), one tensor at a time, so a
file of any size needs about its size in RAM for the result and no second copy.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from int4tensor.tensors import Int4BaseTensor, Int4CPUTensor, Int4PreshuffledTensor, Int4Tensor
from int4tensor.tensors.base import LayoutError

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "register_serializable",
    "serializable_types",
    "save_file",
    "load_file",
    "open_file",
    "check_layout",
    "atomic_write_path",
    "current_umask",
    "decode_attribute",
    "Reader",
    "TENSOR_TYPES",
]

#: Version of the metadata layout written by :func:`save_file` (file level): 1 names a field
#: ``"{name}.{field}"``; 2 records a ``"field_separator"`` (checkpoint directories use
#: ``"__"``, so that ``layer.weight__qdata`` is a buffer name transformers can load into).
FORMAT_VERSION = 2
_DEFAULT_SEPARATOR = "."
#: The safetensors metadata key that holds our JSON.
METADATA_KEY = "int4tensor"

# The keys of one tensor's metadata entry (all required; others are refused).
_ENTRY_KEYS = ("type", "version", "fields", "attributes", "shape", "dtype")

# class name -> (class, per-class version, layout checker or None)
TENSOR_TYPES: dict[str, tuple[type, int, Callable[[Any], str | None] | None]] = {}


def register_serializable(
    cls: type,
    version: int = 1,
    check: Callable[[Any], str | None] | None = None,
) -> type:
    """Let :func:`save_file`/:func:`load_file` handle ``cls`` (an ``Int4BaseTensor`` subclass).

    Args:
        version: the layout version of this class's fields; a file written with a newer
            version than the one registered is refused on load.
        check: optional ``fn(tensor) -> problem or None``, run on load and by ``inspect``
            after the class's own ``_layout_problem`` (which every constructor runs).
    """
    if not (isinstance(cls, type) and issubclass(cls, Int4BaseTensor)):
        raise TypeError(f"register_serializable expects an Int4BaseTensor subclass, got {cls!r}")
    TENSOR_TYPES[cls.__name__] = (cls, version, check)
    return cls


def serializable_types() -> list[str]:
    """Names of the registered tensor classes."""
    return sorted(TENSOR_TYPES)


register_serializable(Int4Tensor, version=1)
# fbgemm's preshuffled layout: its fields are checked by shape only; the file records them as
# they are, and loading on a CPU gives back the same bytes.
register_serializable(Int4PreshuffledTensor, version=1)


def check_layout(t: Int4BaseTensor) -> str | None:
    """The class's own consistency check (the one every constructor runs), then the registered
    extra checker's verdict on ``t`` (None: consistent)."""
    problem = t._layout_problem()
    entry = TENSOR_TYPES.get(type(t).__name__)
    return problem or (entry[2](t) if entry and entry[2] else None)


# ---- JSON encoding of attributes ------------------------------------------------------------
def _encode(value: Any, where: str) -> Any:
    """Attributes as JSON: tuples/Size become lists, dtypes ``{"dtype": "bfloat16"}``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return [_encode(v, where) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot store attribute {where} of type {type(value).__name__} in "
                    "safetensors metadata (supported: None, bool, int, float, str, tuple, dtype)")


def decode_attribute(value: Any) -> Any:
    """A tensor attribute as the metadata JSON holds it -> its Python value (the inverse of
    what ``save_file`` writes: lists -> tuples, ``{"dtype": "bfloat16"}`` -> torch.bfloat16)."""
    # Lists come back as tuples: tensor attributes are immutable (block_size, shape).
    if isinstance(value, list):
        return tuple(decode_attribute(v) for v in value)
    if isinstance(value, dict) and set(value) == {"dtype"}:
        return _dtype(value["dtype"])
    return value


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ---- save -------------------------------------------------------------------------------------
def _describe(name: str, t: Int4BaseTensor, sep: str = _DEFAULT_SEPARATOR,
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    type_name = type(t).__name__
    entry = TENSOR_TYPES.get(type_name)
    if entry is None or entry[0] is not type(t):
        raise TypeError(f"save_file: {name!r} is a {type_name}, which is not registered for "
                        f"serialization (registered: {serializable_types()}); call "
                        "int4tensor.serialization.register_serializable on its class")
    inner = t.inner_tensors()
    attrs = {a: _encode(v, f"{name}.{a}")
             for a, v in zip(t.tensor_attribute_names, t.attribute_values())}
    meta = {"type": type_name, "version": entry[1], "fields": list(inner), "attributes": attrs,
            "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    return meta, {f"{name}{sep}{field}": v for field, v in inner.items()}


def flatten_state_dict(
    state_dict: dict[str, torch.Tensor],
    field_separator: str = _DEFAULT_SEPARATOR,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Split subclass tensors into plain ones: ``(plain tensors by key, metadata by name)``."""
    plain: dict[str, torch.Tensor] = {}
    described: dict[str, dict] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_file: {name!r} is a {type(t).__name__}, not a tensor")
        if isinstance(t, Int4CPUTensor):  # a runtime layout: files hold the plain one
            t = t.to_int4_tensor()
        if isinstance(t, Int4BaseTensor):
            described[name], parts = _describe(name, t, field_separator)
        else:
            parts = {name: t}
        for key, v in parts.items():
            if key in plain:
                raise ValueError(f"save_file: key {key!r} is produced twice (a quantized "
                                 f"tensor's field collides with another entry)")
            plain[key] = v
    return plain, described


# torch dtype -> safetensors dtype name
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64",
}


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str,
                       metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy, so saving
    a shard needs twice its size in memory; this writes the same format (8-byte header length,
    JSON header with ``data_offsets``, padded with spaces to 8 bytes, then the raw data) with at
    most one tensor's contiguous CPU copy alive at a time.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"save_file: {name!r} has dtype {t.dtype}, which safetensors "
                            "cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors.values():
            if t.numel():
                flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(flat.numpy()))
                del flat


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class atomic_write_path:
    """``with atomic_write_path(path) as tmp:`` write ``tmp``; on success it becomes ``path``.

    The temporary name is in the same directory (so ``os.replace`` is an atomic rename); on an
    exception it is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __enter__(self) -> str:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.",
                                        suffix=".tmp", dir=directory)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            # mkstemp makes 0600; give what open() would
            os.chmod(self.tmp, 0o666 & ~current_umask())
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
        return False


def save_file(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    field_separator: str = _DEFAULT_SEPARATOR,
) -> None:
    """Write ``state_dict`` (plain tensors and registered tensor subclasses) to ``path``.

    Like ``safetensors.torch.save_file``; ``metadata`` (str -> str) is stored alongside ours
    (the key ``"int4tensor"`` is reserved). The file appears under ``path`` only when complete.
    ``field_separator`` joins a quantized tensor's name and field (``"."``: ``w.qdata``;
    checkpoint directories use ``"__"``: ``w__qdata``).
    """
    metadata = dict(metadata or {})
    if METADATA_KEY in metadata:
        raise ValueError(f"save_file: metadata key {METADATA_KEY!r} is reserved by int4tensor")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"save_file: metadata must map str to str, bad keys: {bad}")
    plain, described = flatten_state_dict(state_dict, field_separator)
    metadata.setdefault("format", "pt")  # transformers refuses files whose format is not "pt"
    if described:
        metadata[METADATA_KEY] = json.dumps(metadata_json(described, field_separator))
    with atomic_write_path(path) as tmp:
        _write_safetensors(plain, tmp, metadata)


def metadata_json(described: dict[str, dict], field_separator: str = _DEFAULT_SEPARATOR) -> dict:
    """The JSON stored under :data:`METADATA_KEY` for ``described`` tensors."""
    if field_separator == _DEFAULT_SEPARATOR:  # readable by int4tensor versions before 2
        return {"format_version": 1, "tensors": described}
    return {"format_version": FORMAT_VERSION, "field_separator": field_separator,
            "tensors": described}


# ---- load -------------------------------------------------------------------------------------
class Reader:
    """A lazily read safetensors file: logical names -> plain tensors or rebuilt subclasses."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 resolve_raw: Callable[[str], torch.Tensor] | None = None):
        """``resolve_raw(key)``: reads a field stored in another shard of the same checkpoint
        (transformers' sharding may split one tensor's fields); without it they must be here."""
        self.path = os.fspath(path)
        self._resolve_raw = resolve_raw
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no such safetensors file: {self.path}")
        try:
            self._f = safe_open(self.path, framework="pt", device=str(device))
            self.raw_metadata = self._f.metadata() or {}
            self._raw_keys = list(self._f.keys())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a readable safetensors file "
                             f"(truncated or corrupted?): {e}") from e
        self.field_separator = _DEFAULT_SEPARATOR
        self.described = self._parse_metadata()
        sep = self.field_separator
        raw = set(self._raw_keys)
        fields_anywhere = {f"{n}{sep}{f}" for n, m in self.described.items() for f in m["fields"]}
        if sep != _DEFAULT_SEPARATOR:
            # transformers' save_pretrained writes the same metadata into every shard: a tensor
            # belongs to the shard holding its first field (qdata); others may be elsewhere.
            self.described = {n: m for n, m in self.described.items()
                              if f"{n}{sep}{m['fields'][0]}" in raw}
        owned = {f"{n}{sep}{f}" for n, m in self.described.items() for f in m["fields"]}
        missing = sorted(owned - raw)
        if missing and resolve_raw is None:
            raise ValueError(f"{self.path}: metadata lists tensors that are not in the file: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self._plain = [k for k in self._raw_keys if k not in fields_anywhere]

    def _parse_metadata(self) -> dict[str, dict]:
        text = self.raw_metadata.get(METADATA_KEY)
        if text is None:
            return {}
        try:
            meta = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{self.path}: the {METADATA_KEY!r} metadata is not valid JSON "
                             f"({e})") from e
        if not isinstance(meta, dict) or "format_version" not in meta or "tensors" not in meta:
            raise ValueError(f"{self.path}: the {METADATA_KEY!r} metadata must be an object with "
                             "'format_version' and 'tensors'")
        version, tensors = meta["format_version"], meta["tensors"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{self.path}: int4tensor format_version {version!r} is not a "
                             "positive integer")
        if version > FORMAT_VERSION:
            raise ValueError(f"{self.path}: int4tensor format version {version!r} is newer "
                             f"than this int4tensor reads ({FORMAT_VERSION}); upgrade int4tensor")
        unknown = sorted(set(meta) - {"format_version", "tensors", "field_separator"})
        if unknown:
            raise ValueError(f"{self.path}: the {METADATA_KEY!r} metadata has unknown keys "
                             f"{unknown}; this int4tensor cannot tell what they mean")
        if not isinstance(tensors, dict):
            raise ValueError(f"{self.path}: the {METADATA_KEY!r} metadata's 'tensors' must be an "
                             f"object (name -> entry), got a {type(tensors).__name__}")
        self.field_separator = meta.get("field_separator", _DEFAULT_SEPARATOR)
        if not isinstance(self.field_separator, str) or not self.field_separator:
            raise ValueError(f"{self.path}: the {METADATA_KEY!r} metadata has an invalid "
                             f"field_separator {self.field_separator!r}")
        for name, m in tensors.items():
            self._check_entry(name, m)
        return tensors

    def _check_entry(self, name: str, m: Any) -> None:
        """One entry of ``tensors``: known keys only, each of the expected JSON type."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: its metadata entry must be an object, got a "
                             f"{type(m).__name__}")
        missing = [k for k in _ENTRY_KEYS if k not in m]
        if missing:
            raise ValueError(f"{where}: its metadata entry lacks {missing}")
        unknown = sorted(set(m) - set(_ENTRY_KEYS))
        if unknown:  # e.g. a layout claim (nibble order) this version would silently ignore
            raise ValueError(f"{where}: its metadata entry has unknown keys {unknown}; this "
                             "int4tensor cannot tell what they mean (written by a newer one?)")
        entry = TENSOR_TYPES.get(m["type"]) if isinstance(m["type"], str) else None
        if entry is None:
            raise ValueError(f"{where} has type {m['type']!r}, unknown to this int4tensor "
                             f"(known: {serializable_types()})")
        cls = entry[0]
        if not isinstance(m["version"], int) or isinstance(m["version"], bool) or \
                m["version"] > entry[1]:
            raise ValueError(f"{where} is a {m['type']} of layout version {m['version']!r}; "
                             f"this int4tensor reads up to version {entry[1]}")
        fields = m["fields"]
        known_fields = cls.tensor_data_names + cls.optional_tensor_data_names
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise ValueError(f"{where}: 'fields' must be a list of names, got {fields!r}")
        if set(fields) - set(known_fields) or len(set(fields)) != len(fields):
            raise ValueError(f"{where}: 'fields' {fields} are not fields of {m['type']} "
                             f"{list(known_fields)} (or repeat)")
        missing = [f for f in cls.tensor_data_names if f not in fields]
        if missing:
            raise ValueError(f"{where}: {m['type']} lacks fields {missing}")
        attrs = m["attributes"]
        if not isinstance(attrs, dict):
            raise ValueError(f"{where}: 'attributes' must be an object, got "
                             f"{type(attrs).__name__}")
        unknown = sorted(set(attrs) - set(cls.tensor_attribute_names))
        # attributes added later (activation_dtype) have defaults for older files
        missing = [a for a in cls.tensor_attribute_names
                   if a not in attrs and a not in cls.attribute_defaults]
        if unknown or missing:
            raise ValueError(f"{where}: 'attributes' {sorted(attrs)} must be "
                             f"{list(cls.tensor_attribute_names)}"
                             f"{f'; unknown {unknown}' if unknown else ''}"
                             f"{f'; missing {missing}' if missing else ''}")
        for key in ("shape",):
            value = m[key]
            if not isinstance(value, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
                raise ValueError(f"{where}: {key!r} must be a list of sizes, got {value!r}")
        if not isinstance(m["dtype"], str) or not isinstance(getattr(torch, m["dtype"], None),
                                                              torch.dtype):
            raise ValueError(f"{where}: 'dtype' {m['dtype']!r} is not a torch dtype name")

    def keys(self) -> list[str]:
        """Logical names: plain tensors and quantized ones (not their field keys)."""
        return self._plain + list(self.described)

    def raw_keys(self) -> list[str]:
        return list(self._raw_keys)

    def get_raw(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: cannot read tensor {key!r}: {e}") from e

    def get(self, name: str) -> torch.Tensor:
        if name not in self.described:
            if name not in self._plain:
                raise KeyError(f"{self.path} has no tensor {name!r}")
            return self.get_raw(name)
        m = self.described[name]
        cls = TENSOR_TYPES[m["type"]][0]
        keys = {f: f"{name}{self.field_separator}{f}" for f in m["fields"]}
        raw = set(self._raw_keys)
        tensors = {f: self.get_raw(k) if k in raw else self._resolve_raw(k)
                   for f, k in keys.items()}
        missing = [f for f in cls.tensor_data_names if f not in tensors]
        if missing:
            raise ValueError(f"{self.path}: {m['type']} {name!r} lacks fields {missing}")
        attrs = [decode_attribute(m["attributes"][a]) if a in m["attributes"]
                 else cls.attribute_defaults[a]
                 for a in cls.tensor_attribute_names]
        try:
            t = cls.from_fields(tensors, attrs)
        except LayoutError as e:
            raise ValueError(f"{self.path}: {m['type']} {name!r} does not match its metadata: "
                             f"{e.problem}") from e
        except Exception as e:  # a constructor's own error, with the file and name added
            raise ValueError(f"{self.path}: cannot rebuild {m['type']} {name!r}: {e}") from e
        problem = check_layout(t)
        if list(t.shape) != list(m["shape"]) or str(t.dtype) != f"torch.{m['dtype']}":
            problem = problem or (f"rebuilt as {t.dtype}{list(t.shape)}, metadata says "
                                  f"{m['dtype']}{m['shape']}")
        if problem:
            raise ValueError(f"{self.path}: {m['type']} {name!r} does not match its metadata: "
                             f"{problem}")
        return t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)

    def close(self) -> None:
        self._f = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def open_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> Reader:
    """Open a file for lazy reading: ``with open_file(p) as f: f.keys(); f.get(name)``."""
    return Reader(path, device)


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_file` (or any safetensors file) into a state dict.

    Quantized entries come back as their tensor class, bit-exact; plain tensors as they were.
    Raises ``ValueError`` naming the file (and tensor) for a truncated/corrupted file, an
    unknown tensor type or a too-new version, or fields that contradict the metadata.
    """
    with open_file(path, device) as f:
        return dict(f.items())
