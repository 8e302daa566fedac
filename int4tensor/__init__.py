"""int4tensor: int4 weight-only quantization for PyTorch, as tensor subclasses.

>>> from int4tensor import quantize_, Int4WeightOnlyConfig
>>> quantize_(model, Int4WeightOnlyConfig(group_size=128))  # doctest: +SKIP
"""

import torch

from int4tensor.config import Int4WeightOnlyConfig
from int4tensor.quantize import quantize_
from int4tensor.tensors import Int4Tensor

__version__ = "0.1.0"

__all__ = ["Int4Tensor", "Int4WeightOnlyConfig", "quantize_"]

# Lets torch.load(..., weights_only=True) rebuild our tensors.
torch.serialization.add_safe_globals([Int4Tensor])
