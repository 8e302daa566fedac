from int4tensor.tensors.base import Int4BaseTensor
from int4tensor.tensors.int4_cpu_tensor import Int4CPUTensor
from int4tensor.tensors.int4_preshuffled_tensor import Int4PreshuffledTensor
from int4tensor.tensors.int4_tensor import Int4Tensor

__all__ = ["Int4BaseTensor", "Int4CPUTensor", "Int4PreshuffledTensor", "Int4Tensor"]
