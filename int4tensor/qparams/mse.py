"""``"mse"``: per-group search of the clipping range that minimises reconstruction error.

Min/max spends the 16 levels on the full range of each group, so one large value coarsens the
step for all G values. This search tries shrunken ranges and keeps, per group, the one with the
lowest squared error ``sum (w - dequant(quant(w)))^2``; the unshrunk min/max range is always a
candidate, so the result is never worse than ``"minmax"`` (in float32 arithmetic).

* ``"float"`` / ``"int"``: a 2-D grid of clip ratios ``(a, b)``: ``lo = a * min``, ``hi = b *
  max`` (an end is only shrunk towards 0 when it lies on its side of 0), ``scale = (hi - lo) /
  15``; ``"int"`` rounds the zero point ``z = round(-lo / scale)`` to an integer as min/max does.
* ``"none"`` (symmetric): a 1-D grid ``scale = p * max(-min / 8, max / 7)``, ``minimum = -8 *
  scale``.

The best grid point is then polished by a few rounds of "re-round the codes, least-squares
refit scale (and zero) for those codes" (:func:`._common.refine`), which also honours the domain.
"""

from __future__ import annotations

import torch

from int4tensor.qparams.common import MIN_SCALE, by_row_chunks, group_sq_error, \
    keep_better, refine

__all__ = ["choose_qparams_mse", "CLIP_RATIOS", "SYMMETRIC_RATIOS"]

#: Clip ratios tried for each end of the range (``"float"``/``"int"``): 8 x 8 candidates.
CLIP_RATIOS = (1.0, 0.94, 0.88, 0.82, 0.76, 0.70, 0.60, 0.50)
#: Scale ratios tried for the symmetric domain.
SYMMETRIC_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))
#: Least-squares polishing rounds after the grid search.
REFINE_ITERS = 2


def _candidate(lo: torch.Tensor, hi: torch.Tensor, domain: str):
    scale = (hi - lo).clamp(min=1e-6) / 15
    if domain == "int":
        return scale, -(-lo / scale).round().clamp(0, 15) * scale
    return scale, lo


def _search(g: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` float32 ``[R, K/G, G]`` -> float32 ``(scale, minimum)`` ``[R, K/G]``."""
    mn, mx = g.amin(-1), g.amax(-1)
    best = None
    if domain == "none":
        base = torch.maximum(-mn / 8, mx / 7).clamp(min=1e-6)
        for p in SYMMETRIC_RATIOS:
            scale = (base * p).clamp(min=MIN_SCALE)
            cand = (scale, -8 * scale, group_sq_error(g, scale, -8 * scale))
            best = cand if best is None else keep_better(best, cand)
    else:
        if domain == "int":  # the range must contain 0 for an integer zero point
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        neg, pos = mn.clamp(max=0), mx.clamp(min=0)
        for a in CLIP_RATIOS:
            lo = mn - (1 - a) * neg  # = a * mn when mn < 0, else mn unchanged
            for b in CLIP_RATIOS:
                hi = mx - (1 - b) * pos
                scale, minimum = _candidate(lo, hi, domain)
                cand = (scale, minimum, group_sq_error(g, scale, minimum))
                best = cand if best is None else keep_better(best, cand)
    best = refine(g, best, domain, REFINE_ITERS)
    return best[0], best[1]


def choose_qparams_mse(
    w: torch.Tensor, group_size: int, zero_point_domain: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip-range search (see module docstring).

    Args:
        w: floating ``[..., N, K]``, ``K % group_size == 0``.
        group_size: ``G``.
        zero_point_domain: ``"float"``, ``"int"`` (``minimum = -z * scale``, integer ``z`` in
            [0, 15]) or ``"none"`` (``minimum = -8 * scale``).

    Returns:
        ``(scale, minimum)``, float32 ``[..., N, K/G]``, ``scale > 0``.
    """
    return by_row_chunks(_search, w, group_size, zero_point_domain)
