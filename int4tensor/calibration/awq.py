"""AWQ-style activation-aware scaling: per input channel ``k``, multiply the weight column by
``s_k`` before quantizing and divide the activation by it, so channels that carry large
activations get finer effective quantization.

For a layer ``y = x @ W.T`` with calibration inputs ``X [n, K]`` (Lin et al., 2023):

* ``a_k = mean_n |X[n, k]|``; candidates ``s = a^alpha``, normalised so ``max(s) * min(s) = 1``,
  for ``alpha`` on a grid in [0, 1] (``alpha = 0`` is plain quantization, so the search can only
  help on the calibration data);
* each candidate is scored by the layer's output error
  ``||X W.T - (X / s) Q(W * s).T||^2`` on (a subsample of) the calibration rows;
* the best ``s`` is kept: the int4 part is ``Q(W * diag(s))`` and ``act_pre_scale = 1 / s``
  (``linear`` computes ``(x * act_pre_scale) @ Q.T``), so the result is one
  :class:`~int4tensor.Int4Tensor` that runs through every kernel. A following ``quantize``
  of the same layer is not needed; a preceding norm is left untouched.

``Q`` uses the config's qparams algorithm and zero-point domain (``"mse"`` adds AWQ's clipping
search on top of the scaling).
"""

from __future__ import annotations

import torch
from torch import nn

from int4tensor.calibration.capture import check_calibration_batches, check_config, \
    feed_layer_inputs, progress, snap_qparams, target_linears
from int4tensor.model_surgery import replace_parameter
from int4tensor.qparams import choose_qparams
from int4tensor.tensors import Int4Tensor
from int4tensor.quant_primitives import grouped, quantize_int4, quantize_with_qparams

__all__ = ["awq_quantize_", "awq_search_scale"]

#: Grid of exponents tried for ``s = mean|x| ** alpha``.
ALPHAS = tuple(i / 20 for i in range(21))


def _fake_quant(w: torch.Tensor, group_size: int, algorithm: str, domain: str,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_q, scale, minimum)``: ``w [N, K]`` float32 rounded onto its int4 grid, with the
    qparams as they will be stored in ``dtype``."""
    scale, minimum = snap_qparams(*choose_qparams(w, group_size, algorithm, domain), dtype)
    u = quantize_int4(w, scale, minimum, group_size).float() + 8
    w_q = (grouped(u, group_size) * scale.unsqueeze(-1) + minimum.unsqueeze(-1)).flatten(-2)
    return w_q, scale, minimum


@torch.no_grad()
def awq_search_scale(
    weight: torch.Tensor, x: torch.Tensor, act_mean: torch.Tensor, group_size: int, *,
    algorithm: str = "minmax", zero_point_domain: str = "float", alphas=ALPHAS,
) -> tuple[torch.Tensor, float]:
    """Best per-channel scale for one layer.

    Args:
        weight: ``[N, K]``.
        x: ``[n, K]`` calibration inputs used to score candidates.
        act_mean: float32 ``[K]``, ``mean |x|`` over all calibration rows.

    Returns:
        ``(act_pre_scale, alpha)``: ``act_pre_scale = 1 / s`` in ``weight.dtype`` ``[K]`` and
        the chosen exponent.
    """
    w = weight.detach().to(torch.float32)
    x = x.to(torch.float32)
    ref = x @ w.T
    a = act_mean.to(torch.float32).clamp(min=1e-5)
    best = (float("inf"), None, 0.0)
    for alpha in alphas:
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        inv = (1 / s).to(weight.dtype)  # the stored act_pre_scale ...
        s = 1 / inv.float()  # ... and the exact scale it implies
        w_q, _, _ = _fake_quant(w * s, group_size, algorithm, zero_point_domain, weight.dtype)
        err = (ref - (x * inv.float()) @ w_q.T).square().sum().item()
        if err < best[0]:
            best = (err, inv, alpha)
    return best[1], best[2]


def awq_quantize_(
    model: nn.Module, calibration_batches, config, *, max_rows: int = 4096, filter_fn=None,
    progress_bar: bool = True,
) -> nn.Module:
    """Quantize ``model``'s Linears in place with AWQ-style scaling; each weight becomes an
    :class:`~int4tensor.Int4Tensor` with ``act_pre_scale`` set.

    Args:
        model: any module; batches are fed as ``model(batch)`` (``*batch``/``**batch`` for
            tuples/dicts).
        calibration_batches: a non-empty iterable of batches.
        config: :class:`~int4tensor.Int4WeightOnlyConfig` (group size, qparams algorithm,
            zero-point domain).
        max_rows: calibration rows kept per layer to score candidate scales (spread over all
            batches); ``mean |x|`` uses every row.
        filter_fn: ``(module, fqn) -> bool`` (default: every nn.Linear).
        progress_bar: show a tqdm bar over the layers.

    Memory: ``max_rows x K`` activations of one layer at a time. Returns ``model``.
    """
    check_config(config)
    batches = check_calibration_batches(calibration_batches)
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    layers = target_linears(model, config, filter_fn, "AWQ")
    G, algo, domain = config.group_size, config.int4_choose_qparams_algorithm, \
        config.zero_point_domain
    per_batch = max(1, max_rows // len(batches))
    for fqn, layer in progress(layers, "AWQ", progress_bar):
        weight = layer.weight
        abs_sum = torch.zeros(weight.shape[-1], dtype=torch.float64, device=weight.device)
        kept, count = [], [0]

        def collect(x, abs_sum=abs_sum, kept=kept, count=count):
            abs_sum.add_(x.abs().sum(0, dtype=torch.float64))
            count[0] += x.shape[0]
            step = max(1, x.shape[0] // per_batch)  # evenly spaced rows of this batch
            kept.append(x[::step][:per_batch].to(torch.float32))

        feed_layer_inputs(model, layer, batches, collect)
        if count[0] == 0:
            raise ValueError(f"AWQ: layer {fqn} saw no calibration input (is it used in the "
                             "forward pass?)")
        inv, _ = awq_search_scale(weight, torch.cat(kept), (abs_sum / count[0]).float(), G,
                                  algorithm=algo, zero_point_domain=domain)
        kept.clear()
        w_scaled = weight.detach().to(torch.float32) / inv.float()
        w_q, scale, minimum = _fake_quant(w_scaled, G, algo, domain, weight.dtype)
        qdata, s, zp = quantize_with_qparams(w_q, scale, minimum, G, weight.dtype)
        with torch.no_grad():
            replace_parameter(layer, "weight", Int4Tensor(qdata, s, zp, (1, G), weight.shape,
                                                          act_pre_scale=inv))
    return model
