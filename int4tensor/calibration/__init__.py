"""Calibration with activations: quantize a model's Linears using inputs fed through it.

* :func:`awq_quantize_`: AWQ-style per-input-channel scaling (:mod:`.awq`);
* :func:`gptq_quantize_`: Hessian-based error compensation (:mod:`.gptq`);
* :mod:`.capture`: the shared plumbing (layer selection, capturing one layer's inputs).

A workflow above configs and ``quantize_`` (layer 4, see CONTRIBUTING.md). The data-free
choice of scales and zero points they build on is :mod:`int4tensor.qparams`.
"""

from int4tensor.calibration.awq import awq_quantize_
from int4tensor.calibration.gptq import gptq_quantize_

__all__ = ["awq_quantize_", "gptq_quantize_"]
