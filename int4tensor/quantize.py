"""``quantize_``: swap eligible weights of a model for int4 tensor subclasses, in place."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from int4tensor.tensors import Int4BaseTensor

__all__ = ["quantize_"]


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_(
    model: nn.Module,
    config,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Quantize the ``weight`` of every module that ``filter_fn(module, fqn)`` selects.

    By default every ``nn.Linear``. Each weight is replaced in place by
    ``nn.Parameter(config.quantize_weight(weight), requires_grad=False)``; attributes that
    loaders attached to the old Parameter object (``weight_loader``, ``input_dim``, ...) are
    kept. A weight the config cannot take (e.g. K not a multiple of the group size) stays in
    high precision with a warning naming the layer. Works on the meta device. Returns ``model``.
    """
    filter_fn = filter_fn or _is_linear
    for fqn, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not filter_fn(module, fqn):
            continue
        if isinstance(weight, Int4BaseTensor):
            continue  # already quantized
        reason = config.can_quantize(weight)
        if reason is not None:
            warnings.warn(f"quantize_: left {fqn or type(module).__name__}.weight "
                          f"in {weight.dtype}: {reason}", stacklevel=2)
            continue
        with torch.no_grad():
            replace_parameter(module, "weight", config.quantize_weight(weight))
    return model


def replace_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> nn.Parameter:
    """Set ``module.<name>`` to ``nn.Parameter(tensor, requires_grad=False)``, keeping the
    Python attributes of the Parameter it replaces."""
    old = getattr(module, name)
    new = nn.Parameter(tensor, requires_grad=False)
    for key, value in vars(old).items():
        if key not in vars(new):
            setattr(new, key, value)
    setattr(module, name, new)
    return new
