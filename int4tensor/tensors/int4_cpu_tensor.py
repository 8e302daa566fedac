"""``Int4CPUTensor``: int4 weights in torch's CPU int4 GEMM layout, for fast CPU inference.

Checkpoints stay in the plain :class:`~int4tensor.Int4Tensor` layout: after loading,
:func:`int4tensor.convert_to_packed_tensor_based_on_current_hardware` turns CPU weights into
this layout; :meth:`Int4CPUTensor.to_int4_tensor` goes back exactly, and saving (``torch.save``,
:func:`int4tensor.serialization.save_file`) and slicing along N or K go through the plain
layout. Kernels and their dispatch by M are in :mod:`int4tensor.kernels.cpu`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing

from int4tensor.kernels import cpu, dispatch
from int4tensor.quant_primitives import pack_int4
from int4tensor.tensors.base import Int4BaseTensor, linear_operands, op_args
from int4tensor.tensors.int4_tensor import (
    Int4Tensor, check_grouped, grouped_mm_impl, pre_scaled_rows, weight_first_activation)

aten = torch.ops.aten

__all__ = ["Int4CPUTensor"]


class Int4CPUTensor(Int4BaseTensor):
    """A weight ``W [..., N, K]`` packed for torch's CPU int4 GEMM (``Np`` = N rounded up to a
    multiple of the layout's block, 64 on AVX512 and 32 on AVX2 CPUs; rows past N are zero and
    sliced off outputs).

    Fields:
        qdata: uint8 ``[..., Np, K/2]``, ``u = q + 8`` in torch's CPU int4 layout of this
            machine (:func:`int4tensor.kernels.cpu.pack`; never saved: files hold the plain
            layout).
        scale_and_zero: ``[..., K/G, Np, 2]`` in the weight's dtype: ``[..., 0]`` the scale,
            ``[..., 1]`` the zero point of the plain layout.
        act_pre_scale: optional ``[..., K]``, as for Int4Tensor (multiplies the activation).
        block_size, shape: as for Int4Tensor (a transposed view has block ``(..., G, 1)``).

    ``W[..., n, k] = (u - 8) * scale[..., k // G, n] + zero[..., k // G, n]``, i.e. the plain
    layout's ``q * scale + zero_point`` (times ``act_pre_scale[..., k]`` when set). Activations
    are computed in their own dtype (fp32, bf16, fp16), as with Int4Tensor's ``"bf16"``
    activation_dtype.
    """

    tensor_data_names = ("qdata", "scale_and_zero")
    optional_tensor_data_names = ("act_pre_scale",)
    tensor_attribute_names = ("block_size", "shape")

    activation_dtype = "bf16"  # activations are not quantized (the dispatch tables' key)

    @staticmethod
    def __new__(cls, qdata, scale_and_zero, block_size, shape, act_pre_scale=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=scale_and_zero.dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale_and_zero, block_size, shape, act_pre_scale=None):
        self.qdata = qdata
        self.scale_and_zero = scale_and_zero
        self.act_pre_scale = act_pre_scale
        self.block_size = tuple(int(b) for b in block_size)

    def _copy_source(self, src: torch.Tensor) -> Int4BaseTensor:
        """A plain Int4Tensor (a checkpoint loaded into a converted model) converts exactly."""
        if isinstance(src, Int4Tensor):
            return Int4CPUTensor.from_int4_tensor(src)
        return super()._copy_source(src)

    def _check_to(self, device, dtype):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("Int4CPUTensor lives on the CPU (torch's CPU int4 layout); call "
                             ".to_int4_tensor() first for a portable Int4Tensor")

    # ---- conversion ----------------------------------------------------------------------
    @classmethod
    def why_not(cls, t: Int4Tensor) -> str | None:
        """None when ``t`` converts to this layout, else why not."""
        if t.device.type != "cpu":
            return f"the weight is on {t.device.type}, not the CPU"
        if t.activation_dtype != "bf16":
            return (f"{t.activation_dtype} activations (the CPU layout computes activations in "
                    "their own dtype)")
        return cpu.why_not_available()

    @classmethod
    def from_int4_tensor(cls, t: Int4Tensor) -> "Int4CPUTensor":
        """Repack a CPU Int4Tensor (exact: :meth:`to_int4_tensor` gives it back)."""
        problem = cls.why_not(t)
        if problem:
            raise ValueError(f"cannot convert Int4Tensor {list(t.shape)} to Int4CPUTensor: "
                             f"{problem}")
        if t.is_transposed:
            return cls.from_int4_tensor(t.mT).mT
        qdata, scale_and_zero = cpu.pack(t.qdata, t.scale, t.zero_point)
        return cls(qdata, scale_and_zero, t.block_size, t.shape, act_pre_scale=t.act_pre_scale)

    def to_int4_tensor(self) -> Int4Tensor:
        """The same weight in the plain layout, exactly."""
        if self.is_transposed:
            return self.mT.to_int4_tensor().mT
        n = self.stored_n
        q = cpu.unpack(self.qdata)[..., :n, :]
        scale = self.scale_and_zero[..., :n, 0].contiguous()
        zero = self.scale_and_zero[..., :n, 1].contiguous()
        return Int4Tensor(pack_int4(q.contiguous()), scale, zero, self.block_size, self.shape,
                          act_pre_scale=self.act_pre_scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor this one stands for, in its logical shape, in ``dtype``."""
        dtype = dtype or self.dtype
        w_t = cpu.dequantize_t(self.qdata, self.scale_and_zero, self.group_size,
                               torch.float32 if self.act_pre_scale is not None else dtype)
        w_t = w_t[..., : self.stored_n]
        if self.act_pre_scale is not None:
            w_t = (w_t * self.act_pre_scale.float().unsqueeze(-1)).to(dtype)
        return w_t if self.is_transposed else w_t.transpose(-1, -2)

    def __reduce_ex__(self, protocol):
        # Files hold the plain layout (the checkpoint format); torch.load gives an Int4Tensor.
        return self.to_int4_tensor().__reduce_ex__(protocol)

    def _quantize_like(self, dense: torch.Tensor) -> "Int4CPUTensor":
        return Int4CPUTensor.from_int4_tensor(self.to_int4_tensor()._quantize_like(dense))


implements = Int4CPUTensor.implements


def _replace(t: Int4CPUTensor, block_size, shape, **tensors) -> Int4CPUTensor:
    return Int4CPUTensor._build({**t._tensors(), **tensors}, [tuple(block_size), tuple(shape)])


def _transposed(t: Int4CPUTensor) -> Int4CPUTensor:
    bs, shape = t.block_size, tuple(t.shape)
    return _replace(t, (*bs[:-2], bs[-1], bs[-2]), (*shape[:-2], shape[-1], shape[-2]))


# ---- compute ops ----------------------------------------------------------------------------
def _check_activation(x: torch.Tensor, op: str) -> None:
    if x.dtype not in cpu.ACTIVATION_DTYPES:
        raise TypeError(f"{op} with an Int4CPUTensor takes fp32/bf16/fp16 activations, got "
                        f"{x.dtype}")


def _linear(x: torch.Tensor, w: Int4CPUTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [*, K] @ W.T + bias -> [*, N]`` for a stored 2D weight."""
    return cpu.cpu_linear(x, w, bias)


def _bmm(x: torch.Tensor, w: Int4CPUTensor) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` for a stored 3D weight."""
    return cpu.cpu_bmm(x, w)


@implements([F.linear, aten.linear.default])
def _(func, args, kwargs):
    """``F.linear(x [*, K], W [N, K], bias [N] | None) -> [*, N]``."""
    x, w, bias = linear_operands(Int4CPUTensor, args, kwargs)
    planned = dispatch.cached_plan("linear", x, w)
    if planned is not None:  # a repeated eager call: operands checked, kernel chosen
        return planned(x, bias)
    shape = w._logical_shape()
    if len(shape) != 2:
        raise ValueError(f"linear needs a 2D weight, got Int4CPUTensor of shape "
                         f"{list(shape)} (use torch.bmm for 3D expert weights)")
    _check_activation(x, "linear")
    if x.ndim == 0 or x.shape[-1] != shape[-1]:
        raise ValueError(f"linear input's last dim must be K = {w.shape[-1]}, got input shape "
                         f"{list(x.shape)} for weight shape {list(w.shape)}")
    if w.is_transposed:  # contracts over the stored N: no int4 kernel for that
        return F.linear(x, w.dequantize(x.dtype), bias)
    return _linear(x, w, bias)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return t._logical_shape() if isinstance(t, Int4BaseTensor) else tuple(t.shape)


def _matmul(a: torch.Tensor, b: torch.Tensor, op: str) -> torch.Tensor:
    """Dense-semantics ``a @ b``: the kernels compute ``x @ b`` for a transposed weight ``b``
    (logical ``[.., K, N]``); any other product goes through the dense value."""
    sa, sb = _shape(a), _shape(b)
    if not sa or not sb or sa[-1] != sb[-2 if len(sb) > 1 else -1]:
        raise ValueError(f"{op}: shapes {list(sa)} and {list(sb)} cannot be multiplied")
    dense_a = not isinstance(a, Int4BaseTensor)
    if dense_a and isinstance(b, Int4CPUTensor) and b.is_transposed:
        _check_activation(a, op)
        stored = b._stored_weight(_transposed) if cpu.is_eager(a) else _transposed(b)
        if len(sb) == 2:
            return _linear(a, stored, None)
        if len(sa) == 3 and sa[0] == sb[0]:
            return _bmm(a, stored)
    if isinstance(a, Int4CPUTensor) and not a.is_transposed \
            and not isinstance(b, Int4BaseTensor) and len(sa) == len(sb) \
            and (len(sa) == 2 or (len(sa) == 3 and sa[0] == sb[0])):
        # W @ y with the stored weight first (batched_mm experts): (y^T @ W^T)^T on the kernels
        _check_activation(b, op)
        x = weight_first_activation(b)
        return (_linear(x, a, None) if len(sa) == 2 else _bmm(x, a)).transpose(-2, -1)
    dtype = a.dtype if dense_a else (b.dtype if not isinstance(b, Int4BaseTensor) else a.dtype)
    dense = [t.dequantize(dtype) if isinstance(t, Int4BaseTensor) else t for t in (a, b)]
    return torch.matmul(*dense)


@implements([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
def _(func, args, kwargs):
    return _matmul(args[0], args[1], "matmul")


@implements([aten.mm.default, aten.bmm.default])
def _(func, args, kwargs):
    a, b = args
    want = 2 if func is aten.mm.default else 3
    sa, sb = _shape(a), _shape(b)
    if len(sa) != want or len(sb) != want:
        raise ValueError(f"{func}: expects {want}D operands, got {list(sa)} and {list(sb)}")
    if want == 3 and sa[0] != sb[0]:
        raise ValueError(f"bmm: batch sizes differ, {list(sa)} and {list(sb)}")
    return _matmul(a, b, str(func.overloadpacket.__name__))


@implements([aten._grouped_mm.default])
def _(func, args, kwargs):
    """``_grouped_mm(x [T, K], w.transpose(-2, -1), offs)`` (transformers' ``grouped_mm``
    experts) on a stored ``[E, N, K]`` stack: eagerly, torch's CPU int4 GEMM per active expert
    (:func:`cpu.grouped_mm_experts`); anything else (compiled, bias, other operands) the base
    class's dense path on the dequantized stack."""
    a, b, offs, bias, out_dtype = op_args(args, kwargs, ("mat_a", None), ("mat_b", None),
                                          ("offs", None), ("bias", None), ("out_dtype", None))
    if (isinstance(b, Int4CPUTensor) and not isinstance(a, Int4BaseTensor) and b.is_transposed
            and a.ndim == 2 and len(_shape(b)) == 3 and offs is not None and bias is None
            and out_dtype in (None, a.dtype) and cpu.is_eager(a)):
        _check_activation(a, "grouped_mm")
        check_grouped(a, _shape(b), offs)
        stored = b._stored_weight(_transposed)
        return cpu.grouped_mm_experts(pre_scaled_rows(a, stored.act_pre_scale, offs), stored,
                                      offs)
    return grouped_mm_impl(func, args, kwargs)


@implements([aten.addmm.default])
def _(func, args, kwargs):
    bias, a, b = args
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    out = _matmul(a, b, "addmm")
    return (out if alpha == 1 else alpha * out) + (bias if beta == 1 else beta * bias)


# ---- data movement --------------------------------------------------------------------------
@implements([aten.t.default, aten.transpose.int])
def _(func, args, kwargs):
    t = args[0]
    dims = {d % t.ndim for d in args[1:3]} if func is aten.transpose.int else {0, 1}
    if len(dims) == 1:
        return return_and_correct_aliasing(func, args, kwargs, _replace(t, t.block_size, t.shape))
    if dims != {t.ndim - 2, t.ndim - 1}:
        raise NotImplementedError("Int4CPUTensor supports transposing only its last two dims")
    out = _transposed(t)
    if not t.is_transposed:  # a view of the stored weight: eager calls use t's plans
        out._as_transposed_view_of(t)
    return return_and_correct_aliasing(func, args, kwargs, out)


@implements([aten.select.int, aten.index.Tensor])
def _(func, args, kwargs):
    """Expert selection ``w[e]`` / ``w[idx]`` of a 3D weight (dim 0): every field has the
    expert dim first."""
    t = args[0]
    if t.ndim != 3 or (func is aten.select.int and args[1] % 3 != 0) or \
            (func is aten.index.Tensor and (len(args[1]) != 1 or args[1][0] is None)):
        raise NotImplementedError("Int4CPUTensor supports indexing only the expert dim of a 3D "
                                  "weight")
    if func is aten.select.int:
        fields = {name: x.select(0, args[2]) for name, x in t._tensors().items()}
        return _replace(t, t.block_size[1:], t.shape[1:], **fields)
    fields = {name: x[args[1][0]] for name, x in t._tensors().items()}
    return _replace(t, t.block_size, (fields["qdata"].shape[0], *t.shape[1:]), **fields)


@implements([aten.slice.Tensor])
def _(func, args, kwargs):
    """Expert ranges slice the fields (views); N and K slices go through the plain layout (a
    copy in this layout, exact)."""
    t = args[0]
    dim, start, end, step = op_args(args[1:], kwargs, ("dim", 0), ("start", None),
                                    ("end", None), ("step", 1))
    dim %= t.ndim
    if t.ndim == 3 and dim == 0:
        fields = {name: x[start:end:step] for name, x in t._tensors().items()}
        return _replace(t, t.block_size, (fields["qdata"].shape[0], *t.shape[1:]), **fields)
    plain = aten.slice.Tensor(t.to_int4_tensor(), dim, start, end, step)
    return Int4CPUTensor.from_int4_tensor(plain)


@implements([aten.equal.default])
def _(func, args, kwargs):
    a, b = args
    if not isinstance(a, Int4CPUTensor) or not isinstance(b, Int4CPUTensor) or a._mismatch(b):
        return False
    return all(torch.equal(x, getattr(b, n)) for n, x in a._tensors().items())


