"""GPTQ: quantize a Linear's columns one at a time, pushing each column's rounding error onto
the not-yet-quantized columns through the inverse Hessian of the layer's calibration loss.

For a layer ``y = x @ W.T`` and calibration inputs ``X [n, K]``, the loss
``||X W.T - X Q.T||^2`` has Hessian ``H = 2 X.T X / n`` (``[K, K]``). With the upper Cholesky
factor ``U`` of ``H^-1`` (Frantar et al., 2022), column ``k`` is quantized to ``q_k``, and
``W[:, k+1:] -= ((w_k - q_k) / U[k, k]) * U[k, k+1:]``. Columns are handled in blocks with a
lazy batched update of the rest of the matrix.

Group parameters: without act-order, a group's ``(scale, minimum)`` is chosen (by the config's
qparams algorithm: minmax/mse/hqq, in its zero-point domain) when its first column is reached,
from the already error-compensated weights. With ``act_order=True`` columns go in decreasing
``diag(H)`` order and the group parameters are chosen up front from the original weights
("static groups"), so groups stay contiguous along K and the layout is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from int4tensor.calibration.capture import check_calibration_batches, check_config, \
    feed_layer_inputs, progress, snap_qparams, target_linears
from int4tensor.model_surgery import replace_parameter
from int4tensor.qparams import choose_qparams
from int4tensor.quant_primitives import quantize_with_qparams
from int4tensor.tensors import Int4Tensor

__all__ = ["gptq_quantize_", "gptq_quantize_weight"]


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32 ``[K, K]``)."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp(min=1e-8))
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, algorithm: str = "minmax",
    zero_point_domain: str = "float", act_order: bool = False, damp: float = 0.01,
    qparams_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ one weight.

    Args:
        weight: ``[N, K]`` floating.
        hessian: float32 ``[K, K]``, ``X.T X`` (any positive multiple) of the layer's inputs.
        group_size: ``G``; ``K % G == 0``.
        algorithm, zero_point_domain: how each group's ``(scale, minimum)`` is chosen.
        act_order: process columns by decreasing ``diag(H)`` (static groups, see module doc).
        damp: ridge added to ``H`` as a fraction of its mean diagonal.
        qparams_dtype: dtype the scale/zero point will be stored in (default ``weight.dtype``).

    Returns:
        ``(w_q, scale, minimum)``: float32 ``w_q [N, K]`` on the int4 grid
        (``w_q = u * scale + minimum`` per group) and float32 ``[N, K/G]`` parameters, ready
        for :func:`int4tensor.quant_primitives.quantize_with_qparams`.
    """
    qparams_dtype = qparams_dtype or weight.dtype
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    num_groups = k // group_size
    scale = torch.empty(n, num_groups, device=w.device)
    minimum = torch.empty_like(scale)
    perm = torch.arange(k, device=w.device)
    if act_order:
        scale, minimum = snap_qparams(*choose_qparams(w, group_size, algorithm, zero_point_domain),
                                      qparams_dtype)
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    u_factor = _inverse_hessian_factor(h, damp)
    group_of = (perm // group_size).tolist()
    w_q = torch.zeros_like(w)
    block = group_size * max(1, 128 // group_size)  # blocks hold whole groups
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1, err1 = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, device=w.device)
        u1 = u_factor[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = group_of[col]
            if not act_order and col % group_size == 0:
                s, m = choose_qparams(w1[:, i:i + group_size], group_size, algorithm,
                                      zero_point_domain)
                scale[:, g:g + 1], minimum[:, g:g + 1] = snap_qparams(s, m, qparams_dtype)
            s, m = scale[:, g], minimum[:, g]
            q = ((w1[:, i] - m) / s).round().clamp(0, 15) * s + m
            w_q[:, col] = q
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, b1:] -= err1 @ u_factor[b0:b1, b1:]
    if act_order:
        w_q = w_q[:, torch.argsort(perm)]
    return w_q, scale, minimum


def gptq_quantize_(
    model: nn.Module, calibration_batches, config, *, act_order: bool = False,
    damp: float = 0.01, filter_fn=None, progress_bar: bool = True,
) -> nn.Module:
    """Quantize ``model``'s Linears in place with GPTQ; weights become :class:`Int4Tensor`.

    Args:
        model: any module; each calibration batch is fed as ``model(batch)`` (or ``*batch`` /
            ``**batch`` for tuples / dicts).
        calibration_batches: a non-empty iterable of batches (a few hundred thousand tokens is
            plenty; a few thousand already help).
        config: :class:`~int4tensor.Int4WeightOnlyConfig` (group size, qparams algorithm used for
            each group, zero-point domain).
        act_order: quantize columns by decreasing activation energy (static groups).
        damp: Hessian dampening, fraction of the mean diagonal.
        filter_fn: ``(module, fqn) -> bool`` as in ``quantize_`` (default: every nn.Linear).
        progress_bar: show a tqdm bar over the layers.

    Memory: one ``[K, K]`` float32 Hessian at a time. Returns ``model``.
    """
    check_config(config)
    batches = check_calibration_batches(calibration_batches)
    layers = target_linears(model, config, filter_fn, "GPTQ")
    G = config.group_size
    for fqn, layer in progress(layers, "GPTQ", progress_bar):
        weight = layer.weight
        k = weight.shape[-1]
        hessian = torch.zeros(k, k, device=weight.device, dtype=torch.float32)
        rows = [0]

        def accumulate(x, hessian=hessian, rows=rows):
            x = x.to(torch.float32)
            hessian.addmm_(x.T, x)
            rows[0] += x.shape[0]

        feed_layer_inputs(model, layer, batches, accumulate)
        if rows[0] == 0:
            raise ValueError(f"GPTQ: layer {fqn} saw no calibration input (is it used in "
                             "the forward pass?)")
        w_q, scale, minimum = gptq_quantize_weight(
            weight, hessian / rows[0], G, algorithm=config.int4_choose_qparams_algorithm,
            zero_point_domain=config.zero_point_domain, act_order=act_order, damp=damp)
        qdata, s, zp = quantize_with_qparams(w_q, scale, minimum, G, weight.dtype)
        with torch.no_grad():
            replace_parameter(layer, "weight",
                              Int4Tensor(qdata, s, zp, (1, G), weight.shape))
    return model
