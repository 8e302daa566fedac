"""Calibration plumbing shared by AWQ and GPTQ: pick the layers, feed the calibration batches
through the model and hand one layer's inputs at a time to a callback.

Layers are processed in model order and each is quantized before the next is captured, so a
layer is calibrated on the activations the *quantized* earlier layers produce (as GPTQ/AWQ do).
Only one layer's statistics live at a time; the forward pass is cut short right after the layer
being captured (its pre-hook raises), so capturing layer ``i`` costs ``i``'s prefix of the model.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from int4tensor.config import Int4WeightOnlyConfig
from int4tensor.model_surgery import is_linear, select_weights


class _StopForward(Exception):
    """Raised by the capture hook once the target layer's input is seen."""


def check_calibration_batches(batches: Iterable[Any]) -> list:
    """``batches`` as a list (it is replayed once per layer); each item is a tensor (called as
    ``model(batch)``), a tuple/list (``model(*batch)``) or a dict (``model(**batch)``)."""
    if isinstance(batches, torch.Tensor):
        raise TypeError("calibration_batches must be an iterable of batches (e.g. a list of "
                        "token tensors), not a single tensor; wrap it: [tokens]")
    if batches is None:
        raise ValueError("no calibration data: calibration_batches is None")
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration data: calibration_batches is empty")
    for b in batches:
        if not isinstance(b, (torch.Tensor, tuple, list, dict)):
            raise TypeError(f"each calibration batch must be a tensor, tuple, list or dict, "
                            f"got {type(b).__name__}")
    return batches


def check_config(config) -> None:
    if not isinstance(config, Int4WeightOnlyConfig):
        raise TypeError(f"config must be an Int4WeightOnlyConfig, got {type(config).__name__}")


def target_linears(model: nn.Module, config, filter_fn, who: str) -> list[tuple[str, nn.Linear]]:
    """``(fqn, module)`` of the Linears to quantize, in model order: ``quantize_``'s walk
    (:func:`int4tensor.model_surgery.select_weights`, same skips and warning) restricted to
    ``nn.Linear`` weights."""
    chosen_by = filter_fn or is_linear
    targets = select_weights(model, config, lambda m, fqn: isinstance(m, nn.Linear)
                             and chosen_by(m, fqn), who=who, stacklevel=3)
    out = [(label[: -len(".weight")], module) for label, module, _, _ in targets]
    if not out:
        raise ValueError("no nn.Linear layer to quantize (check filter_fn and the group size)")
    return out


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def feed_layer_inputs(model: nn.Module, layer: nn.Module, batches: list,
                      on_input: Callable[[torch.Tensor], None]) -> None:
    """Run every batch through ``model`` and call ``on_input(x [rows, K])`` with ``layer``'s
    input (flattened over the leading dims); the rest of each forward pass is skipped."""

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        on_input(x.detach().reshape(-1, x.shape[-1]))
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _call(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()


def progress(items, desc: str, enabled: bool):
    """``tqdm`` over ``items`` (a plain iterator when ``enabled`` is False)."""
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit="layer")


def snap_qparams(scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype):
    """The float32 ``(scale, minimum)`` the stored tensor will actually dequantize with, once
    ``scale`` and ``zero_point = minimum + 8 * scale`` are rounded to ``dtype``; calibration
    methods quantize with these so their error bookkeeping matches the checkpoint exactly."""
    s = scale.to(dtype).float()
    zp = (minimum + 8 * scale).to(dtype).float()
    return s, zp - 8 * s
