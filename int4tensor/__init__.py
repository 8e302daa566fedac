"""int4tensor: int4 weight-only quantization for PyTorch, as tensor subclasses.

>>> from int4tensor import quantize_, Int4WeightOnlyConfig
>>> quantize_(model, Int4WeightOnlyConfig(group_size=128))  # doctest: +SKIP
"""

import torch

from int4tensor.calibration import awq_quantize_, gptq_quantize_
from int4tensor.compile_support import prepare_for_compile
from int4tensor.config import Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig
from int4tensor.convert import (
    convert_model_to_packed_tensors_,
    convert_to_packed_tensor_based_on_current_hardware,
)
from int4tensor.explain import explain
from int4tensor.quantize import quantize_
from int4tensor.serialization import load_file, save_file
from int4tensor.tensors import Int4CPUTensor, Int4PreshuffledTensor, Int4Tensor
from int4tensor.version import __version__

__all__ = [
    "Float8DynamicActivationInt4WeightConfig",
    "Int4CPUTensor",
    "Int4PreshuffledTensor",
    "Int4Tensor",
    "Int4WeightOnlyConfig",
    "awq_quantize_",
    "convert_model_to_packed_tensors_",
    "convert_to_packed_tensor_based_on_current_hardware",
    "explain",
    "gptq_quantize_",
    "load_file",
    "prepare_for_compile",
    "quantize_",
    "save_file",
]

# Lets torch.load(..., weights_only=True) rebuild our tensors: under their public path
# (int4tensor.Int4Tensor, what torch.save writes now) and under the module path that files
# saved by int4tensor 0.1.0 name.
torch.serialization.add_safe_globals([
    Int4Tensor,
    Int4PreshuffledTensor,
    (Int4Tensor, "int4tensor.tensors.int4_tensor.Int4Tensor"),
    (Int4PreshuffledTensor, "int4tensor.tensors.int4_preshuffled_tensor.Int4PreshuffledTensor"),
])

# transformers finds our quantizer for checkpoints of ours once both packages are imported
# (int4tensor.integrations.transformers registers it; transformers is not imported here).
from int4tensor.integrations import _autoload  # noqa: E402

_autoload.install()
