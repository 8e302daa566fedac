"""Data-free algorithms that choose per-group quantization parameters.

Each algorithm maps a weight ``w [..., N, K]`` to float32 ``(scale, minimum) [..., N, K/G]``
with ``u = clamp(round((w - minimum) / scale), 0, 15)`` and ``w ≈ u * scale + minimum``, for a
given zero-point domain (``"float"``, ``"int"``, ``"none"``; see
:func:`int4tensor.quant_primitives.choose_qparams_minmax`). All of them produce the same
Int4Tensor layout, so every kernel runs their output.
"""

from __future__ import annotations

from typing import Callable

import torch

from int4tensor.quant_primitives import ZERO_POINT_DOMAINS, choose_qparams_minmax

__all__ = ["QPARAMS_ALGORITHMS", "choose_qparams"]

QParamsFn = Callable[[torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor]]

#: name -> ``fn(w, group_size, zero_point_domain) -> (scale, minimum)``
QPARAMS_ALGORITHMS: dict[str, QParamsFn] = {
    "minmax": choose_qparams_minmax,
}


def choose_qparams(
    w: torch.Tensor, group_size: int, algorithm: str = "minmax", zero_point_domain: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, minimum)`` for ``w`` by the named algorithm; see the module docstring."""
    if algorithm not in QPARAMS_ALGORITHMS:
        raise ValueError(f"unknown qparams algorithm {algorithm!r}; choose one of "
                         f"{sorted(QPARAMS_ALGORITHMS)}")
    if zero_point_domain not in ZERO_POINT_DOMAINS:
        raise ValueError(f"zero_point_domain must be one of {ZERO_POINT_DOMAINS}, "
                         f"got {zero_point_domain!r}")
    return QPARAMS_ALGORITHMS[algorithm](w, group_size, zero_point_domain)
