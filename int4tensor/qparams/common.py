"""Shared helpers for the qparams searches: fake-quantization, per-group error, least-squares
refits that honour the zero-point domain, and row chunking to bound memory.

Shapes: ``g`` is a grouped weight, float32 ``[..., N, K/G, G]``; ``scale``/``minimum`` are
float32 ``[..., N, K/G]`` with ``w ≈ u * scale + minimum``, ``u = clamp(round((w - min)/scale),
0, 15)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from int4tensor.quant_primitives import check_zero_point_domain, grouped

#: Smallest scale any search may return (the same floor as min/max's ``clamp(1e-6) / 15``).
MIN_SCALE = 1e-6 / 15

#: Rows of ``[N, K]`` handled at once, so a search over an 8192x8192 weight keeps its
#: temporaries to a few hundred MB instead of several GB.
_CHUNK_ELEMENTS = 1 << 22


def codes(g: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Integer codes ``u`` in [0, 15] (as float32), same shape as ``g``."""
    return g.sub(minimum.unsqueeze(-1)).div(scale.unsqueeze(-1)).round().clamp(0, 15)


def group_sq_error(g: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``sum_j (g_j - (u_j * scale + minimum))^2`` per group, ``[..., N, K/G]``."""
    u = codes(g, scale, minimum)
    return (u * scale.unsqueeze(-1) + minimum.unsqueeze(-1) - g).square().sum(-1)


def keep_better(best: tuple, candidate: tuple) -> tuple:
    """Per group, keep the ``(scale, minimum, error)`` with the lower error."""
    take = candidate[2] < best[2]
    return tuple(torch.where(take, c, b) for c, b in zip(candidate, best))


def least_squares_qparams(
    target: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
    zero_point_domain: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(scale, minimum)`` that minimise ``||target - (u * scale + minimum)||^2`` per group
    for fixed codes ``u``, within the domain:

    * ``"float"``: ordinary linear regression of ``target`` on ``u`` (two unknowns);
    * ``"int"``: ``minimum = -z * scale`` with the integer ``z = clamp(round(-minimum / scale),
      0, 15)`` taken from the current parameters, then ``scale = <t, u - z> / <u - z, u - z>``;
    * ``"none"``: ``z = 8``, the same one-unknown fit.

    Groups where the fit is degenerate (all codes equal, or a non-positive scale) keep the
    given ``scale``/``minimum``.
    """
    if zero_point_domain == "float":
        n = target.shape[-1]
        su, st = u.sum(-1), target.sum(-1)
        det = n * u.square().sum(-1) - su * su
        new_scale = (n * (u * target).sum(-1) - su * st) / det.clamp(min=1e-12)
        new_min = (st - new_scale * su) / n
        ok = (det > 0.5) & (new_scale > MIN_SCALE)  # det is an integer sum: > 0 means >1 code
        return torch.where(ok, new_scale, scale), torch.where(ok, new_min, minimum)
    if zero_point_domain == "int":
        zero = (-minimum / scale).round().clamp(0, 15)
    elif zero_point_domain == "none":
        zero = torch.full_like(scale, 8.0)
    else:
        check_zero_point_domain(zero_point_domain)
    c = u - zero.unsqueeze(-1)
    denom = c.square().sum(-1)
    new_scale = (c * target).sum(-1) / denom.clamp(min=1e-12)
    ok = (denom > 0.5) & (new_scale > MIN_SCALE)
    new_scale = torch.where(ok, new_scale, scale)
    return new_scale, -zero * new_scale


def refine(g: torch.Tensor, best: tuple, zero_point_domain: str, iters: int) -> tuple:
    """Alternate "re-round the codes" and :func:`least_squares_qparams` ``iters`` times, keeping
    per group whichever parameters had the lowest error (so it never gets worse)."""
    scale, minimum = best[0], best[1]
    for _ in range(iters):
        scale, minimum = least_squares_qparams(g, codes(g, scale, minimum), scale, minimum,
                                               zero_point_domain)
        best = keep_better(best, (scale, minimum, group_sq_error(g, scale, minimum)))
    return best


def by_row_chunks(
    search: Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]],
    w: torch.Tensor, group_size: int, zero_point_domain: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``search(g [rows, K/G, G] float32, domain) -> (scale, minimum) [rows, K/G]`` over
    ``w [..., N, K]`` a block of rows at a time; returns float32 ``[..., N, K/G]``."""
    check_zero_point_domain(zero_point_domain)
    if w.shape[-1] % group_size:
        raise ValueError(f"K = {w.shape[-1]} is not a multiple of the group size {group_size}")
    lead = w.shape[:-1]
    flat = w.reshape(-1, w.shape[-1])
    rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[-1]))
    if w.device.type == "meta" or flat.shape[0] == 0:
        empty = torch.empty(*lead, w.shape[-1] // group_size, device=w.device)
        return empty, empty.clone()
    outs = [search(grouped(flat[i:i + rows].to(torch.float32), group_size), zero_point_domain)
            for i in range(0, flat.shape[0], rows)]
    scale = torch.cat([o[0] for o in outs]).reshape(*lead, -1)
    minimum = torch.cat([o[1] for o in outs]).reshape(*lead, -1)
    return scale, minimum
