"""Data-free algorithms that choose per-group quantization parameters.

Each algorithm maps a weight ``w [..., N, K]`` to float32 ``(scale, minimum) [..., N, K/G]``
with ``u = clamp(round((w - minimum) / scale), 0, 15)`` and ``w ≈ u * scale + minimum``, for a
given zero-point domain (``"float"``, ``"int"``, ``"none"``; see
:func:`int4tensor.quant_primitives.choose_qparams_minmax`). All of them produce the same
Int4Tensor layout, so every kernel runs their output.

* ``"minmax"``: the group's min/max range (fbgemm's ``int4_row_quantize_zp``, the default);
* ``"mse"``: search of a shrunken clipping range per group, lowest squared error
  (:mod:`.mse`);
* ``"hqq"``: half-quadratic optimisation of scale and zero point (:mod:`.hqq`).

This package works on plain tensors and sits below the tensor subclasses (layer 0, see
CONTRIBUTING.md). Calibration-based quantization (needs activations and a model, so not a
registry entry) is :mod:`int4tensor.calibration`.
"""

from __future__ import annotations

from typing import Callable

import torch

from int4tensor.qparams.hqq import choose_qparams_hqq
from int4tensor.qparams.mse import choose_qparams_mse
from int4tensor.quant_primitives import check_zero_point_domain, choose_qparams_minmax

__all__ = ["QPARAMS_ALGORITHMS", "check_qparams_algorithm", "choose_qparams",
           "choose_qparams_minmax", "choose_qparams_mse", "choose_qparams_hqq"]

QParamsFn = Callable[[torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor]]

#: name -> ``fn(w, group_size, zero_point_domain) -> (scale, minimum)``
QPARAMS_ALGORITHMS: dict[str, QParamsFn] = {
    "minmax": choose_qparams_minmax,
    "mse": choose_qparams_mse,
    "hqq": choose_qparams_hqq,
}


def check_qparams_algorithm(algorithm: str, where: str = "qparams algorithm") -> None:
    """Raise ``ValueError`` unless ``algorithm`` names an entry of :data:`QPARAMS_ALGORITHMS`."""
    if algorithm not in QPARAMS_ALGORITHMS:
        raise ValueError(f"{where} must be one of {sorted(QPARAMS_ALGORITHMS)}, "
                         f"got {algorithm!r}")


def choose_qparams(
    w: torch.Tensor, group_size: int, algorithm: str = "minmax", zero_point_domain: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, minimum)`` for ``w`` by the named algorithm; see the module docstring."""
    if algorithm not in QPARAMS_ALGORITHMS:
        raise ValueError(f"unknown qparams algorithm {algorithm!r}; choose one of "
                         f"{sorted(QPARAMS_ALGORITHMS)}")
    check_zero_point_domain(zero_point_domain)
    return QPARAMS_ALGORITHMS[algorithm](w, group_size, zero_point_domain)
