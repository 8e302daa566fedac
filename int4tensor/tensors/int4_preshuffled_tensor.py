"""``Int4PreshuffledTensor``: fbgemm's Hopper layout, for its fastest int4 kernels.

Checkpoints stay in the plain :class:`~int4tensor.Int4Tensor` layout; after loading,
:func:`int4tensor.convert_to_packed_tensor_based_on_current_hardware` turns weights into this
layout on a Hopper GPU with fbgemm-gpu-genai. It only exists on CUDA: the layout is fbgemm's
and only fbgemm's kernels read it, which is why this class calls fbgemm's layout transforms
(:mod:`int4tensor.kernels.fbgemm`: shuffle, unshuffle) directly rather than through the
dispatch table. :meth:`Int4PreshuffledTensor.to_int4_tensor` goes back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing

from int4tensor import kernels
from int4tensor.tensors.base import Int4BaseTensor, linear_operands, op_args
from int4tensor.quant_primitives import pack_int4
from int4tensor.tensors.int4_tensor import ACTIVATION_DTYPES, Int4Tensor, _block_problem, \
    _stored_shape, check_grouped, grouped_mm_impl

aten = torch.ops.aten

__all__ = ["Int4PreshuffledTensor"]



class Int4PreshuffledTensor(Int4BaseTensor):
    """A weight ``W [..., N, K]`` in fbgemm's preshuffled int4 layout.

    Fields (``Np`` = N rounded up to a multiple of 16, the kernels' alignment; rows past N are
    zero and sliced off outputs):
        qdata: int8 ``[..., Np, K/2]``, int4 values reordered by ``fbgemm.preshuffle_i4``.
        group_scale: bf16 activations: bf16 ``[..., K/G, Np]``; fp8 activations: float8_e4m3
            ``[..., K/G, 8, Np]`` (fbgemm's packed group scales).
        group_zero: bf16 activations only, bf16 ``[..., K/G, Np]``.
        row_scale: fp8 activations only, fp32 ``[..., Np]``.
        block_size, shape: as for Int4Tensor (a transposed view has block ``(..., G, 1)``).
        activation_dtype: ``"bf16"`` (``W = q * group_scale + group_zero``, asymmetric) or
            ``"fp8"`` (``W = e4m3(q * group_scale) * row_scale``, symmetric: the kernel looks
            the products up as fp8, which rounds them to 3 mantissa bits, about 2.5% from
            ``q * group_scale * row_scale``; activations are quantized to fp8 per row at run
            time).
    """

    tensor_data_names = ("qdata", "group_scale")
    optional_tensor_data_names = ("group_zero", "row_scale")
    tensor_attribute_names = ("block_size", "shape", "activation_dtype")

    @staticmethod
    def __new__(cls, qdata, group_scale, block_size, shape, activation_dtype,
                group_zero=None, row_scale=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=torch.bfloat16, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, group_scale, block_size, shape, activation_dtype,
                 group_zero=None, row_scale=None):
        self.qdata = qdata
        self.group_scale = group_scale
        self.group_zero = group_zero
        self.row_scale = row_scale
        self.block_size = tuple(int(b) for b in block_size) \
            if isinstance(block_size, (tuple, list, torch.Size)) else block_size
        self.activation_dtype = activation_dtype
        self._validate()

    __module__ = "int4tensor"  # the public path; the module path still loads old files

    def _layout_problem(self) -> str | None:
        """Shapes only (the values are fbgemm's): qdata int8 ``[..., Np, K/2]`` with ``Np`` N
        rounded up to the kernels' alignment, the scales of ``activation_dtype``'s layout."""
        if self.activation_dtype not in ACTIVATION_DTYPES:
            return (f"activation_dtype must be one of {ACTIVATION_DTYPES}, "
                    f"got {self.activation_dtype!r}")
        problem = _block_problem(self.block_size, tuple(self.shape))
        if problem is not None:
            return problem
        needed = ("qdata", "group_scale") + (
            ("group_zero",) if self.activation_dtype == "bf16" else ("row_scale",))
        for name in needed:
            if not isinstance(getattr(self, name), torch.Tensor):
                return (f"{name} is a {type(getattr(self, name)).__name__}, expected a tensor "
                        f"for {self.activation_dtype} activations")
        unexpected = "row_scale" if self.activation_dtype == "bf16" else "group_zero"
        if getattr(self, unexpected) is not None:
            return f"{unexpected} is set, but {self.activation_dtype} activations have none"
        *lead, n, k = _stored_shape(self)
        groups = k // self.group_size
        np_ = self.qdata.shape[-2] if self.qdata.ndim >= 2 else -1
        if self.qdata.dtype != torch.int8 or list(self.qdata.shape) != [*lead, np_, k // 2] \
                or not n <= np_ < n + kernels.fbgemm.N_ALIGN:
            return (f"qdata is {self.qdata.dtype}{list(self.qdata.shape)}, expected int8 "
                    f"[{', '.join(map(str, lead + ['N padded to 16', k // 2]))}] for shape "
                    f"{list(self.shape)}")
        if self.activation_dtype == "bf16":
            want = [*lead, groups, np_]
            for name in ("group_scale", "group_zero"):
                x = getattr(self, name)
                if x.dtype != torch.bfloat16 or list(x.shape) != want:
                    return f"{name} is {x.dtype}{list(x.shape)}, expected bfloat16{want}"
        else:
            gs, rs = self.group_scale, self.row_scale
            if gs.ndim != len(lead) + 3 or list(gs.shape[:len(lead)]) != lead or \
                    gs.shape[-3] != groups or gs.shape[-1] != np_:
                return (f"group_scale has shape {list(gs.shape)}, expected "
                        f"[..., {groups}, 8, {np_}] (fbgemm's packed fp8 group scales)")
            if rs.dtype != torch.float32 or list(rs.shape) != [*lead, np_]:
                return f"row_scale is {rs.dtype}{list(rs.shape)}, expected float32{[*lead, np_]}"
        for name, x in self._tensors().items():
            if x.device != self.qdata.device:
                return f"{name} is on {x.device}, qdata on {self.qdata.device}"
        return None

    def _require_fbgemm(self, what: str) -> None:
        """Reading this layout needs fbgemm's kernels on CUDA; say so instead of failing
        inside torch.ops (a file loaded with ``load_file(path)`` lands on the CPU)."""
        if torch.compiler.is_compiling():  # keep compiled graphs free of this host check
            return
        if not self.qdata.is_cuda or not kernels.fbgemm.is_available():  # (self.is_cuda
            # would go through __torch_function__ on every call)
            where = "fbgemm-gpu-genai is not installed" if self.is_cuda else \
                f"it is on {self.device.type}"
            raise NotImplementedError(
                f"{what} of an Int4PreshuffledTensor needs fbgemm-gpu-genai on a CUDA GPU "
                f"({where}): load it onto the GPU (load_file(path, device='cuda')), or save "
                "the portable Int4Tensor layout (to_int4_tensor()) where fbgemm runs")

    def _check_to(self, device, dtype):
        if device is not None and torch.device(device).type != "cuda":
            raise ValueError("Int4PreshuffledTensor lives on CUDA (only fbgemm reads its layout);"
                             " call .to_int4_tensor() first for a portable Int4Tensor")
        if dtype not in (None, torch.bfloat16):
            raise TypeError(f"Int4PreshuffledTensor computes in bfloat16, got {dtype}")

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_int4_tensor(cls, t: Int4Tensor) -> "Int4PreshuffledTensor":
        """Preshuffle a CUDA Int4Tensor (bf16 scale/zero, G >= 64) for bf16 activations.
        Outputs of linear are bit-identical before and after (measured on an H200)."""
        if t.is_transposed:
            return cls.from_int4_tensor(t.mT).mT
        if t.act_pre_scale is not None or t.scale.dtype != torch.bfloat16 or t.group_size < 64:
            raise ValueError("Int4PreshuffledTensor needs bf16 scale/zero, group size >= 64 and "
                             "no act_pre_scale")
        if t.qdata.shape[-1] % 64:
            # gpt-oss's K = 2880: fbgemm's shuffle runs, but a shuffled kernel on the result
            # (bf16i4bf16_shuffled, as unshuffling calls it) ended the process with an illegal
            # memory access (H200), which no caller can catch
            raise ValueError(f"Int4PreshuffledTensor needs K a multiple of 128, got "
                             f"K = {2 * t.qdata.shape[-1]}")
        qdata, scale, zero = (_pad_n(x, dim) for x, dim in
                              ((t.qdata, -2), (t.scale, -1), (t.zero_point, -1)))
        shuffled = [kernels.fbgemm.preshuffle(q, s)
                    for q, s in zip(qdata.reshape(-1, *qdata.shape[-2:]),
                                    scale.reshape(-1, *scale.shape[-2:]))]
        qdata = torch.stack([q for q, _ in shuffled]).reshape(qdata.shape)
        scale = torch.stack([s for _, s in shuffled]).reshape(scale.shape)
        return cls(qdata, scale, t.block_size, t.shape, "bf16", group_zero=zero)

    @classmethod
    def from_hp_fp8(cls, weight: torch.Tensor, group_size: int = 128) -> "Int4PreshuffledTensor":
        """Quantize a CUDA weight ``[N, K]`` / ``[E, N, K]`` for fp8 activations (symmetric
        int4, fp8 group scales, fp32 row scales; fbgemm's ``quantize_int4_preshuffle``)."""
        if group_size != 128:
            raise ValueError(f"fp8-activation int4 kernels take group size 128 only, got "
                             f"{group_size}")
        if not weight.is_cuda:
            raise ValueError("fp8-activation int4 weights are made on a CUDA device")
        padded = _pad_n(weight, -2)
        parts = [kernels.fbgemm.quantize_fp8_weight(w, group_size)
                 for w in padded.reshape(-1, *padded.shape[-2:])]
        lead = padded.shape[:-2]
        qdata = torch.stack([p[0] for p in parts]).reshape(*lead, *parts[0][0].shape)
        group_scale = torch.stack([p[1] for p in parts]).reshape(*lead, *parts[0][1].shape)
        row_scale = torch.stack([p[2] for p in parts]).reshape(*lead, *parts[0][2].shape)
        block = (1,) * (weight.ndim - 1) + (group_size,)
        return cls(qdata, group_scale, block, weight.shape, "fp8", row_scale=row_scale)

    @classmethod
    def from_fp8_parts(cls, q: torch.Tensor, group_scale: torch.Tensor,
                       row_scale: torch.Tensor) -> "Int4PreshuffledTensor":
        """An fp8-activation weight ``W = e4m3(q * group_scale) * row_scale`` from its parts:
        q int8 ``[..., N, K]`` in [-8, 7], group_scale float8_e4m3 ``[..., K/128, N]``,
        row_scale fp32 ``[..., N]`` (what :func:`fbgemm.fp8_weight_parts` returns)."""
        shape = q.shape
        q, group_scale, row_scale = _pad_n(q, -2), _pad_n(group_scale, -1), _pad_n(row_scale, -1)
        shuffled = [kernels.fbgemm.preshuffle_fp8(qm, sm) for qm, sm in
                    zip(q.reshape(-1, *q.shape[-2:]), group_scale.reshape(-1, *group_scale.shape[-2:]))]
        lead = q.shape[:-2]
        qdata = torch.stack([a for a, _ in shuffled]).reshape(*lead, *shuffled[0][0].shape)
        packed = torch.stack([b for _, b in shuffled]).reshape(*lead, *shuffled[0][1].shape)
        block = (1,) * (len(shape) - 1) + (shape[-1] // group_scale.shape[-2],)
        return cls(qdata, packed, block, shape, "fp8", row_scale=row_scale.contiguous())

    # ---- back to dense / plain -----------------------------------------------------------
    def to_int4_tensor(self) -> Int4Tensor:
        """The same weight in the plain layout, exactly (bf16 activations only: fbgemm packs the
        fp8 group scales in a layout of its own)."""
        if self.activation_dtype != "bf16":
            raise NotImplementedError("to_int4_tensor of an fp8-activation Int4PreshuffledTensor;"
                                      " dequantize() gives its dense value")
        self._require_fbgemm("to_int4_tensor")
        if self.is_transposed:
            return self.mT.to_int4_tensor().mT
        n = self.stored_n
        q = kernels.fbgemm.unshuffle_int4(self)[..., :n, :]
        scale = self.group_scale[..., :n].contiguous()
        zero = self.group_zero[..., :n].contiguous()
        return Int4Tensor(pack_int4(q.contiguous()), scale, zero, self.block_size, self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in its logical shape: through the plain layout (bf16 activations),
        or as the kernel's own product with an identity input (fp8 activations, bf16 exact
        to the kernel's rounding)."""
        dtype = dtype or self.dtype
        self._require_fbgemm("dequantize")
        if self.activation_dtype == "bf16":
            return self.to_int4_tensor().dequantize(dtype)
        w = kernels.fbgemm.dequantize_fp8_weight(self)[..., : self.stored_n, :].to(dtype)
        return w.transpose(-1, -2) if self.is_transposed else w


def _pad_n(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad ``dim`` up to a multiple of the kernels' N alignment."""
    n = x.shape[dim]
    pad = -n % kernels.fbgemm.N_ALIGN
    if pad == 0:
        return x
    widths = [0, 0] * (-dim - 1) + [0, pad]
    return F.pad(x, widths)


implements = Int4PreshuffledTensor.implements


@implements([F.linear, aten.linear.default])
def _(func, args, kwargs):
    x, w, bias = linear_operands(Int4PreshuffledTensor, args, kwargs)
    planned = kernels.cached_plan("linear", x, w)
    if planned is not None:  # a repeated eager call: operands checked, kernel bound
        return planned(x, bias)
    w._require_fbgemm("linear")
    if w.qdata.ndim != 2 or w.is_transposed:  # (the inner shape: w.ndim costs a dispatch)
        return F.linear(x, w.dequantize(x.dtype), bias)
    return _linear(x, w, bias)


def _linear(x: torch.Tensor, w: Int4PreshuffledTensor, bias) -> torch.Tensor:
    k = 2 * w.qdata.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"linear input's last dim must be K = {k}, got input shape "
                         f"{list(x.shape)}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"Int4PreshuffledTensor takes bf16 activations, got {x.dtype}")
    return kernels.preshuffled_linear(x, w, bias)


def _transposed(t: Int4PreshuffledTensor) -> Int4PreshuffledTensor:
    bs, shape = t.block_size, tuple(t.shape)
    return Int4PreshuffledTensor._build(
        t._tensors(), [(*bs[:-2], bs[-1], bs[-2]), (*shape[:-2], shape[-1], shape[-2]),
                       t.activation_dtype], validate=False)


@implements([aten.t.default, aten.transpose.int])
def _(func, args, kwargs):
    t = args[0]
    dims = {d % t.ndim for d in args[1:3]} if func is aten.transpose.int else {0, 1}
    if dims != {t.ndim - 2, t.ndim - 1}:
        raise NotImplementedError("Int4PreshuffledTensor supports transposing only its last "
                                  "two dims")
    out = _transposed(t)
    if not t.is_transposed:  # a view of the stored weight: eager calls use t's plans
        out._as_transposed_view_of(t)
    return return_and_correct_aliasing(func, args, kwargs, out)


@implements([aten.select.int, aten.index.Tensor])
def _(func, args, kwargs):
    """Expert selection ``w[e]`` / ``w[idx]`` of a 3D weight (dim 0)."""
    t, index = args[0], args[1:]
    if t.ndim != 3 or (func is aten.select.int and index[0] % 3 != 0):
        raise NotImplementedError("Int4PreshuffledTensor supports indexing only the expert dim "
                                  "of a 3D weight")
    pick = (lambda x: x.select(0, index[1])) if func is aten.select.int else \
        (lambda x: x[index[0][0]])
    fields = {name: pick(x) for name, x in t._tensors().items()}
    lead = fields["qdata"].shape[:-2]
    block = t.block_size[1:] if func is aten.select.int else t.block_size
    return Int4PreshuffledTensor._build(fields, [block, (*lead, *t.shape[1:]),
                                                 t.activation_dtype])


@implements([aten.slice.Tensor])
def _(func, args, kwargs):
    """Slices along N or K copy: the layout is re-derived for the slice (exact)."""
    t = args[0]
    dim, start, end, step = op_args(args[1:], kwargs, ("dim", 0), ("start", None),
                                    ("end", None), ("step", 1))
    if t.ndim == 3 and dim % 3 == 0:
        fields = {name: x[start:end:step] for name, x in t._tensors().items()}
        shape = (fields["qdata"].shape[0], *t.shape[1:])
        return Int4PreshuffledTensor._build(fields, [t.block_size, shape, t.activation_dtype])
    t._require_fbgemm("slicing along N or K")
    if t.activation_dtype == "bf16":
        plain = t.to_int4_tensor()
        return Int4PreshuffledTensor.from_int4_tensor(aten.slice.Tensor(plain, dim, start, end, step))
    return _slice_fp8(t, dim % t.ndim, start, end, step)


def _slice_fp8(t: Int4PreshuffledTensor, dim: int, start, end, step) -> Int4PreshuffledTensor:
    """N or K slice of an fp8-activation weight: its exact parts are sliced and preshuffled
    again. K slices must cover whole groups of 128."""
    if t.is_transposed:
        return _transposed(_slice_fp8(_transposed(t), 2 * t.ndim - 3 - dim, start, end, step))
    q, group_scale, row_scale = kernels.fbgemm.fp8_weight_parts(t)
    n = t.stored_n
    q, group_scale, row_scale = q[..., :n, :], group_scale[..., :n], row_scale[..., :n]
    if dim == t.ndim - 2:  # N
        q = q[..., start:end:step, :]
        group_scale, row_scale = group_scale[..., start:end:step], row_scale[..., start:end:step]
    else:  # K
        k, g = t.shape[-1], t.group_size
        first, last, _ = slice(start, end, step).indices(k)
        if step != 1 or first % g or (last % g and last != k) or last <= first:
            raise ValueError(f"slicing K of an fp8-activation Int4PreshuffledTensor must stay on "
                             f"group boundaries (step 1, start and end multiples of {g}); got "
                             f"[{start}:{end}:{step}] of K = {k}")
        q = q[..., first:last]
        group_scale = group_scale[..., first // g: -(-last // g), :]
    if q.shape[-2] == 0:
        raise ValueError("slicing an fp8-activation Int4PreshuffledTensor to N = 0")
    return Int4PreshuffledTensor.from_fp8_parts(q.contiguous(), group_scale.contiguous(),
                                                row_scale.contiguous())


@implements([aten.bmm.default, aten.mm.default, torch.matmul, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.bmm, torch.mm, torch.Tensor.bmm, torch.Tensor.mm])
def _(func, args, kwargs):
    """``x @ W`` for a transposed weight (``W`` logical ``[.., K, N]``) runs the kernels; any
    other product goes through the dense value."""
    a, b = args[0], args[1]
    for x in (a, b):
        if isinstance(x, Int4PreshuffledTensor):
            x._require_fbgemm(getattr(func, "__name__", "matmul"))
    if isinstance(b, Int4PreshuffledTensor) and b.is_transposed and \
            not isinstance(a, Int4BaseTensor) and a.dtype == torch.bfloat16:
        stored = b._stored_weight(_transposed) if kernels.is_eager(a) else _transposed(b)
        # shapes from the inner qdata [.., Np, K/2]: the subclass's .ndim / .shape would go
        # through __torch_function__ on every call
        q = stored.qdata
        if q.ndim == 2:
            return _linear(a, stored, None)
        if a.ndim == 3 and q.ndim == 3 and a.shape[0] == q.shape[0]:
            if a.shape[-1] != 2 * q.shape[-1]:
                raise ValueError(f"bmm: shapes {list(a.shape)} and {list(b.shape)} cannot be "
                                 "multiplied")
            return kernels.preshuffled_bmm(a, stored)
    dense = [x.dequantize(torch.bfloat16) if isinstance(x, Int4BaseTensor) else x for x in (a, b)]
    return torch.matmul(*dense)


@implements([aten._grouped_mm.default])
def _(func, args, kwargs):
    """MoE experts as transformers runs them, ``_grouped_mm(x [T, K], w.transpose(-2, -1),
    offs)`` on a bf16 preshuffled stack ``w [E, N, K]``: bf16 x, int32 offs, no bias ->
    :func:`kernels.int4_grouped_mm` (our grouped GEMV, fbgemm's grouped kernel); anything else
    has the dense semantics of the Int4Tensor op (through the dequantized weights)."""
    a, b, offs, bias, out_dtype = op_args(args, kwargs, ("mat_a", None), ("mat_b", None),
                                          ("offs", None), ("bias", None), ("out_dtype", None))
    if (isinstance(b, Int4PreshuffledTensor) and not isinstance(a, Int4BaseTensor)
            and b.is_transposed and b.activation_dtype == "bf16" and a.dtype == torch.bfloat16
            and a.ndim == 2 and b.qdata.ndim == 3 and offs is not None and bias is None
            and out_dtype in (None, torch.bfloat16) and a.numel() and b.qdata.numel()):
        b._require_fbgemm("grouped_mm")
        check_grouped(a, tuple(b.shape), offs)
        stored = b._stored_weight(_transposed) if kernels.is_eager(a) else _transposed(b)
        return kernels.int4_grouped_mm(a, stored, offs)
    return grouped_mm_impl(func, args, kwargs)
