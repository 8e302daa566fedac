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

Calibration-based quantization (needs activations, so not a registry entry) lives in
:func:`awq_quantize_` (AWQ-style per-input-channel scaling) and :func:`gptq_quantize_`
(Hessian-based error compensation).
"""

from __future__ import annotations

from typing import Callable

import torch

from int4tensor.algorithms.hqq import choose_qparams_hqq
from int4tensor.algorithms.mse import choose_qparams_mse
from int4tensor.quant_primitives import ZERO_POINT_DOMAINS, choose_qparams_minmax

__all__ = ["QPARAMS_ALGORITHMS", "choose_qparams", "choose_qparams_mse", "choose_qparams_hqq",
           "awq_quantize_", "gptq_quantize_"]

QParamsFn = Callable[[torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor]]

#: name -> ``fn(w, group_size, zero_point_domain) -> (scale, minimum)``
QPARAMS_ALGORITHMS: dict[str, QParamsFn] = {
    "minmax": choose_qparams_minmax,
    "mse": choose_qparams_mse,
    "hqq": choose_qparams_hqq,
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


# Imported last: they use choose_qparams from this module.
from int4tensor.algorithms.awq import awq_quantize_  # noqa: E402
from int4tensor.algorithms.gptq import gptq_quantize_  # noqa: E402
