"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``quant_method: "gptq"``), import only.

Per module ``prefix``:

==================  =======  =======================  ========================================
tensor              dtype    shape                    content
==================  =======  =======================  ========================================
``prefix.qweight``  int32    ``[K/8, N]``             ``u``, packed along **K**, linear order
``prefix.qzeros``   int32    ``[ceil(K/G), N/8]``     zero points, packed along N, linear
``prefix.scales``   fp16     ``[ceil(K/G), N]``
``prefix.g_idx``    int32    ``[K]``                  group of each input channel
==================  =======  =======================  ========================================

``checkpoint_format: "gptq"`` (v1) stores ``z - 1`` (kernels add 1 back), ``"gptq_v2"`` stores
``z``; dequantization is ``w = (u - z) * s``. Symmetric v1 zeros read ``0x77777777``, v2
``0x88888888``, which lets us catch v2 zeros in a file labelled v1 (and the reverse).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from int4tensor.formats.common import check_g_idx, from_integer_qparams, unpack_nibbles
from int4tensor.tensors import Int4Tensor

__all__ = ["GPTQConfig", "parse_config", "import_weight", "MARKER", "SUFFIXES"]

MARKER = "qweight"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int  # -1: one group per row
    checkpoint_format: str = "gptq"  # or "gptq_v2"
    sym: bool | None = None


def parse_config(qcfg: dict) -> GPTQConfig:
    if qcfg.get("quant_method") != "gptq":
        raise ValueError(f"not a GPTQ config (quant_method={qcfg.get('quant_method')!r})")
    if qcfg.get("bits", 4) != 4:
        raise ValueError(f"GPTQ checkpoint has {qcfg.get('bits')}-bit weights; int4tensor "
                         "reads 4-bit")
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r}: int4tensor reads 'gptq' (v1) and "
                         "'gptq_v2' (marlin/bitblas layouts pack differently)")
    group_size = qcfg.get("group_size", 128)
    if not isinstance(group_size, int) or not (group_size > 0 or group_size == -1):
        raise ValueError(f"GPTQ config group_size {group_size!r} is not valid")
    return GPTQConfig(group_size, fmt, qcfg.get("sym"))


def _zero_points(raw: torch.Tensor, fmt: str, name: str) -> torch.Tensor:
    """Stored nibbles -> ``z`` in [0, 15], fixing a v1/v2 label that the data contradicts."""
    if fmt == "gptq" and bool((raw == 8).all()):
        warnings.warn(f"{name}: labelled GPTQ v1 but every stored zero is 8 (the v2 symmetric "
                      "value); reading the zeros as v2", stacklevel=3)
        fmt = "gptq_v2"
    elif fmt == "gptq_v2" and bool((raw == 7).all()):
        warnings.warn(f"{name}: labelled gptq_v2 but every stored zero is 7 (the v1 symmetric "
                      "value z - 1); reading the zeros as v1", stacklevel=3)
        fmt = "gptq"
    if fmt == "gptq_v2":
        return raw.to(torch.int64)
    if bool((raw == 15).any()):
        raise ValueError(f"{name}.qzeros: a GPTQ v1 stored zero of 15 means z = 16, which 4 bits "
                         "cannot hold: either the file holds v2 zeros (set checkpoint_format="
                         "'gptq_v2') or it was packed without masking z - 1 for z = 0, which "
                         "also overwrote the higher zeros of that word (re-quantize)")
    return raw.to(torch.int64) + 1


def import_weight(
    parts: dict, config: GPTQConfig | None = None, name: str = "weight",
    dtype: torch.dtype = torch.float32,
) -> Int4Tensor:
    """``{"qweight", "qzeros", "scales", ["g_idx"]}`` of one module -> Int4Tensor ``[N, K]``."""
    config = config or GPTQConfig(-1)
    missing = [s for s in ("qweight", "qzeros", "scales") if s not in parts]
    if missing:
        raise ValueError(f"{name}: GPTQ module lacks {missing}")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}: GPTQ qweight/qzeros must be int32, got "
                         f"{qweight.dtype}/{qzeros.dtype}")
    *lead, k8, n = qweight.shape
    k = k8 * 8
    if list(scales.shape[:-2]) != lead or scales.shape[-1] != n or not scales.is_floating_point():
        raise ValueError(f"{name}.scales is {scales.dtype}{list(scales.shape)}, expected float "
                         f"[..., ceil(K/G), {n}] for qweight {list(qweight.shape)}")
    n_groups = scales.shape[-2]
    group_size = k if config.group_size == -1 else config.group_size
    if k % group_size:
        raise ValueError(f"{name}: K = {k} is not a multiple of group_size {group_size} "
                         "(ragged last group)")
    if k // group_size != n_groups:
        raise ValueError(f"{name}: K = {k} / group_size {group_size} = {k // group_size} groups, "
                         f"but scales has {n_groups}")
    if list(qzeros.shape) != [*lead, n_groups, -(-n // 8)]:
        raise ValueError(f"{name}.qzeros has shape {list(qzeros.shape)}, expected "
                         f"{[*lead, n_groups, -(-n // 8)]} (packed along N)")
    check_g_idx(parts.get("g_idx"), k, group_size, name)
    u = unpack_nibbles(qweight, k, dim=-2).transpose(-1, -2)  # [..., N, K]
    raw = unpack_nibbles(qzeros, n, dim=-1)  # [..., K/G, N]
    z = _zero_points(raw, config.checkpoint_format, name)
    return from_integer_qparams(u, scales, z, dtype)
