"""The committed benchmark model loads, is trained, and quantizes through every path."""

import importlib.util
import pathlib
import sys

import pytest
import torch

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, quantize_
from int4tensor.calibration.gptq import gptq_quantize_

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bytelm():
    spec = importlib.util.spec_from_file_location(
        "tiny_bytelm", ROOT / "models" / "tiny_bytelm" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_model_is_trained_and_quantizes(bytelm):
    model = bytelm.load_model(torch.bfloat16)
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 4e6
    evalset = bytelm.windows(bytelm.stdlib_corpus("val"), 256, max_windows=8)
    ppl = bytelm.perplexity(model, evalset)
    assert ppl < 4.5  # a uniform byte model would be 256; the trained one is ~3.3
    calib = [bytelm.windows(bytelm.stdlib_corpus("train"), 256, max_windows=8)[:, :-1]]
    rtn = bytelm.load_model(torch.bfloat16)
    quantize_(rtn, Int4WeightOnlyConfig(group_size=128), bytelm.is_block_linear)
    gptq_quantize_(model, calib, Int4WeightOnlyConfig(group_size=128),
                   filter_fn=bytelm.is_block_linear, progress_bar=False)
    linears = [m for n, m in model.named_modules() if bytelm.is_block_linear(m, n)]
    assert len(linears) == 16 and all(isinstance(m.weight, Int4Tensor) for m in linears)
    assert not isinstance(model.lm_head.weight, Int4Tensor)
    ppl_rtn, ppl_gptq = bytelm.perplexity(rtn, evalset), bytelm.perplexity(model, evalset)
    # GPTQ can land on either side of the bf16 model (3.3071 vs 3.3072 seen): within 1% of it
    assert ppl_gptq < ppl * 1.01 and ppl_gptq < ppl_rtn * 1.002 and ppl_rtn < ppl * 1.05, \
        (ppl, ppl_rtn, ppl_gptq)
