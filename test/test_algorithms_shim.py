"""``int4tensor.algorithms`` (split into ``qparams`` and ``calibration``) still serves the
names and submodule paths of 0.1 for one release, as the new objects themselves."""

import int4tensor
from int4tensor import calibration, qparams


def test_old_names_are_the_new_objects():
    from int4tensor import algorithms

    assert algorithms.awq_quantize_ is calibration.awq_quantize_ is int4tensor.awq_quantize_
    assert algorithms.gptq_quantize_ is calibration.gptq_quantize_ is int4tensor.gptq_quantize_
    assert algorithms.choose_qparams is qparams.choose_qparams
    assert algorithms.QPARAMS_ALGORITHMS is qparams.QPARAMS_ALGORITHMS
    assert algorithms.choose_qparams_mse is qparams.choose_qparams_mse
    assert algorithms.choose_qparams_hqq is qparams.choose_qparams_hqq


def test_old_submodule_paths_are_the_new_modules():
    from int4tensor.algorithms.awq import awq_search_scale
    from int4tensor.algorithms.gptq import gptq_quantize_weight
    from int4tensor.algorithms.hqq import choose_qparams_hqq
    from int4tensor.algorithms.mse import choose_qparams_mse

    assert awq_search_scale is calibration.awq.awq_search_scale
    assert gptq_quantize_weight is calibration.gptq.gptq_quantize_weight
    assert choose_qparams_hqq is qparams.hqq.choose_qparams_hqq
    assert choose_qparams_mse is qparams.mse.choose_qparams_mse
