"""``prepare_for_compile``: int4 weights as plain tensors at the boundary of compiled graphs.

A compiled graph whose inputs are tensor subclasses pays, on every call, Python work per
subclass input: dynamo's guards on its metadata and AOTAutograd's flattening of it into the
inner tensors the graph really takes. It grows with the number of quantized weights and, in a
transformers decode step with CUDA graphs, can exceed the GPU time of the step.

After ``prepare_for_compile(model)`` each int4 weight is stored as its inner tensors (qdata,
scales, zero points: plain parameters named ``_int4_<name>_<field>``) and the module's class
is swapped for a subclass (one per original class and weight layout) whose ``weight``
property rebuilds the int4 tensor from them. Inside a compiled graph the rebuild is traced
away, so the graph's inputs are plain tensors, and dynamo guards each weight with a few
checks. (``torch.nn.utils.parametrize`` does the same job with ~47 guards per weight: 1.4 ms
of guard evaluation per call for 225 weights on this project's CPU machine, against 0.16 ms
here and 0.05 ms for the bf16 model; ``scripts/probe_compile_guards.py``.) In eager mode the
rebuilt tensor is cached until an inner tensor changes.

What stays the same: ``model.state_dict()`` (keys and values: ``"...weight"`` holding the
int4 tensor), ``load_state_dict``, ``torch.save``/``torch.load(weights_only=True)`` of that
state dict, :func:`int4tensor.save_file`, ``model.to(...)``, ``copy.deepcopy`` and pickling
the whole model (``torch.save(model)``), ``module.weight = <int4 tensor of the same layout>``,
outputs bit for bit.

Call it after loading. :func:`~int4tensor.convert_model_to_packed_tensors_` may come before or
after it (it converts prepared weights in place, keeping them prepared).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from int4tensor.tensors.base import Int4BaseTensor

__all__ = ["is_prepared_for_compile", "prepare_for_compile"]


def _frozen(value: Any) -> Any:
    """Attributes as nested tuples (hashable: the key of the generated classes)."""
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return tuple(_frozen(v) for v in value)
    return value


class _Layout:
    """How one prepared weight is rebuilt: its class, field names and attributes."""

    __slots__ = ("cls", "fields", "attributes", "keys")

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def __init__(self, name: str, weight: Int4BaseTensor):
        self.cls = type(weight)
        fields, attributes = weight.__tensor_flatten__()
        self.fields = tuple(fields)
        self.attributes = _frozen(attributes)
        self.keys = tuple(f"_int4_{name}_{f}" for f in self.fields)

    def signature(self) -> tuple:
        return (self.cls, self.fields, repr(self.attributes))

    def rebuild(self, tensors, validate: bool = False) -> Int4BaseTensor:
        named = dict(zip(self.fields, tensors))
        if torch.compiler.is_compiling():
            return self.cls.__tensor_unflatten__(named, list(self.attributes), None, None)
        # the parts of a checked tensor (load_state_dict keeps their shapes): the consistency
        # check costs ~10 us per weight per eager call
        return self.cls.from_fields(named, list(self.attributes), validate=validate)

    def split(self, value, where: str) -> tuple[torch.Tensor, ...]:
        """The inner tensors of ``value``, which must have this layout."""
        if isinstance(value, Int4BaseTensor):
            fields, attributes = value.__tensor_flatten__()
            if (type(value) is self.cls and tuple(fields) == self.fields
                    and _frozen(attributes) == self.attributes):
                return tuple(getattr(value, f) for f in self.fields)
            got = f"{type(value).__name__} with {list(fields)} / {attributes}"
        else:
            got = f"a {type(value).__name__}"
        raise ValueError(f"{where} was prepared for compile as {self.cls.__name__} with "
                         f"{list(self.fields)} / {list(self.attributes)}; cannot assign {got}")


def _getter(name: str, layout: _Layout):
    keys = layout.keys

    def get(self):
        params = self._parameters
        tensors = [params[k] for k in keys]
        if torch.compiler.is_compiling():  # traced: the graph takes the plain tensors
            return layout.rebuild(tensors)
        try:
            # .to()/.cuda() swap a parameter's data in place: the pointer tells
            key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter: no cache
            return layout.rebuild(tensors)
        cache = self.__dict__.setdefault("_int4_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            hit = cache[name] = (key, layout.rebuild(tensors))
        return hit[1]
    return get


def _set(module: nn.Module, name: str, value) -> None:
    layout = type(module)._int4_layouts[name]
    for key, tensor in zip(layout.keys, layout.split(value, f"{type(module).__name__}.{name}")):
        module._parameters[key] = nn.Parameter(tensor, requires_grad=False)


def _setattr(self, key, value):
    if key in type(self)._int4_layouts:
        _set(self, key, value)
    else:
        super(type(self), self).__setattr__(key, value)


def _reduce_ex(self, protocol):
    # the generated class cannot be found by name: pickle (torch.save(model)) rebuilds it
    state = {k: v for k, v in self.__dict__.items() if k != "_int4_cache"}
    return _restore, (type(self).__mro__[1], dict(type(self)._int4_layouts), state)


def _restore(base: type, layouts: dict, state: dict) -> nn.Module:
    cls = _prepared_class(base, layouts)
    module = cls.__new__(cls)
    module.__dict__.update(state)
    return module


#: (original class, weight layouts) -> the generated subclass
_CLASSES: dict[tuple, type] = {}


def _prepared_class(base: type, layouts: dict[str, _Layout]) -> type:
    key = (base, tuple((n, l.signature()) for n, l in sorted(layouts.items())))
    cls = _CLASSES.get(key)
    if cls is None:
        namespace = {n: property(_getter(n, l)) for n, l in layouts.items()}
        namespace.update(_int4_layouts=dict(layouts), __setattr__=_setattr,
                         __reduce_ex__=_reduce_ex, __module__=base.__module__)
        cls = _CLASSES[key] = type(f"Int4Prepared{base.__name__}", (base,), namespace)
    return cls


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """Put ``prefix + name`` (the int4 tensor) back where the inner tensors' keys are."""
    for name, layout in getattr(type(module), "_int4_layouts", {}).items():
        keys = [prefix + k for k in layout.keys]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = layout.rebuild([state_dict.pop(k) for k in keys])
    return state_dict


def _load_state_dict_pre_hook(module, state_dict, prefix, *args):
    """Split an incoming int4 tensor under ``prefix + name`` into the inner tensors' keys."""
    for name, layout in getattr(type(module), "_int4_layouts", {}).items():
        if prefix + name in state_dict:
            inner = layout.split(state_dict.pop(prefix + name), f"{prefix}{name}")
            for key, tensor in zip(layout.keys, inner):
                state_dict[prefix + key] = tensor


def _hold(module: nn.Module, weights: dict[str, Int4BaseTensor]) -> None:
    """Hold ``weights`` (name -> int4 tensor; a registered int4 parameter, or a prepared
    weight of another layout, which it replaces) as plain inner tensors of ``module``."""
    layouts = dict(getattr(type(module), "_int4_layouts", {}))
    base = type(module).__mro__[1] if layouts else type(module)
    for name, weight in weights.items():
        if name in layouts:
            for key in layouts[name].keys:
                del module._parameters[key]
        else:
            del module._parameters[name]
        layouts[name] = _Layout(name, weight)
        for key, tensor in zip(layouts[name].keys, layouts[name].split(weight, name)):
            module.register_parameter(key, nn.Parameter(tensor, requires_grad=False))
    module.__class__ = _prepared_class(base, layouts)
    module.__dict__.pop("_int4_cache", None)
    if not module.__dict__.get("_int4_compile_hooks", False):
        module._register_state_dict_hook(_state_dict_hook)
        module._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)
        module.__dict__["_int4_compile_hooks"] = True


def replace_prepared_weight(module: nn.Module, name: str, weight: Int4BaseTensor) -> None:
    """Put ``weight`` (any int4 layout) where the prepared ``module.<name>`` was, still
    prepared: what :func:`~int4tensor.convert_model_to_packed_tensors_` does to prepared
    models."""
    if not is_prepared_for_compile(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is not prepared for compile")
    _hold(module, {name: weight})


def prepare_for_compile(model: nn.Module) -> nn.Module:
    """Store every int4 parameter of ``model`` as plain inner tensors rebuilt on access (see
    the module docstring); in place, returns ``model``; calling it again changes nothing."""
    for module in model.modules():
        found = {name: p for name, p in module.named_parameters(recurse=False)
                 if isinstance(p, Int4BaseTensor)}
        if found:
            _hold(module, found)
    return model


def is_prepared_for_compile(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is an int4 weight held through :func:`prepare_for_compile`."""
    return name in getattr(type(module), "_int4_layouts", {})
