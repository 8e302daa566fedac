"""``explain``: which kernel each quantized weight runs, and why the faster ones do not.

What a user asks when a layer is slow::

    >>> print(int4tensor.explain(model, input_ids))     # runs one forward, records each call
    >>> print(int4tensor.explain(weight, x))            # one weight and activation

Every line names the weight, the op, the activation shape, the backend that runs it and, for
each candidate ahead of it in its dispatch table, the reason it refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from int4tensor import kernels
from int4tensor.kernels import dispatch
from int4tensor.tensors.base import Int4BaseTensor

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True)
class Explanation:
    """One dispatched call: ``backend`` runs it; ``refused`` lists ``(candidate, reason)`` of
    the candidates ahead of it, best first."""

    name: str
    op: str
    x_shape: tuple[int, ...]
    backend: str
    refused: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.op} x{list(self.x_shape)} -> {self.backend}"]
        grouped: dict[str, list[str]] = {}  # one line per reason
        for candidate, reason in self.refused:
            names = grouped.setdefault(reason, [])
            if candidate not in names:
                names.append(candidate)
        lines += [f"    not {', '.join(names)}: {reason}" for reason, names in grouped.items()]
        return "\n".join(lines)


class Report(list):
    """A list of :class:`Explanation` that prints as one block."""

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self) if self else "no int4 op was dispatched"


def explain(obj, *inputs, **kwargs) -> Report:
    """How int4 ops are dispatched.

    Args:
        obj: a quantized ``nn.Module`` (then ``inputs``/``kwargs`` are its forward's arguments;
            one forward runs under ``torch.no_grad()``), or an int4 weight tensor (then
            ``inputs`` is one activation: ``x [*, K]`` for a 2D weight, ``x [B, M, K]`` for a 3D
            one).

    Returns:
        one :class:`Explanation` per quantized weight and activation shape, in call order.
    """
    if isinstance(obj, Int4BaseTensor):
        if len(inputs) != 1 or kwargs:
            raise TypeError("explain(weight, x) takes one activation tensor")
        weight, x = obj, inputs[0]
        stored = weight.transpose(-1, -2) if weight.is_transposed else weight
        op = "linear" if stored.ndim == 2 else "bmm"
        decision = kernels.explain_call(op, x, stored)
        return Report([Explanation("weight", op, tuple(x.shape), decision.backend,
                                   decision.refused)])
    if not isinstance(obj, nn.Module):
        raise TypeError(f"explain takes a quantized nn.Module or an int4 weight tensor, got "
                        f"{type(obj).__name__}")
    names = {}
    for name, p in obj.named_parameters():
        if isinstance(p, Int4BaseTensor):
            names[p.qdata.data_ptr()] = name
    for name, module in obj.named_modules():  # weights held through prepare_for_compile
        for attr in getattr(type(module), "_int4_layouts", ()):
            w = getattr(module, attr)
            names.setdefault(w.qdata.data_ptr(), f"{name}.{attr}" if name else attr)
    with torch.no_grad(), dispatch.recording() as calls:
        obj(*inputs, **kwargs)
    report, seen = Report(), set()
    for weight, op, shape, decision in calls:
        name = names.get(weight.qdata.data_ptr(), f"<weight {list(weight.shape)}>")
        if (name, op, shape) in seen:
            continue
        seen.add((name, op, shape))
        report.append(Explanation(name, op, shape, decision.backend, decision.refused))
    return report
