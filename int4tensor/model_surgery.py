"""Model surgery: which weights of a model get quantized, and swapping a parameter in place.

One walk decides the targets for ``quantize_`` and the calibration workflows (AWQ, GPTQ), with
one warning text for a weight that stays in high precision; one function replaces a parameter
keeping what loaders attached to it.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Mapping

import torch
from torch import nn

from int4tensor.tensors import Int4BaseTensor

__all__ = ["Target", "is_linear", "replace_parameter", "select_weights"]

#: ``(label, module, parameter name, config)``: ``label`` is the fully qualified name.
Target = tuple[str, nn.Module, str, object]


def is_linear(module: nn.Module, fqn: str) -> bool:
    """The default filter: every ``nn.Linear``."""
    return isinstance(module, nn.Linear)


def select_weights(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None
                   = None, *, who: str = "quantize_", stacklevel: int = 2) -> list[Target]:
    """The parameters to quantize, in model order.

    ``config`` is one config (then the ``weight`` of each module ``filter_fn(module, fqn)``
    selects, by default every ``nn.Linear``) or a ``{pattern: config_or_None}`` map (see
    ``quantize_``). Already-quantized parameters are skipped; one the config cannot take stays
    in high precision with the warning ``"{who}: left NAME in DTYPE: REASON"``.
    """
    if isinstance(config, Mapping):
        if filter_fn is not None:
            raise ValueError(f"{who}: filter_fn cannot be combined with a name -> config map")
        targets = _targets_by_name(model, config, who)
    else:
        filter_fn = filter_fn or is_linear
        targets = [
            (fqn, module, "weight", config)
            for fqn, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor) and filter_fn(module, fqn)
        ]
    chosen = []
    for fqn, module, name, cfg in targets:
        param = getattr(module, name)
        if isinstance(param, Int4BaseTensor):
            continue  # already quantized
        label = f"{fqn}.{name}" if fqn else name
        reason = cfg.can_quantize(param)
        if reason is not None:
            warnings.warn(f"{who}: left {label} in {param.dtype}: {reason}",
                          stacklevel=stacklevel + 1)
            continue
        chosen.append((label, module, name, cfg))
    return chosen


def _targets_by_name(model: nn.Module, config_map: Mapping, who: str):
    patterns = [
        (re.compile(key[3:]) if key.startswith("re:") else None, key, cfg)
        for key, cfg in config_map.items()
    ]
    matched = set()
    targets = []
    for fqn, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{fqn}.{name}" if fqn else name
            for regex, key, cfg in patterns:
                if (regex.fullmatch(full) if regex else key == full):
                    matched.add(key)
                    if cfg is not None:
                        targets.append((fqn, module, name, cfg))
                    break
    unmatched = [key for _, key, _ in patterns if key not in matched]
    if unmatched:
        raise ValueError(f"{who}: no parameter matches {unmatched}")
    return targets


def replace_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> nn.Parameter:
    """Set ``module.<name>`` to ``nn.Parameter(tensor, requires_grad=False)``, keeping the
    Python attributes of the Parameter it replaces."""
    old = getattr(module, name)
    new = nn.Parameter(tensor, requires_grad=False)
    # the old tensor's own state (an int4 tensor's fields, what dispatch cached on it) is not a
    # Parameter attribute: carried over, the plans would keep running the old layout's kernels
    own = set(getattr(old, "tensor_data_names", ())) | \
        set(getattr(old, "optional_tensor_data_names", ())) | \
        set(getattr(old, "tensor_attribute_names", ()))
    for key, value in vars(old).items():
        if key not in vars(new) and key not in own and not key.startswith("_dispatch_"):
            setattr(new, key, value)
    setattr(module, name, new)
    return new
