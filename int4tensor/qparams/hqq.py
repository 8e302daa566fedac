"""``"hqq"``: half-quadratic optimisation of scale and zero point (data-free).

HQQ (Badri & Shaji, 2023) fits the quantizer to a sparsity-promoting ``l_p`` loss (``p < 1``)
on the reconstruction error, so a few large errors (clipped outliers) do not pull the fit, and
solves it by half-quadratic splitting: an auxiliary error variable ``E`` is alternately
updated by the generalised soft-threshold (the proximal operator of ``|.|^p``) and the
quantizer is refitted to ``w - E`` in closed form. Per group, with codes ``u``:

1. ``u = clamp(round((w - minimum) / scale), 0, 15)``
2. ``x = (w - (u * scale + minimum)) / scale``  (error in quantization steps, so the thresholds
   below do not depend on the weight's magnitude)
3. ``E = scale * sign(x) * relu(|x| - |x|^(p-1) / beta)``
4. ``(scale, minimum) = argmin ||(w - E) - (u * scale + minimum)||^2`` within the domain
   (the original HQQ updates only the zero point; refitting the scale as well is a linear
   least-squares step too and lowers the error further)
5. ``beta *= kappa``

Per group we keep the iterate (min/max start included) with the lowest squared reconstruction
error, so the result is never worse than ``"minmax"``.
"""

from __future__ import annotations

import torch

from int4tensor.qparams.common import MIN_SCALE, by_row_chunks, codes, group_sq_error, \
    keep_better, least_squares_qparams
from int4tensor.quant_primitives import choose_qparams_minmax

__all__ = ["choose_qparams_hqq"]

#: ``(p, beta, kappa, iterations)``; beta is in units of quantization steps.
LP_NORM, BETA, KAPPA, ITERS = 0.7, 1.0, 1.05, 20


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-threshold: ``sign(x) * relu(|x| - |x|^(p-1) / beta)``."""
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.clamp(min=1e-8).pow(p - 1) / beta)


def _search(g: torch.Tensor, domain: str, p: float = LP_NORM, beta: float = BETA,
            kappa: float = KAPPA, iters: int = ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` float32 ``[R, K/G, G]`` -> float32 ``(scale, minimum)`` ``[R, K/G]``."""
    scale, minimum = choose_qparams_minmax(g.flatten(-2), g.shape[-1], domain)
    best = (scale, minimum, group_sq_error(g, scale, minimum))
    for _ in range(iters):
        u = codes(g, scale, minimum)
        x = (g - (u * scale.unsqueeze(-1) + minimum.unsqueeze(-1))) / scale.unsqueeze(-1)
        target = g - _shrink_lp(x, beta, p) * scale.unsqueeze(-1)
        scale, minimum = least_squares_qparams(target, u, scale, minimum, domain)
        scale = scale.clamp(min=MIN_SCALE)
        best = keep_better(best, (scale, minimum, group_sq_error(g, scale, minimum)))
        beta *= kappa
    return best[0], best[1]


def choose_qparams_hqq(
    w: torch.Tensor, group_size: int, zero_point_domain: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-quadratic scale/zero optimisation (see module docstring).

    Args:
        w: floating ``[..., N, K]``, ``K % group_size == 0``.
        group_size: ``G``.
        zero_point_domain: ``"float"``, ``"int"`` (integer zero point kept through every
            refit) or ``"none"`` (``minimum = -8 * scale``).

    Returns:
        ``(scale, minimum)``, float32 ``[..., N, K/G]``, ``scale > 0``.
    """
    return by_row_chunks(_search, w, group_size, zero_point_domain)
