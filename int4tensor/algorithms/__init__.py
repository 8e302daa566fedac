"""Deprecated alias, kept for one release: ``int4tensor.algorithms`` was split into
:mod:`int4tensor.qparams` (data-free choice of scales and zero points) and
:mod:`int4tensor.calibration` (AWQ, GPTQ). Import from those; nothing inside int4tensor
imports this module.

The old submodule paths (``int4tensor.algorithms.awq``, ``.gptq``, ``.mse``, ``.hqq``) name
the new modules themselves, so ``from int4tensor.algorithms.awq import awq_search_scale`` and
``mock.patch`` on them keep working.
"""

import sys

from int4tensor import calibration, qparams
from int4tensor.calibration import awq, capture, gptq
from int4tensor.qparams import QPARAMS_ALGORITHMS, choose_qparams, common, hqq, mse
from int4tensor.qparams import choose_qparams_hqq, choose_qparams_mse

awq_quantize_ = calibration.awq_quantize_
gptq_quantize_ = calibration.gptq_quantize_

__all__ = ["QPARAMS_ALGORITHMS", "choose_qparams", "choose_qparams_mse", "choose_qparams_hqq",
           "awq_quantize_", "gptq_quantize_"]

for _old, _new in {"awq": awq, "gptq": gptq, "mse": mse, "hqq": hqq,
                   "_calibration": capture, "_common": common}.items():
    sys.modules[f"{__name__}.{_old}"] = _new
del _old, _new, qparams
