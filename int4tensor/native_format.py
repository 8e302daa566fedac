"""int4tensor's native checkpoint directory format: one format for the CLI and transformers.

A directory holds ``config.json``, safetensors shards and ``model.safetensors.index.json``
(as ``save_pretrained`` writes them). A quantized parameter ``layer.weight`` is stored as its
inner tensors under ``"layer.weight__qdata"``, ``"layer.weight__scale"``,
``"layer.weight__zero_point"`` (and ``__act_pre_scale`` when set): names a module can hold as
buffers, so transformers' loader reads them like any other tensor. Each shard's metadata key
``"int4tensor"`` holds the JSON of :mod:`int4tensor.serialization` (``format_version`` 2,
``field_separator: "__"``, per tensor its class, layout version, fields, ``block_size``,
logical shape and dtype); ``config.json`` holds::

    "quantization_config": {
        "quant_method": "int4tensor", "format_version": 2, "tensor_type": "Int4Tensor",
        "config": {"type": "Int4WeightOnlyConfig", "group_size": 128,
                   "zero_point_domain": "float", ...},
        "modules_to_not_convert": ["lm_head"], "quantize_experts": true}

Checkpoints written by int4tensor 0.1's CLI (``"layer.weight.qdata"``, no
``format_version``) still load with :func:`int4tensor.load_checkpoint`; ``int4tensor convert
OLD NEW`` rewrites them in this format. Nothing here imports transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os

from safetensors import SafetensorError, safe_open

from int4tensor.config import Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig
from int4tensor.serialization import METADATA_KEY, TENSOR_TYPES

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "FIELD_SEPARATOR",
    "config_to_dict",
    "config_from_dict",
    "quantization_config_dict",
    "is_legacy_native",
    "read_layouts",
]

QUANT_METHOD = "int4tensor"
#: Version of the checkpoint directory format (``quantization_config.format_version``).
FORMAT_VERSION = 2
FIELD_SEPARATOR = "__"

_CONFIG_TYPES = {c.__name__: c for c in (Int4WeightOnlyConfig,
                                         Float8DynamicActivationInt4WeightConfig)}

LEGACY_HELP = ("it was written by int4tensor 0.1 (tensor fields named 'NAME.qdata'); load it "
               "with int4tensor.load_checkpoint(path), or rewrite it in the current format with "
               "`int4tensor convert {path} NEW_DIR` and load NEW_DIR")


def config_to_dict(config) -> dict:
    """``Int4WeightOnlyConfig(group_size=64)`` -> ``{"type": "Int4WeightOnlyConfig", ...}``."""
    if type(config).__name__ not in _CONFIG_TYPES or type(config) is not \
            _CONFIG_TYPES[type(config).__name__]:
        raise TypeError(f"expected an Int4WeightOnlyConfig or Float8DynamicActivationInt4WeightConfig"
                        f" from int4tensor, got {type(config).__module__}.{type(config).__name__}")
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def config_from_dict(d: dict, where: str = "quantization_config"):
    if not isinstance(d, dict) or d.get("type") not in _CONFIG_TYPES:
        raise ValueError(f"{where}: 'config' must name one of {sorted(_CONFIG_TYPES)}, got "
                         f"{d if not isinstance(d, dict) else d.get('type')!r}")
    cls = _CONFIG_TYPES[d["type"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields - {"type"})
    if unknown:
        raise ValueError(f"{where}: {d['type']} has no option(s) {unknown}; this int4tensor may be "
                         "older than the one that wrote the checkpoint")
    try:
        return cls(**{k: v for k, v in d.items() if k != "type"})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def quantization_config_dict(config, modules_to_not_convert, quantize_experts: bool = True,
                             **extra) -> dict:
    """The ``quantization_config`` entry of ``config.json``."""
    tensor_type = ("Int4PreshuffledTensor" if getattr(config, "int4_packing_format", "plain")
                   == "preshuffled" else "Int4Tensor")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "tensor_type": tensor_type,
            "config": None if config is None else config_to_dict(config),
            "modules_to_not_convert": None if modules_to_not_convert is None
            else list(modules_to_not_convert),
            "quantize_experts": bool(quantize_experts), **extra}


def is_legacy_native(quantization_config: dict | None) -> bool:
    """True for the ``quantization_config`` written by int4tensor 0.1's CLI."""
    q = quantization_config or {}
    return q.get("quant_method") == QUANT_METHOD and "format_version" not in q


def read_layouts(files: list[str], config=None) -> dict[str, tuple[str, dict, dict]]:
    """The quantized tensors of checkpoint shards, from their headers (no data is read).

    Returns ``{name: (file, entry, fields)}``: ``entry`` is the tensor's metadata (class,
    version, attributes, shape, dtype), ``fields`` maps each field to ``(key, shape, dtype
    name)`` in the file. Raises ``ValueError`` naming the file and tensor for a legacy file, a
    field missing from the shard, or (given ``config``) a group size that contradicts it.
    """
    entries: dict[str, tuple[str, dict]] = {}  # name -> (first file that describes it, entry)
    located: dict[str, tuple[str, list, str]] = {}  # key -> (file, shape, dtype)
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    located[key] = (path, list(s.get_shape()), s.get_dtype())
                raw = (f.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                continue
            meta = json.loads(raw)
            if meta.get("field_separator", ".") != FIELD_SEPARATOR:
                raise ValueError(f"{path}: " + LEGACY_HELP.format(path=os.path.dirname(path)))
            for name, entry in meta["tensors"].items():
                entries.setdefault(name, (path, entry))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the {METADATA_KEY!r} metadata is not valid "
                             f"({type(e).__name__}: {e})") from e
    out: dict[str, tuple[str, dict, dict]] = {}
    for name, (path, entry) in entries.items():
        keys = {fld: f"{name}{FIELD_SEPARATOR}{fld}" for fld in entry.get("fields", ())}
        missing = sorted(fld for fld, key in keys.items() if key not in located)
        if missing:
            raise ValueError(f"{path}: quantized tensor {name!r} lacks fields {missing} in every "
                             "shard (a shard is missing or was written incompletely)")
        known = TENSOR_TYPES.get(entry.get("type"))
        if known is None:
            raise ValueError(f"{path}: tensor {name!r} has type {entry.get('type')!r}, unknown "
                             "to this int4tensor")
        if not isinstance(entry.get("version"), int) or entry["version"] > known[1]:
            raise ValueError(f"{path}: tensor {name!r} is a {entry['type']} of layout version "
                             f"{entry.get('version')!r}; this int4tensor reads up to version "
                             f"{known[1]}")
        _check_against_config(path, name, entry, config)
        out[name] = (path, entry, {fld: (key, *located[key][1:]) for fld, key in keys.items()})
    return out


def _check_against_config(path: str, name: str, entry: dict, config) -> None:
    if config is None:
        return
    group = getattr(config, "group_size", None)
    block = (entry.get("attributes") or {}).get("block_size")
    if group is not None and block and max(block) != group:
        raise ValueError(f"{path}: tensor {name!r} has group size {max(block)}, but config.json's "
                         f"quantization_config says {group}")
    want = ("Int4PreshuffledTensor" if getattr(config, "int4_packing_format", "plain")
            == "preshuffled" else "Int4Tensor")
    if entry.get("type") != want:
        raise ValueError(f"{path}: tensor {name!r} is a {entry.get('type')}, but config.json's "
                         f"quantization_config describes {want} tensors")
