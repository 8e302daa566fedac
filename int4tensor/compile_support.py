"""``prepare_for_compile``: int4 weights as plain tensors at the boundary of compiled graphs.

A compiled graph whose inputs are tensor subclasses pays, on every call, Python work per
subclass input: dynamo's guards on its metadata and AOTAutograd's flattening of it into the
inner tensors the graph really takes (measured in benchmarks/bench_generate.py: it grows with
the number of quantized weights and can exceed the GPU time of a decode step). After
``prepare_for_compile(model)`` each int4 weight is stored as its inner tensors (qdata, scales,
zero points: plain parameters) and rebuilt from them by a parametrization when the module
reads ``.weight``; inside a compiled graph that rebuild is traced away, so the graph's inputs
are plain tensors. In eager mode the rebuilt tensor is cached until an inner tensor changes.

What stays the same: ``model.state_dict()`` (keys and values: ``"...weight"`` holding the
int4 tensor), ``load_state_dict``, ``torch.save``/``torch.load(weights_only=True)`` of that
state dict, :func:`int4tensor.save_file`, ``model.to(...)``, outputs bit for bit.

Call it last: after loading and after
:func:`~int4tensor.convert_model_to_packed_tensors_` (which looks for int4 parameters).
"""

from __future__ import annotations

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from int4tensor.tensors.base import Int4BaseTensor

__all__ = ["is_prepared_for_compile", "prepare_for_compile"]


class _Rebuild(nn.Module):
    """Parametrization holding an int4 weight as its inner tensors (``original0..``)."""

    def __init__(self, weight: Int4BaseTensor):
        super().__init__()
        self.cls = type(weight)
        self.names, self.attributes = weight.__tensor_flatten__()
        self._cached: Int4BaseTensor | None = None
        self._cached_key: tuple | None = None

    def forward(self, *tensors: torch.Tensor) -> Int4BaseTensor:
        if torch.compiler.is_compiling():  # traced: the graph takes the plain tensors
            return self.rebuild(tensors)
        try:
            # .to()/.cuda() swap a parameter's data in place: the pointer tells
            key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter: no cache
            return self.rebuild(tensors)
        if key != self._cached_key:
            self._cached, self._cached_key = self.rebuild(tensors), key
        return self._cached

    def rebuild(self, tensors) -> Int4BaseTensor:
        # the parts of a checked tensor (load_state_dict keeps their shapes): skip the
        # consistency check that unflatten runs, ~10 us per weight per eager call
        if torch.compiler.is_compiling():
            return self.cls.__tensor_unflatten__(dict(zip(self.names, tensors)),
                                                 self.attributes, None, None)
        return self.cls.from_fields(dict(zip(self.names, tensors)), self.attributes,
                                    validate=False)

    def right_inverse(self, value: Int4BaseTensor) -> tuple[torch.Tensor, ...]:
        names, attributes = value.__tensor_flatten__() if isinstance(value, Int4BaseTensor) \
            else (None, None)
        if type(value) is not self.cls or names != self.names or attributes != self.attributes:
            raise ValueError(
                f"this weight was prepared for compile as {self.cls.__name__} with "
                f"{self.names} / {self.attributes}; cannot assign "
                f"{type(value).__name__}{'' if names is None else f' with {names} / {attributes}'}")
        return tuple(getattr(value, n) for n in names)


def _originals(module: nn.Module, name: str) -> list[str]:
    plist = module.parametrizations[name]
    return [k for k in plist._parameters if k.startswith("original")]


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """Put ``prefix + name`` (the int4 tensor) back where the inner tensors' keys are."""
    for name in list(getattr(module, "parametrizations", {})):
        if not isinstance(module.parametrizations[name][0], _Rebuild):
            continue
        keys = [f"{prefix}parametrizations.{name}.{k}" for k in _originals(module, name)]
        if not all(k in state_dict for k in keys):
            continue
        tensors = [state_dict.pop(k) for k in keys]
        state_dict[prefix + name] = module.parametrizations[name][0].rebuild(tensors)
    return state_dict


def _load_state_dict_pre_hook(module, state_dict, prefix, *args):
    """Split an incoming int4 tensor under ``prefix + name`` into the inner tensors' keys."""
    for name in list(getattr(module, "parametrizations", {})):
        rebuild = module.parametrizations[name][0]
        if not isinstance(rebuild, _Rebuild) or prefix + name not in state_dict:
            continue
        inner = rebuild.right_inverse(state_dict.pop(prefix + name))
        for key, tensor in zip(_originals(module, name), inner):
            state_dict[f"{prefix}parametrizations.{name}.{key}"] = tensor


def prepare_for_compile(model: nn.Module) -> nn.Module:
    """Store every int4 parameter of ``model`` as plain inner tensors rebuilt on access (see
    the module docstring); in place, returns ``model``; calling it again changes nothing."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, Int4BaseTensor):
                continue
            parametrize.register_parametrization(module, name, _Rebuild(param), unsafe=True)
            if not getattr(module, "_int4_compile_hooks", False):
                module._register_state_dict_hook(_state_dict_hook)
                module._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)
                module._int4_compile_hooks = True
    return model


def is_prepared_for_compile(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is an int4 weight held through :func:`prepare_for_compile`."""
    return parametrize.is_parametrized(module, name) and isinstance(
        module.parametrizations[name][0], _Rebuild)
