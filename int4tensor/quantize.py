"""``quantize_``: swap eligible weights of a model for int4 tensor subclasses, in place."""

from __future__ import annotations

import sys
from typing import Callable, Mapping

import torch
from torch import nn

from int4tensor.model_surgery import replace_parameter, select_weights
from int4tensor.tensors.int4_tensor import check_weight_values

__all__ = ["quantize_", "replace_parameter"]


def quantize_(
    model: nn.Module,
    config,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Quantize a model's weights in place.

    Two ways to choose what is quantized:

    * ``quantize_(model, config, filter_fn=None)``: the ``weight`` of every module that
      ``filter_fn(module, fqn)`` selects; by default every ``nn.Linear``.
    * ``quantize_(model, {pattern: config_or_None, ...})``: any parameter, by its fully
      qualified name (``"layers.0.experts.w1"``). A pattern is an exact name, or a regular
      expression prefixed with ``"re:"`` that must match the whole name
      (``"re:.*experts\\.w[13]"``). The first matching pattern wins; ``None`` leaves the
      parameter alone. This is how 3D expert weights (``[E, N, K]``, or ``[E, K, N]`` with
      ``Int4WeightOnlyConfig(k_dim=-2)``) are targeted.

    Each chosen parameter is replaced by ``nn.Parameter(config.quantize_weight(p),
    requires_grad=False)``; attributes that loaders attached to the old Parameter object
    (``weight_loader``, ``input_dim``, ...) are kept. A weight the config cannot take (e.g. K
    not a multiple of the group size) stays in high precision with a warning naming it.
    Works on the meta device. Returns ``model``.

    Raises ``TypeError`` when ``config`` is not a config (a string, a number, None), and
    ``ValueError`` naming the parameter when a weight cannot be quantized (NaN/Inf values, a
    range that overflows the scale dtype); every target is checked before any is replaced, so
    the model is left unchanged then.
    """
    if isinstance(config, Mapping):
        for key, cfg in config.items():
            if cfg is not None:
                _check_config(cfg, f"the config for {key!r}")
    else:
        _check_config(config, "config")
    targets = select_weights(model, config, filter_fn, who="quantize_", stacklevel=2)
    # Check every target before replacing any, so a bad weight (NaN, overflowing range) leaves
    # the model as it was instead of half quantized.
    chosen = []
    for label, module, name, cfg in targets:
        try:
            check_weight_values(getattr(module, name))
        except (ValueError, TypeError) as e:
            raise type(e)(f"quantize_: cannot quantize {label}: {e}") from e
        chosen.append((label, module, name, cfg))
    for label, module, name, cfg in chosen:
        with torch.no_grad():
            try:
                quantized = cfg.quantize_weight(getattr(module, name))
            except (ValueError, TypeError) as e:
                raise type(e)(f"quantize_: cannot quantize {label}: {e}") from e
            replace_parameter(module, name, quantized)
    _tell_integrations(model, config)
    return model


def _check_config(config, what: str) -> None:
    if isinstance(config, type) or not (callable(getattr(config, "can_quantize", None))
            and callable(getattr(config, "quantize_weight", None))):
        raise TypeError(f"quantize_: {what} must be a config object such as "
                        "Int4WeightOnlyConfig(group_size=128) or "
                        "Float8DynamicActivationInt4WeightConfig() (or a map of parameter "
                        f"names to configs), got {config!r} of type {type(config).__name__}")


def _tell_integrations(model: nn.Module, config) -> None:
    """A transformers model quantized by hand then saves with ``save_pretrained`` (and prints,
    counts its memory) like one loaded with ``Int4TensorConfig``. The integration is imported
    only where transformers is (see ``int4tensor.integrations._autoload``)."""
    integration = sys.modules.get("int4tensor.integrations.transformers")
    if integration is not None:
        integration.attach_quantizer_(model, config)
