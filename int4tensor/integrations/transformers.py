"""Hugging Face transformers integration: ``from_pretrained(..., quantization_config=...)``.

Importing this module registers :class:`Int4TensorConfig` (``quant_method="int4tensor"``) and
its quantizer with transformers through ``transformers.quantizers.register_quantization_config``
/ ``register_quantizer``. Then::

    from int4tensor import Int4WeightOnlyConfig
    from int4tensor.integrations.transformers import Int4TensorConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=Int4TensorConfig(Int4WeightOnlyConfig(group_size=128)),
        dtype=torch.bfloat16)                      # quantized on load, layer by layer
    model.save_pretrained(dst)                     # int4tensor's native checkpoint format
    model = AutoModelForCausalLM.from_pretrained(dst)   # rebuilt bit-exactly, no bf16 weights

What is quantized: the ``weight`` of every ``nn.Linear`` and (``quantize_experts=True``) the 3D
parameters of MoE expert modules (``mlp.experts.gate_up_proj [E, 2I, H]``, ...), except the
output embedding (``lm_head``), modules tied to the input embedding and the model's
``_keep_in_fp32_modules``; ``modules_to_not_convert`` replaces that default list. A weight whose
K is not a multiple of the group size stays in high precision with a warning naming it.
The checkpoint format is described in :mod:`int4tensor.native_format`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import warnings

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from int4tensor import native_format
from int4tensor.config import Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig
from int4tensor.serialization import (
    METADATA_KEY,
    decode_attribute,
    TENSOR_TYPES,
    check_layout,
    flatten_state_dict,
    metadata_json,
)
from int4tensor.tensors import Int4BaseTensor

__all__ = ["Int4TensorConfig", "Int4TensorHfQuantizer", "EXPERTS_IMPLEMENTATION",
           "keep_grouped_experts_"]

QUANT_METHOD = native_format.QUANT_METHOD
_SEP = native_format.FIELD_SEPARATOR
_OUR_CONFIGS = (Int4WeightOnlyConfig, Float8DynamicActivationInt4WeightConfig)


class Int4TensorConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of int4tensor for transformers.

    Args:
        config: what each weight becomes: an :class:`~int4tensor.Int4WeightOnlyConfig`
            (default ``Int4WeightOnlyConfig()``: group size 128, fbgemm's float zero points) or a
            :class:`~int4tensor.Float8DynamicActivationInt4WeightConfig`. Its ``k_dim`` applies
            to linear weights; expert stacks take K from the experts module (``-2`` when it is
            ``is_transposed``, ``[E, K, N]``).
        modules_to_not_convert: module names (exact, a prefix up to a ``.``, a suffix after a
            ``.``, or ``"re:REGEX"`` matched in full) kept in high precision. ``None`` (default):
            the output embedding, modules tied to the input embedding and the model's
            ``_keep_in_fp32_modules``. A list replaces that default.
        quantize_experts: quantize the 3D parameters of MoE expert modules (default True).
    """

    def __init__(self, config=None, modules_to_not_convert=None, quantize_experts: bool = True,
                 **kwargs):
        # kwargs: the other keys of a saved quantization_config (format_version, tensor_type).
        self.quant_method = QUANT_METHOD
        version = kwargs.pop("format_version", native_format.FORMAT_VERSION)
        if isinstance(version, int) and version > native_format.FORMAT_VERSION:
            raise ValueError(f"quantization_config: int4tensor checkpoint format_version {version}"
                             f" is newer than this int4tensor reads "
                             f"({native_format.FORMAT_VERSION}); upgrade int4tensor")
        self.format_version = version
        if isinstance(config, dict):
            config = native_format.config_from_dict(config)
        elif config is None:
            config = Int4WeightOnlyConfig() if "tensor_type" not in kwargs else None
        elif not isinstance(config, _OUR_CONFIGS):
            raise TypeError(
                "Int4TensorConfig(config=...) takes an int4tensor Int4WeightOnlyConfig or "
                "Float8DynamicActivationInt4WeightConfig, got "
                f"{type(config).__module__}.{type(config).__name__} (a torchao config is not "
                "one: use transformers' TorchAoConfig for torchao)")
        self.config = config
        if modules_to_not_convert is not None and (
                isinstance(modules_to_not_convert, str)
                or not all(isinstance(m, str) for m in modules_to_not_convert)):
            raise TypeError("Int4TensorConfig: modules_to_not_convert must be a list of module "
                            f"names, got {modules_to_not_convert!r}")
        self.modules_to_not_convert = (None if modules_to_not_convert is None
                                       else list(modules_to_not_convert))
        self.quantize_experts = bool(quantize_experts)
        self.tensor_type = kwargs.pop("tensor_type", None)
        self.extra = kwargs  # kept so that a re-save writes them back (imported_from, ...)

    def to_dict(self) -> dict:
        return native_format.quantization_config_dict(
            self.config, self.modules_to_not_convert, self.quantize_experts, **self.extra)

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


# ---- which parameters ---------------------------------------------------------------------
def _matches(name: str, patterns) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.startswith(p + ".") or name.endswith("." + p):
            return True
    return False


def _default_skips(model) -> list[str]:
    """The output embedding, modules sharing a weight with the input embedding, fp32 modules."""
    skips = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    in_weight = getattr(in_emb, "weight", None)
    tied = _tied_modules(model)
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if module is out_emb or (weight is not None and weight is in_weight and module
                                 is not in_emb) or name in tied:
            skips.add(name)
    return sorted(s for s in skips if s)


def _tied_modules(model) -> set[str]:
    """Modules whose weight transformers ties to another one (tying happens after loading,
    so the meta model does not share the tensors yet)."""
    pairs = getattr(model, "all_tied_weights_keys", None) or {}
    names = {n.rsplit(".", 1)[0] for k, v in pairs.items() for n in (k, v) if n}
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    out_emb = model.get_output_embeddings()
    if out_emb is not None and getattr(text or model.config, "tie_word_embeddings", False):
        names |= {n for n, m in model.named_modules() if m is out_emb}
    return names


def _is_experts(module: nn.Module, name: str) -> bool:
    return "expert" in type(module).__name__.lower() or "expert" in name.rsplit(".", 1)[-1]


class Int4TensorHfQuantizer(HfQuantizer):
    """Quantizes on load (``pre_quantized=False``) or rebuilds int4tensor checkpoints."""

    requires_calibration = False

    def __init__(self, quantization_config: Int4TensorConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self._pending: list[tuple[nn.Module, str, str, dict]] = []
        self._warned: set[str] = set()

    # -- environment / dtype -------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("int4tensor: disk offload (device_map with 'disk') is not "
                             "supported for int4 weights; keep every module on a device or CPU")
        cfg = self.quantization_config.config
        if not self.pre_quantized and getattr(cfg, "int4_packing_format", "") == "preshuffled":
            places = (set(map(str, device_map.values())) if isinstance(device_map, dict)
                      else {str(device_map)})
            on_gpu = torch.cuda.is_available() and not places <= {"cpu", "None", "disk"}
            if not on_gpu:
                raise ValueError(
                    f"int4tensor: {type(cfg).__name__}(int4_packing_format='preshuffled') "
                    "quantizes on a CUDA GPU (sm90+, fbgemm-gpu-genai): load with "
                    "device_map='cuda', or use int4_packing_format='plain' (runs everywhere; "
                    "convert_model_to_packed_tensors_(model) after loading on a Hopper GPU)")

    def update_dtype(self, dtype):
        return dtype

    def param_element_size(self, model, param_name: str, param) -> float:
        """Bytes per element once loaded. transformers pre-allocates this much on the device
        (``caching_allocator_warmup``) before loading; the bf16 size there made the peak of a
        quantize-on-load as large as a bf16 load's."""
        if self.pre_quantized or self._config_for(model, param_name, param) is None:
            return param.element_size()
        group = getattr(self.quantization_config.config, "group_size", 128)
        return 0.5 + 4.0 / group  # packed int4 + a 2-byte scale and zero per group

    # -- choosing parameters -------------------------------------------------------------------
    def _config_for(self, model, param_name: str, param=None):
        """The int4tensor config that quantizes ``param_name``, or None to leave it alone."""
        module_name, _, pname = param_name.rpartition(".")
        if _matches(module_name, self.modules_to_not_convert):
            return None
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return None
        param = module._parameters.get(pname) if param is None else param
        if param is None or not param.is_floating_point() or isinstance(param, Int4BaseTensor):
            return None
        cfg = self.quantization_config.config
        if isinstance(module, nn.Linear) and pname == "weight":
            k_dim = getattr(cfg, "k_dim", -1)
        elif (self.quantization_config.quantize_experts and param.ndim == 3
              and _is_experts(module, module_name)):
            k_dim = -2 if getattr(module, "is_transposed", False) else -1
        else:
            return None
        if getattr(cfg, "k_dim", -1) != k_dim:
            if not isinstance(cfg, Int4WeightOnlyConfig):
                return self._skip(param_name, f"{type(cfg).__name__} has no [E, K, N] layout")
            cfg = dataclasses.replace(cfg, k_dim=k_dim)
        reason = cfg.can_quantize(param)
        return cfg if reason is None else self._skip(param_name, reason)

    def _skip(self, name: str, reason: str):
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"int4tensor: left {name} in high precision: {reason}", stacklevel=2)
        return None

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return not self.pre_quantized and self._config_for(model, param_name) is not None

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    # -- before / after loading ----------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        q = self.quantization_config
        self.modules_to_not_convert = (_default_skips(model) if q.modules_to_not_convert is None
                                       else list(q.modules_to_not_convert))
        if q.modules_to_not_convert is not None:
            self._check_tied(model)
        if self.pre_quantized:
            self._expect_quantized_tensors(model, checkpoint_files or [])
        else:  # recorded in config.json: which modules a save of this model keeps dense
            q.extra["not_converted"] = list(self.modules_to_not_convert)
        return model

    def _check_tied(self, model):
        in_weight = getattr(model.get_input_embeddings(), "weight", None)
        tied = _tied_modules(model)
        for name, module in model.named_modules():
            if (isinstance(module, nn.Linear) and (module.weight is in_weight or name in tied)
                    and not _matches(name, self.modules_to_not_convert)):
                raise ValueError(f"int4tensor: {name} shares its weight with the input embedding "
                                 "(tie_word_embeddings), which cannot be int4; add it to "
                                 "modules_to_not_convert or load with tie_word_embeddings=False")

    def _expect_quantized_tensors(self, model, files: list[str]):
        """Swap each quantized parameter of the meta model for meta buffers named as the
        checkpoint's fields (``weight__qdata``, ...), so the loader reads them as they are."""
        files = [f for f in files if str(f).endswith(".safetensors")]
        if not files:
            raise ValueError("int4tensor: a pre-quantized int4tensor checkpoint must be "
                             "safetensors shards (none found)")
        layouts = native_format.read_layouts(files, self.quantization_config.config)
        if not layouts:
            raise ValueError(f"int4tensor: {files[0]} and the other shards hold no int4tensor "
                             "tensors although config.json says quant_method 'int4tensor'")
        prefix = getattr(model, "base_model_prefix", "")
        names = {n for n, _ in model.named_parameters()}
        for name, (path, entry, fields) in layouts.items():
            target = name if name in names else (f"{prefix}.{name}" if f"{prefix}.{name}" in names
                                                 else name.removeprefix(f"{prefix}."))
            if target not in names:
                raise ValueError(f"{path}: quantized tensor {name!r} is not a parameter of "
                                 f"{type(model).__name__}")
            module_name, _, pname = target.rpartition(".")
            module = model.get_submodule(module_name)
            param = module._parameters[pname]
            if list(param.shape) != list(entry["shape"]):
                raise ValueError(f"{path}: quantized tensor {name!r} has shape {entry['shape']}, "
                                 f"the model's parameter {list(param.shape)}")
            del module._parameters[pname]
            for field, (_, shape, dtype) in fields.items():
                module.register_buffer(f"{pname}{_SEP}{field}",
                                       torch.empty(shape, dtype=_st_dtype(dtype), device="meta"))
            # transformers initializes modules that it did not see fully loaded; this one's
            # tensors arrive as buffers, and its _init_weights would look for the parameter.
            module._is_hf_initialized = True
            self._pending.append((module, module_name, pname, entry))

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module, module_name, pname, entry in self._pending:
            cls = TENSOR_TYPES[entry["type"]][0]
            tensors = {f: module._buffers.pop(f"{pname}{_SEP}{f}") for f in entry["fields"]}
            label = f"{module_name}.{pname}"
            meta = [t for t in tensors.values() if t.is_meta]
            if meta:
                raise ValueError(f"int4tensor: {label} was not loaded from the checkpoint "
                                 "(a shard is missing or incomplete)")
            attrs = [decode_attribute(entry["attributes"][a]) if a in entry["attributes"]
                     else cls.attribute_defaults.get(a) for a in cls.tensor_attribute_names]
            try:
                t = cls.from_fields(tensors, attrs)
            except Exception as e:
                raise ValueError(f"int4tensor: cannot rebuild {entry['type']} {label}: {e}") from e
            problem = check_layout(t)
            if problem:
                raise ValueError(f"int4tensor: {label} does not match its metadata: {problem}")
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
        self._pending = []
        _describe_quantization(model)
        keep_grouped_experts_(model)
        return model

    # -- saving --------------------------------------------------------------------------------
    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        # Our tensors are flattened into plain ones: safetensors (and transformers' tied-weight
        # check, which reads storage pointers) see ordinary tensors.
        state_dict = model.state_dict()
        plain, described = flatten_state_dict(state_dict, _SEP)
        if described:
            # The model's key conversions (e.g. Mixtral's per-expert merge) must not be reverted
            # on save: a checkpoint of ours is always written as the loaded model names it.
            model._weight_conversions = []
        return plain, ({METADATA_KEY: json.dumps(metadata_json(described, _SEP))}
                       if described else {})

    def _dequantize(self, model, dtype=None):
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if isinstance(p, Int4BaseTensor):
                    module._parameters[name] = nn.Parameter(p.dequantize(dtype or p.dtype),
                                                            requires_grad=False)
            if "extra_repr" in module.__dict__:
                del module.extra_repr
        model.__dict__.pop("get_memory_footprint", None)
        _restore_grouped_experts(model)
        return model


def _st_dtype(name: str) -> torch.dtype:
    table = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
             "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
             "I32": torch.int32, "I64": torch.int64, "F8_E4M3": torch.float8_e4m3fn,
             "BOOL": torch.bool}
    if name not in table:
        raise ValueError(f"int4tensor: unsupported safetensors dtype {name!r}")
    return table[name]


class _QuantizeOnLoad:
    """The conversion op transformers runs on each loaded tensor that needs quantization: the
    same ``config.quantize_weight`` that ``quantize_`` calls, on the tensor's device."""

    def __init__(self, hf_quantizer: Int4TensorHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, *args, model=None, full_layer_name=None, missing_keys=None,
                **kwargs):
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            target = name if "." in name else full_layer_name
            cfg = self.hf_quantizer._config_for(model, target, value)
            if cfg is None:
                out[target] = value
                continue
            with torch.no_grad():
                param = nn.Parameter(cfg.quantize_weight(value), requires_grad=False)
            param._is_hf_initialized = True
            out[target] = param
            if missing_keys is not None:
                missing_keys.discard(target)
        return out

    def __repr__(self):
        return "Int4TensorQuantize"


# The conversion machinery wants a ConversionOps; importing it lazily keeps this module working
# where transformers moved it.
try:
    from transformers.core_model_loading import ConversionOps as _ConversionOps

    _QuantizeOnLoad = type("_QuantizeOnLoad", (_QuantizeOnLoad, _ConversionOps), {})
except ImportError:  # pragma: no cover
    pass


# ---- what the user sees -------------------------------------------------------------------
def _weight_summary(t: Int4BaseTensor) -> str:
    group = max(getattr(t, "block_size", (0,)))
    return f"{type(t).__name__}(int4, group_size={group}, {str(t.dtype).removeprefix('torch.')})"


def _extra_repr_with_quantization(module: nn.Module) -> str:
    base = type(module).extra_repr(module)
    parts = [f"{n}={_weight_summary(p)}" for n, p in module._parameters.items()
             if isinstance(p, Int4BaseTensor)]
    return ", ".join([s for s in (base, *parts) if s])


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes held by the model's parameters (and buffers): for an int4 tensor its inner
    tensors (qdata, scales, zero points), for the rest ``numel * element_size``."""
    def nbytes(t):
        if isinstance(t, Int4BaseTensor):
            return sum(v.numel() * v.element_size() for v in t.inner_tensors().values())
        return t.numel() * t.element_size()

    total = sum(nbytes(p) for p in model.parameters())
    if return_buffers:
        total += sum(nbytes(b) for b in model.buffers())
    return total


def _describe_quantization(model: nn.Module) -> None:
    """``print(model)`` names the int4 weights; ``get_memory_footprint()`` counts int4 bytes."""
    for module in model.modules():
        if any(isinstance(p, Int4BaseTensor) for p in module._parameters.values()):
            module.extra_repr = types.MethodType(_extra_repr_with_quantization, module)
    model.get_memory_footprint = types.MethodType(memory_footprint, model)


def attach_quantizer_(model: nn.Module, config=None) -> None:
    """Make a transformers model quantized with ``quantize_`` behave like one loaded with
    ``Int4TensorConfig``: ``save_pretrained`` writes our native format, ``print(model)``,
    ``get_memory_footprint()`` and ``dequantize()`` know the int4 weights. ``quantize_`` calls
    this (when this module is imported); other models are left alone."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not any(
            isinstance(p, Int4BaseTensor) for p in model.parameters()):
        return
    previous = getattr(model, "hf_quantizer", None)
    if previous is not None and not isinstance(previous, Int4TensorHfQuantizer):
        return  # quantized by another method: not ours to describe
    if isinstance(config, _OUR_CONFIGS) and (previous is None
                                             or previous.quantization_config.config == config):
        qc = Int4TensorConfig(config)
    else:  # a name -> config map, or several calls with different configs
        qc = Int4TensorConfig(None, tensor_type="Int4Tensor")
    qc.extra["not_converted"] = sorted(
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m.weight, Int4BaseTensor))
    quantizer = Int4TensorHfQuantizer(qc, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.config.quantization_config = qc
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _describe_quantization(model)
    keep_grouped_experts_(model)


# ---- MoE experts: keep the grouped kernels while decoding --------------------------------------
EXPERTS_IMPLEMENTATION = "int4tensor_grouped_mm"
"""The name under which transformers' own ``grouped_mm`` experts forward is registered for
models whose expert stacks are int4 (see :func:`keep_grouped_experts_`)."""


def _has_int4_expert_stacks(model: nn.Module) -> bool:
    return any(isinstance(p, Int4BaseTensor) and p.ndim == 3 for p in model.parameters())


def keep_grouped_experts_(model: nn.Module) -> bool:
    """Keep a model with int4 expert stacks on the grouped experts path while it decodes.

    transformers' ``generate()`` replaces ``experts_implementation="grouped_mm"`` with
    ``"batched_mm"`` for its decoding loop on any non-CPU device. ``batched_mm`` runs
    ``torch.bmm(W[expert_ids], x)``: it copies every selected expert's weights (one copy per
    routed token) before the product, three weight reads where the grouped kernels make one
    (``aten._grouped_mm`` on an int4 stack reads only the active experts). This renames the
    model's ``"grouped_mm"`` entries to :data:`EXPERTS_IMPLEMENTATION`, the same transformers
    function registered under our name, which the decode switch leaves alone; an explicit
    choice (``batched_mm``, ``eager``, ...) is kept. Called by ``from_pretrained`` with
    :class:`Int4TensorConfig` and by ``quantize_`` on a transformers model; undone by
    ``model.dequantize()``. Returns whether anything changed.
    """
    current = getattr(model, "get_experts_implementation", None)
    if current is None or not _has_int4_expert_stacks(model):
        return False
    current = current()
    if "grouped_mm" not in current.values() or not _register_experts_implementation():
        return False
    model.set_experts_implementation(
        {k: EXPERTS_IMPLEMENTATION if v == "grouped_mm" else v for k, v in current.items()})
    return True


def _restore_grouped_experts(model: nn.Module) -> None:
    """Undo :func:`keep_grouped_experts_` (the weights are dense again)."""
    current = model.get_experts_implementation() \
        if hasattr(model, "get_experts_implementation") else {}
    if EXPERTS_IMPLEMENTATION in current.values():
        model.set_experts_implementation(
            {k: "grouped_mm" if v == EXPERTS_IMPLEMENTATION else v for k, v in current.items()})


def _register_experts_implementation() -> bool:
    """Whether this transformers has the experts interface (5.x) and now knows our name."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
    except ImportError:
        return False
    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, grouped_mm_experts_forward)
    return True


def _register() -> None:
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not Int4TensorConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reload of this module
        register_quantization_config(QUANT_METHOD)(Int4TensorConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not Int4TensorHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(Int4TensorHfQuantizer)
    _register_experts_implementation()


_register()
