"""AutoAWQ GEMM checkpoints (``quant_method: "awq"``, ``version: "gemm"``), import only.

Per module ``prefix``:

==================  =======  ==================  =============================================
tensor              dtype    shape               content
==================  =======  ==================  =============================================
``prefix.qweight``  int32    ``[K, N/8]``        ``u``, packed along **N** in AWQ order
``prefix.qzeros``   int32    ``[K/G, N/8]``      ``z``, packed along N in AWQ order
``prefix.scales``   fp16     ``[K/G, N]``
==================  =======  ==================  =============================================

AWQ order: the nibble at shift ``4 * i`` holds element ``8m + AWQ_ORDER[i]``
(``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``). Dequantization is ``w = (u - z) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from int4tensor.formats.common import AWQ_ORDER, from_integer_qparams, unpack_nibbles
from int4tensor.tensors import Int4Tensor

__all__ = ["AWQConfig", "parse_config", "import_weight", "MARKER", "SUFFIXES"]

MARKER = "qweight"
SUFFIXES = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class AWQConfig:
    group_size: int


def parse_config(qcfg: dict) -> AWQConfig:
    if qcfg.get("quant_method") != "awq":
        raise ValueError(f"not an AWQ config (quant_method={qcfg.get('quant_method')!r})")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r}: int4tensor reads 'gemm' checkpoints "
                         "(GEMV/Marlin/exllama variants pack differently)")
    bits = qcfg.get("bits", qcfg.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"AWQ checkpoint has {bits}-bit weights; int4tensor reads 4-bit")
    group_size = qcfg.get("group_size", qcfg.get("q_group_size"))
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"AWQ config group_size {group_size!r} is not a positive integer")
    return AWQConfig(group_size)


def import_weight(
    parts: dict, config: AWQConfig | None = None, name: str = "weight",
    dtype: torch.dtype = torch.float32,
) -> Int4Tensor:
    """``{"qweight", "qzeros", "scales"}`` of one module -> Int4Tensor ``[N, K]`` (exact with the
    default float32 ``dtype``; leading dims ``[E, ...]`` work the same way)."""
    missing = [s for s in SUFFIXES if s not in parts]
    if missing:
        raise ValueError(f"{name}: AWQ module lacks {missing}")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    *lead, k, n8 = qweight.shape
    n = n8 * 8
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}: AWQ qweight/qzeros must be int32, got "
                         f"{qweight.dtype}/{qzeros.dtype}")
    if list(scales.shape[:-2]) != lead or scales.shape[-1] != n or not scales.is_floating_point():
        raise ValueError(f"{name}.scales is {scales.dtype}{list(scales.shape)}, expected float "
                         f"[..., K/G, {n}] for qweight {list(qweight.shape)}")
    n_groups = scales.shape[-2]
    if list(qzeros.shape) != [*lead, n_groups, n8]:
        raise ValueError(f"{name}.qzeros has shape {list(qzeros.shape)}, expected "
                         f"{[*lead, n_groups, n8]} (packed along N like qweight)")
    if config is not None and (k % config.group_size or k // config.group_size != n_groups):
        raise ValueError(f"{name}: K = {k} with group_size {config.group_size} does not give "
                         f"the {n_groups} groups that scales has")
    u = unpack_nibbles(qweight, n, dim=-1, order=AWQ_ORDER).transpose(-1, -2)  # [..., N, K]
    z = unpack_nibbles(qzeros, n, dim=-1, order=AWQ_ORDER)  # [..., K/G, N]
    return from_integer_qparams(u, scales, z, dtype)
