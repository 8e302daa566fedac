"""``Int4Tensor``: int4 weights in the plain (fbgemm rowwise) layout, the checkpoint format."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing

from int4tensor import kernels
from int4tensor.qparams import choose_qparams
from int4tensor.quant_primitives import (
    SUPPORTED_GROUP_SIZES,
    dequantize_int4,
    quantize_with_qparams,
)
from int4tensor.tensors.base import Int4BaseTensor, linear_operands, op_args

aten = torch.ops.aten

__all__ = ["ACTIVATION_DTYPES", "Int4Tensor"]

#: ``activation_dtype`` values: "bf16" (activations as they come) or "fp8" (each row rounded to
#: float8 e4m3 at run time); Int4PreshuffledTensor takes the same.
ACTIVATION_DTYPES = ("bf16", "fp8")


class Int4Tensor(Int4BaseTensor):
    """A weight ``W [..., N, K]`` stored as group-wise asymmetric int4.

    Fields:
        qdata: int8 ``[..., N, K/2]``, two signed int4 values per byte along K: element ``2i``
            in the low nibble, ``2i+1`` in the high nibble (fbgemm's ``pack_int4``).
        scale: ``[..., K/G, N]`` in the weight's dtype.
        zero_point: ``[..., K/G, N]`` in the weight's dtype.
        block_size: the shape of one quantization group in the *logical* tensor: ``(1, G)`` for
            a 2D weight, ``(1, 1, G)`` for a 3D one; after a transpose of the last two dims
            (a view, no data moves) ``(G, 1)`` / ``(1, G, 1)``.
        shape: the logical shape, ``(..., N, K)``, or ``(..., K, N)`` when transposed.
        act_pre_scale: optional ``[..., K]`` per-input-channel factor (AWQ-style activation
            scaling): ``linear`` multiplies the activation by it before the int4 matmul.
        activation_dtype: ``"bf16"`` (default) or ``"fp8"``: ``linear`` first quantizes the
            activation per row to float8 e4m3 (fbgemm's ``f8i4bf16_rowwise`` on Hopper; the
            reference path elsewhere applies the same activation rounding).

    The stored weight is ``W[..., n, k] = (q[..., n, k] * scale[..., k // G, n]
    + zero_point[..., k // G, n]) * act_pre_scale[..., k]`` (the last factor only when set);
    a transposed tensor stands for ``W.transpose(-1, -2)``. Its ``dtype`` is the scale's dtype.
    """

    tensor_data_names = ("qdata", "scale", "zero_point")
    optional_tensor_data_names = ("act_pre_scale",)
    tensor_attribute_names = ("block_size", "shape", "activation_dtype")

    @staticmethod
    def __new__(cls, qdata, scale, zero_point, block_size, shape, act_pre_scale=None,
                activation_dtype="bf16"):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=scale.dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, zero_point, block_size, shape, act_pre_scale=None,
                 activation_dtype="bf16"):
        self.qdata = qdata
        self.scale = scale
        self.zero_point = zero_point
        self.act_pre_scale = _full_pre_scale(act_pre_scale, shape, block_size, scale)
        self.activation_dtype = activation_dtype
        self.block_size = tuple(int(b) for b in block_size) \
            if isinstance(block_size, (tuple, list, torch.Size)) else block_size
        # ``shape`` is not stored: the wrapper already carries it (and pickles it).
        self._validate()

    __module__ = "int4tensor"  # the public path; int4tensor.tensors.int4_tensor still loads
    attribute_defaults = {"activation_dtype": "bf16"}

    def _layout_problem(self) -> str | None:
        """qdata int8 ``[..., N, K/2]``, scale and zero_point (one float dtype) ``[..., K/G, N]``,
        act_pre_scale ``[..., K]``, all on one device, for the stored ``[..., N, K]``."""
        shape = tuple(self.shape)
        problem = _block_problem(self.block_size, shape)
        if problem is not None:
            return problem
        *lead, n, k = (*shape[:-2], shape[-1], shape[-2]) if self.block_size[-2] != 1 else shape
        g = max(self.block_size)
        for name in ("qdata", "scale", "zero_point"):
            if not isinstance(getattr(self, name), torch.Tensor):
                return f"{name} is a {type(getattr(self, name)).__name__}, not a tensor"
        want = {"qdata": [*lead, n, k // 2], "scale": [*lead, k // g, n],
                "zero_point": [*lead, k // g, n]}
        if self.act_pre_scale is not None:
            if not isinstance(self.act_pre_scale, torch.Tensor):
                return f"act_pre_scale is a {type(self.act_pre_scale).__name__}, not a tensor"
            want["act_pre_scale"] = [*lead, k]
        for name, shape in want.items():
            inner = getattr(self, name)
            if list(inner.shape) != shape:
                return f"{name} has shape {list(inner.shape)}, expected {shape}"
            if inner.device != self.qdata.device:
                return f"{name} is on {inner.device}, qdata on {self.qdata.device}"
        if self.qdata.dtype != torch.int8:
            return f"qdata has dtype {self.qdata.dtype}, expected torch.int8"
        if not self.scale.is_floating_point():
            return f"scale has dtype {self.scale.dtype}, expected a floating dtype"
        if self.zero_point.dtype != self.scale.dtype:
            return f"zero_point has dtype {self.zero_point.dtype}, scale {self.scale.dtype}"
        if self.act_pre_scale is not None and not self.act_pre_scale.is_floating_point():
            return f"act_pre_scale has dtype {self.act_pre_scale.dtype}, expected floating"
        if self.activation_dtype not in ACTIVATION_DTYPES:
            return (f"activation_dtype must be {' or '.join(map(repr, ACTIVATION_DTYPES))}, "
                    f"got {self.activation_dtype!r}")
        return None

    @classmethod
    def empty(cls, shape, block_size, *, dtype: torch.dtype = torch.bfloat16,
              device: torch.device | str | None = None, activation_dtype: str = "bf16",
              transposed: bool = False) -> "Int4Tensor":
        """An Int4Tensor of logical ``shape`` whose fields are uninitialized memory
        (``torch.empty``; ``device="meta"`` works): for loaders that create parameters first and ``copy_`` the
        checkpoint over them (vLLM's ``weight_loader`` pattern: ``param.narrow(...).copy_(shard)``).
        No value is read or validated, so uninitialized NaN/Inf bits cannot make it fail.

        Args:
            shape: ``[N, K]`` or ``[E, N, K]`` (``[..., K, N]`` with ``transposed=True``).
            block_size: ``(1, G)`` / ``(1, 1, G)`` of the stored ``[..., N, K]``.
            dtype: the scale/zero dtype (the tensor's dtype).
        """
        shape = tuple(int(d) for d in shape)
        stored = (*shape[:-2], shape[-1], shape[-2]) if transposed and len(shape) >= 2 else shape
        group_size = _check_block_size(torch.empty(stored, device="meta"), block_size)
        *lead, n, k = stored
        qdata = torch.empty(*lead, n, k // 2, dtype=torch.int8, device=device)
        scale = torch.empty(*lead, k // group_size, n, dtype=dtype, device=device)
        zero = torch.empty(*lead, k // group_size, n, dtype=dtype, device=device)
        out = cls(qdata, scale, zero, tuple(block_size), stored, activation_dtype=activation_dtype)
        return _transposed(out) if transposed else out

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        block_size,
        *,
        algorithm: str = "minmax",
        zero_point_domain: str = "float",
        activation_dtype: str = "bf16",
    ) -> "Int4Tensor":
        """Quantize a high-precision weight group-wise along its last dim.

        Args:
            weight: bf16/fp16/fp32 ``[N, K]`` or ``[E, N, K]``, finite.
            block_size: ``(1, G)`` or ``(1, 1, G)`` with ``G`` in ``SUPPORTED_GROUP_SIZES``.
            algorithm: how scale/zero are chosen (:data:`int4tensor.qparams.QPARAMS_ALGORITHMS`);
                the default ``"minmax"`` with ``zero_point_domain="float"`` is fbgemm's
                ``int4_row_quantize_zp``, bit for bit.
            zero_point_domain: ``"float"``, ``"int"`` (integer zero points) or ``"none"``
                (symmetric).
            activation_dtype: ``"bf16"`` or ``"fp8"`` (activations quantized per row at run
                time).
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"Int4Tensor.from_hp quantizes a torch.Tensor, got "
                            f"{type(weight).__name__}")
        group_size = _check_block_size(weight, block_size)
        _check_weight(weight, group_size)
        scale, minimum = choose_qparams(weight, group_size, algorithm, zero_point_domain)
        qdata, scale, zero_point = quantize_with_qparams(weight, scale, minimum, group_size)
        _check_representable(weight, scale, zero_point)
        return cls(qdata, scale, zero_point, tuple(block_size), weight.shape,
                   activation_dtype=activation_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor this one stands for, in its logical shape, in ``dtype`` (default:
        this tensor's dtype)."""
        w = self.dequantize_stored(dtype or self.dtype, with_pre_scale=True)
        return w.transpose(-1, -2) if self.is_transposed else w

    def dequantize_stored(self, dtype: torch.dtype, with_pre_scale: bool = False) -> torch.Tensor:
        """The stored weight ``q * scale + zero_point`` as ``[..., N, K]`` (never transposed),
        times ``act_pre_scale`` if ``with_pre_scale``; computed in float32, cast to ``dtype``."""
        if not with_pre_scale or self.act_pre_scale is None:
            return kernels.dequantize_int4(self.qdata, self.scale, self.zero_point,
                                           self.group_size, dtype)
        w = dequantize_int4(self.qdata, self.scale, self.zero_point, self.group_size,
                            torch.float32)
        return (w * self.act_pre_scale.float().unsqueeze(-2)).to(dtype)

    def _quantize_like(self, dense: torch.Tensor) -> "Int4Tensor":
        """Quantize a dense tensor with this tensor's layout and scale dtype (``copy_``)."""
        if tuple(dense.shape) != tuple(self.shape):
            raise ValueError(
                f"copy_ into Int4Tensor: source shape {list(dense.shape)} != {list(self.shape)}"
            )
        if self.act_pre_scale is not None:
            raise ValueError("copy_ of a dense tensor into an Int4Tensor with act_pre_scale is "
                             "ambiguous; quantize the source with the same pre-scale first")
        stored = dense.transpose(-1, -2) if self.is_transposed else dense
        block = (1,) * (self.ndim - 1) + (self.group_size,)
        out = Int4Tensor.from_hp(stored.to(self.dtype), block,
                                 activation_dtype=self.activation_dtype)
        return _transposed(out) if self.is_transposed else out


def _check_block_size(weight: torch.Tensor, block_size) -> int:
    if weight.ndim not in (2, 3):
        raise ValueError(f"Int4Tensor holds 2D [N, K] or 3D [E, N, K] weights, got shape "
                         f"{list(weight.shape)}")
    block_size = tuple(block_size)
    if len(block_size) != weight.ndim or any(b != 1 for b in block_size[:-1]):
        expected = "(1, G)" if weight.ndim == 2 else "(1, 1, G)"
        raise ValueError(f"block_size for a {weight.ndim}D weight must be {expected}, "
                         f"got {block_size}")
    return _check_group_size(block_size[-1], weight.shape[-1])


def _check_group_size(group_size, k: int) -> int:
    if not isinstance(group_size, int) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"K = {k} (the last dim of the weight) is not a multiple of the "
                         f"group size {group_size}")
    return group_size


def check_weight_values(weight: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``weight`` holds NaN/Inf or a range too wide for its dtype
    (``max - min`` must stay finite: that is the span one group's 15 steps cover). Reads the
    values (skipped on the meta device)."""
    if weight.device.type == "meta" or not weight.numel() or not weight.is_floating_point():
        return
    if not bool(torch.isfinite(weight).all()):
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf value(s); cannot quantize it")
    low, high = float(weight.detach().min()), float(weight.detach().max())
    limit = torch.finfo(weight.dtype).max
    if high - low > limit or max(abs(low), abs(high)) > limit / 2:
        raise ValueError(f"weight values span [{low:.3g}, {high:.3g}], too wide to quantize "
                         f"with {weight.dtype} scales (|w| must stay below {limit / 2:.3g})")


def _check_weight(weight: torch.Tensor, group_size: int) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"Int4Tensor quantizes floating-point weights, got {got}")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"Int4Tensor quantizes bf16/fp16/fp32 weights, got {weight.dtype}")
    if weight.shape[-1] == 0:
        raise ValueError(f"cannot quantize a weight with K = 0 (shape {list(weight.shape)})")
    check_weight_values(weight)


def _check_representable(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Finite weights whose range overflows the scale dtype (|w| near 3e38 in fp32) would give
    ``scale = inf`` and dequantize to NaN: refuse them. Checks ``|zero| + 8 |scale|``, the
    largest magnitude a group can dequantize to."""
    if scale.device.type == "meta" or scale.numel() == 0:
        return
    reach = zero.float().abs() + 8 * scale.float().abs()
    limit = torch.finfo(scale.dtype).max
    if not bool(torch.isfinite(reach).all()) or float(reach.max()) > limit:
        amax = float(weight.abs().max())
        raise ValueError(f"weight values up to {amax:.3g} in magnitude cannot be quantized to "
                         f"int4 with {scale.dtype} scales: a group's scale or zero point "
                         f"overflows (its range must stay below {limit:.3g})")


def _stored_shape(t) -> list[int]:
    """The logical shape of the stored (never transposed) weight ``[..., N, K]``."""
    shape = list(t.shape)
    if t.is_transposed:
        shape[-2:] = shape[-1], shape[-2]
    return shape


def _block_problem(block, shape: tuple) -> str | None:
    """``block_size`` and ``shape`` agree: ``(1, .., G)`` (``(.., G, 1)`` transposed) with
    ``G`` supported and dividing K. Shared by every int4 layout; plain values in (no tensor
    attribute lookups: this runs on every construction)."""
    if not isinstance(block, tuple) or not all(isinstance(b, int) for b in block):
        return f"block_size {block!r} is not a tuple of ints"
    ndim = len(shape)
    if ndim not in (2, 3):
        return f"shape {list(shape)}: int4 weights are 2D [N, K] or 3D [E, N, K]"
    transposed = len(block) >= 2 and block[-2] != 1
    stored = (*block[:-2], block[-1], block[-2]) if transposed else block
    if len(block) != ndim or any(b != 1 for b in stored[:-1]):
        return f"block_size {block} does not fit shape {list(shape)}"
    g = stored[-1]
    if g not in SUPPORTED_GROUP_SIZES:
        return f"group size {g} (block_size {block}) is not one of {SUPPORTED_GROUP_SIZES}"
    k = shape[-2] if transposed else shape[-1]
    if k % g:
        return f"K = {k} of shape {list(shape)} is not a multiple of the group size {g}"
    return None


def _full_pre_scale(act_pre_scale, shape, block_size, scale):
    """A number or one-element tensor given as ``act_pre_scale`` means the same factor for every
    input channel: store it as the full ``[..., K]`` (what every op and the file format expect)."""
    if act_pre_scale is None:
        return None
    try:
        shape, block = [int(d) for d in shape], tuple(block_size)
        k = shape[-2] if block[-2] != 1 else shape[-1]
        full = [*shape[:-2], k]
    except (TypeError, ValueError, IndexError):
        return act_pre_scale  # the layout check names the problem
    like = scale if isinstance(scale, torch.Tensor) else None
    if isinstance(act_pre_scale, (int, float)) and not isinstance(act_pre_scale, bool):
        return torch.full(full, float(act_pre_scale),
                          dtype=like.dtype if like is not None else torch.float32,
                          device=like.device if like is not None else None)
    if isinstance(act_pre_scale, torch.Tensor) and act_pre_scale.numel() == 1 and \
            list(act_pre_scale.shape) != full:
        return act_pre_scale.reshape(()).expand(full).contiguous()
    return act_pre_scale


_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- logical dims -> inner tensor dims -----------------------------------------------------
# Every data-movement op below is written once, in terms of the role of the logical dim it
# touches: "batch" (the expert dim of a 3D weight), "n" (output features) or "k" (input
# features, the packed and grouped dim). _field_dims says where that dim lives in each inner
# tensor and in which unit (2 values per qdata byte, G values per scale entry).


def _normalize_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim {dim} out of range for an Int4Tensor with {ndim} dims")
    return dim % ndim


def _role(t: Int4Tensor, dim: int) -> str:
    if dim < t.ndim - 2:
        return "batch"
    return "k" if (dim == t.ndim - 1) != t.is_transposed else "n"


def _field_dims(t: Int4Tensor, dim: int) -> dict[str, tuple[int, int]]:
    """``{field: (inner dim, logical elements per inner element)}`` for logical ``dim``.
    A field left out (act_pre_scale along N) is shared by every part unchanged."""
    role = _role(t, dim)
    if role == "batch":
        return {name: (dim, 1) for name in t._tensors()}
    if role == "n":
        return {"qdata": (-2, 1), "scale": (-1, 1), "zero_point": (-1, 1)}
    dims = {"qdata": (-1, 2), "scale": (-2, t.group_size), "zero_point": (-2, t.group_size)}
    if t.act_pre_scale is not None:
        dims["act_pre_scale"] = (-1, 1)
    return dims


def _replace(t: Int4Tensor, shape, block_size=None, **tensors) -> Int4Tensor:
    fields = {**t._tensors(), **tensors}
    return Int4Tensor._build(
        fields, [tuple(block_size or t.block_size), tuple(shape), t.activation_dtype],
        validate=False)  # derived from a checked tensor by the ops below


def _transposed(t: Int4Tensor) -> Int4Tensor:
    """Swap the logical last two dims: same inner tensors, block_size and shape swapped."""
    bs, shape = t.block_size, tuple(t.shape)
    return _replace(t, (*shape[:-2], shape[-1], shape[-2]), (*bs[:-2], bs[-1], bs[-2]))


def _slice(t: Int4Tensor, dim: int, start: int, end: int, step: int = 1) -> Int4Tensor:
    """``t`` sliced along logical ``dim``; views of the inner tensors (aliasing ``t``)."""
    size = t.shape[dim]
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, start), size)
    role = _role(t, dim)
    if step != 1 and role == "k":
        raise ValueError(f"Int4Tensor cannot be sliced with step {step} along K (dim {dim}): "
                         "K is packed and grouped")
    if role == "k" and (start % t.group_size or end % t.group_size):
        raise ValueError(
            f"Int4Tensor slice [{start}:{end}] along K (dim {dim}) must start and end on group "
            f"boundaries (multiples of the group size {t.group_size}); otherwise the scales "
            "would not line up")
    fields = {name: aten.slice.Tensor(getattr(t, name), idim, start // unit, end // unit, step)
              for name, (idim, unit) in _field_dims(t, dim).items()}
    shape = list(t.shape)
    shape[dim] = len(range(start, end, step))
    return _replace(t, shape, **fields)


def _batch_only(t: Int4Tensor, dim: int, op: str) -> None:
    if _role(t, dim) != "batch":
        raise NotImplementedError(
            f"Int4Tensor supports {op} only along the expert dim of a 3D weight, got dim {dim} "
            f"of shape {list(t.shape)} (dequantize() first for a dense tensor)")


def _reshape(t: Int4Tensor, shape) -> Int4Tensor:
    """View/reshape that keeps the packed K dim: ``[E*N, K] <-> [E, N, K]``, ``[N, K] <->
    [1, N, K]``. Inner tensors are views when the strides allow it, else copies."""
    shape = list(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = t.numel() // max(known, 1)
    if shape == list(t.shape):
        return _replace(t, shape)
    if math.prod(shape) != t.numel() or len(shape) not in (2, 3):
        raise ValueError(f"cannot view Int4Tensor of shape {list(t.shape)} as {shape}")
    if t.is_transposed:
        if shape[-2:] != list(t.shape[-2:]):
            raise NotImplementedError(
                f"a transposed Int4Tensor {list(t.shape)} can only gain or lose a leading dim "
                f"of size 1, not become {shape}")
        return _transposed(_reshape(_transposed(t), [*shape[:-2], shape[-1], shape[-2]]))
    k, g = t.shape[-1], t.group_size
    if shape[-1] != k:
        raise NotImplementedError(
            f"Int4Tensor views must keep the packed last dim K = {k}: {list(t.shape)} -> {shape}")
    if t.act_pre_scale is not None:  # it would have to be regrouped per expert too
        raise NotImplementedError("reshaping an Int4Tensor that has an act_pre_scale")
    rows = t.numel() // k
    # to rows: qdata [R, K/2], scale [K/G, R]
    qdata = t.qdata.reshape(rows, k // 2)
    scale, zero = (x.transpose(0, 1) if x.ndim == 3 else x for x in (t.scale, t.zero_point))
    scale, zero = (x.reshape(k // g, rows) for x in (scale, zero))
    if len(shape) == 3:
        e, n = shape[0], shape[1]
        qdata = qdata.reshape(e, n, k // 2)
        scale, zero = (x.reshape(k // g, e, n).transpose(0, 1) for x in (scale, zero))
    block = (1,) * (len(shape) - 1) + (g,)
    return _replace(t, shape, block, qdata=qdata, scale=scale, zero_point=zero)


# ---- data movement ops ---------------------------------------------------------------------
def _view_op(func, args, kwargs, out):
    return return_and_correct_aliasing(func, args, kwargs, out)


@Int4Tensor.implements([aten.slice.Tensor])
def _(func, args, kwargs):
    t = args[0]
    dim, start, end, step = op_args(args[1:], kwargs, ("dim", 0), ("start", None),
                                    ("end", None), ("step", 1))
    dim = _normalize_dim(dim, t.ndim)
    start = 0 if start is None else start
    end = t.shape[dim] if end is None else end
    return _view_op(func, args, kwargs, _slice(t, dim, start, end, step))


@Int4Tensor.implements([aten.split.Tensor, aten.split_with_sizes.default])
def _(func, args, kwargs):
    t, sizes = args[0], args[1]
    (dim,) = op_args(args[2:], kwargs, ("dim", 0))
    dim = _normalize_dim(dim, t.ndim)
    if isinstance(sizes, int):
        sizes = [min(sizes, t.shape[dim] - s) for s in range(0, t.shape[dim], sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [_slice(t, dim, s, s + n) for s, n in zip(starts, sizes)]


@Int4Tensor.implements([aten.select.int])
def _(func, args, kwargs):
    t, dim, index = args
    dim = _normalize_dim(dim, t.ndim)
    _batch_only(t, dim, "select")
    fields = {name: x.select(dim, index) for name, x in t._tensors().items()}
    shape = [s for i, s in enumerate(t.shape) if i != dim]
    block = [b for i, b in enumerate(t.block_size) if i != dim]
    return _view_op(func, args, kwargs, _replace(t, shape, block, **fields))


@Int4Tensor.implements([aten.unbind.int])
def _(func, args, kwargs):
    t = args[0]
    (dim,) = op_args(args[1:], kwargs, ("dim", 0))
    return [t.select(dim, i) for i in range(t.shape[dim])]


@Int4Tensor.implements([aten.index.Tensor])
def _(func, args, kwargs):
    """``w[idx]`` on the expert dim of a 3D weight (integer or boolean index tensor)."""
    t, indices = args
    if t.ndim != 3 or len(indices) != 1 or indices[0] is None:
        raise NotImplementedError("Int4Tensor supports tensor indexing only of the expert dim "
                                  f"of a 3D weight (w[idx]); got shape {list(t.shape)}")
    fields = {name: x[indices[0]] for name, x in t._tensors().items()}
    return _replace(t, (fields["qdata"].shape[0], *t.shape[1:]), **fields)


@Int4Tensor.implements([aten.cat.default])
def _(func, args, kwargs):
    tensors = list(args[0])
    (dim,) = op_args(args[1:], kwargs, ("dim", 0))
    first = tensors[0]
    if not all(isinstance(x, Int4Tensor) for x in tensors):
        raise NotImplementedError("cat of an Int4Tensor with a dense tensor: quantize it first")
    dim = _normalize_dim(dim, first.ndim)
    for x in tensors[1:]:
        problem = _cat_mismatch(first, x, dim)
        if problem:
            raise ValueError(f"cannot cat Int4Tensors along dim {dim}: {problem}")
    fields = {name: torch.cat([getattr(x, name) for x in tensors], dim=idim)
              for name, (idim, _) in _field_dims(first, dim).items()}
    if "act_pre_scale" not in fields and first.act_pre_scale is not None:
        if not all(torch.equal(x.act_pre_scale, first.act_pre_scale) for x in tensors):
            raise ValueError("cannot cat Int4Tensors along N with different act_pre_scale")
    shape = list(first.shape)
    shape[dim] = sum(x.shape[dim] for x in tensors)
    return _replace(first, shape, **fields)


def _cat_mismatch(a: Int4Tensor, b: Int4Tensor, dim: int) -> str | None:
    if a.ndim != b.ndim or any(a.shape[i] != b.shape[i] for i in range(a.ndim) if i != dim):
        return f"shapes {list(a.shape)} and {list(b.shape)} differ outside dim {dim}"
    if a.block_size != b.block_size:
        return f"block_size {a.block_size} != {b.block_size}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != {b.dtype}"
    if a.activation_dtype != b.activation_dtype:
        return f"activation_dtype {a.activation_dtype!r} != {b.activation_dtype!r}"
    if a.device != b.device:
        return f"device {a.device} != {b.device}"
    if (a.act_pre_scale is None) != (b.act_pre_scale is None):
        return "only some have an act_pre_scale"
    for name, x in a._tensors().items():
        if x.dtype != getattr(b, name).dtype:
            return f"{name} dtype {x.dtype} != {getattr(b, name).dtype}"
    return None


@Int4Tensor.implements([aten.stack.default])
def _(func, args, kwargs):
    tensors = list(args[0])
    (dim,) = op_args(args[1:], kwargs, ("dim", 0))
    ndim = tensors[0].ndim + 1
    if dim % ndim != 0 or ndim != 3:
        raise NotImplementedError("Int4Tensor supports stack only of 2D weights along a new "
                                  "expert dim 0")
    return torch.cat([x.unsqueeze(0) for x in tensors], dim=0)


@Int4Tensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])
def _(func, args, kwargs):
    t = args[0]
    nd = t.ndim
    if func is aten.t.default:
        dims = (0, 1) if nd == 2 else None
    elif func is aten.transpose.int:
        dims = tuple(_normalize_dim(d, nd) for d in args[1:3])
    else:
        perm = [_normalize_dim(d, nd) for d in args[1]]
        identity = list(range(nd))
        dims = (0, 0) if perm == identity else (
            (nd - 2, nd - 1) if perm == identity[:-2] + [nd - 1, nd - 2] else None)
    if dims is not None and dims[0] == dims[1]:
        return _view_op(func, args, kwargs, _replace(t, t.shape))
    if dims is None or set(dims) != {nd - 2, nd - 1}:
        raise NotImplementedError(f"Int4Tensor supports transposing only its last two dims "
                                  f"({func} on shape {list(t.shape)})")
    out = _transposed(t)
    if not t.is_transposed:  # a view of the stored weight: eager calls use t's plans
        out._as_transposed_view_of(t)
    return _view_op(func, args, kwargs, out)


@Int4Tensor.implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _(func, args, kwargs):
    return _reshape(args[0], args[1])


@Int4Tensor.implements([aten.unsqueeze.default])
def _(func, args, kwargs):
    t, dim = args
    shape = list(t.shape)
    shape.insert(dim % (t.ndim + 1), 1)
    return _view_op(func, args, kwargs, _reshape(t, shape))


@Int4Tensor.implements([aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default])
def _(func, args, kwargs):
    t = args[0]
    dims = args[1] if len(args) > 1 else range(t.ndim)
    dims = {_normalize_dim(d, t.ndim) for d in ([dims] if isinstance(dims, int) else dims)}
    shape = [s for i, s in enumerate(t.shape) if not (i in dims and s == 1 and t.ndim > 2)]
    return _view_op(func, args, kwargs, _reshape(t, shape))


@Int4Tensor.implements([aten.empty_like.default, aten.zeros_like.default])
def _(func, args, kwargs):
    """An Int4Tensor of the same layout; ``zeros_like`` stands for an all-zero weight."""
    t = args[0]
    dtype, device = kwargs.get("dtype"), kwargs.get("device")
    if dtype not in (None, t.dtype):
        raise TypeError(f"{func} of an Int4Tensor keeps its dtype {t.dtype}, got {dtype}")
    return t._with_data(lambda x: func(x, device=device))


@Int4Tensor.implements([aten.equal.default])
def _(func, args, kwargs):
    a, b = args
    if not isinstance(a, Int4Tensor) or not isinstance(b, Int4Tensor) or a._mismatch(b):
        return False
    return all(torch.equal(x, getattr(b, n)) for n, x in a._tensors().items())


# ---- compute ops ---------------------------------------------------------------------------
def _check_activation(x: torch.Tensor, op: str) -> None:
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op} with an Int4Tensor takes bf16/fp16/fp32 activations, "
                        f"got {x.dtype}")


def _dense(t, dtype: torch.dtype):
    return t.dequantize(dtype) if isinstance(t, Int4Tensor) else t


def _check_linear(x: torch.Tensor, weight: "Int4Tensor") -> None:
    """What linear needs of its operands; eager calls check it once per activation signature
    (the weight's layout cannot change between calls)."""
    if weight.ndim != 2:
        raise ValueError(f"linear needs a 2D weight, got Int4Tensor of shape {list(weight.shape)}"
                         " (use torch.bmm for 3D expert weights)")
    _check_activation(x, "linear")
    if x.ndim == 0 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear input's last dim must be K = {weight.shape[-1]}, got input "
                         f"shape {list(x.shape)} for weight shape {list(weight.shape)}")


@Int4Tensor.implements([F.linear, aten.linear.default])
def _(func, args, kwargs):
    """``F.linear(x [*, K], W [N, K], bias [N] | None) -> [*, N]``."""
    x, weight, bias = linear_operands(Int4Tensor, args, kwargs)
    planned = kernels.cached_plan("linear", x, weight)
    if planned is not None:  # a repeated eager call: operands checked, kernel bound
        return planned(x, bias)
    if weight.is_transposed or not x.numel() or not weight.qdata.numel():
        # transposed: contracts over the stored N, no int4 kernel for that; empty: nothing to
        # compute (dense semantics)
        _check_linear(x, weight)
        return F.linear(x, weight.dequantize(x.dtype), bias)
    # a slice's strided fields are refused by the kernels that need contiguous ones (see
    # kernels.dispatch); the reference path computes it
    return kernels.int4_linear(x, weight, bias, check=_check_linear)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    """``t.shape``, read off the inner qdata for an Int4Tensor: a subclass's ``.shape`` goes
    through ``__torch_function__`` (microseconds on every eager call)."""
    if not isinstance(t, Int4Tensor):
        return tuple(t.shape)
    *lead, n, half_k = t.qdata.shape
    return (*lead, half_k * 2, n) if t.is_transposed else (*lead, n, half_k * 2)


def _stored(b: "Int4Tensor") -> "Int4Tensor":
    """The stored weight of a transposed view, for eager calls (its plans live there)."""
    return b._stored_weight(_transposed)


def weight_first_activation(y: torch.Tensor) -> torch.Tensor:
    """``y [.., K, M]`` of ``W @ y`` as the kernels' rows ``[.., M, K]``, row-contiguous with
    canonical strides: ``y.unsqueeze(-1).transpose(-2, -1)`` is contiguous but keeps a row
    stride of 1, which the GEMV's 16-byte row alignment check refuses (``view`` recomputes
    it)."""
    x = y.transpose(-2, -1)
    return x.view(x.shape) if x.is_contiguous() else x.contiguous()


def _matmul(a: torch.Tensor, b: torch.Tensor, op: str, sa=None, sb=None) -> torch.Tensor:
    """Dense-semantics ``a @ b`` where either operand may be an Int4Tensor (``sa``, ``sb``:
    their shapes, when the caller has them).

    The int4 kernels compute ``x @ W.T`` for a stored ``W [.., N, K]``, i.e. ``x @ b`` for a
    transposed Int4Tensor ``b [.., K, N]``; every other combination dequantizes.
    """
    sa = _shape(a) if sa is None else sa
    sb = _shape(b) if sb is None else sb
    if not sa or not sb or sa[-1] != sb[-2 if len(sb) > 1 else -1]:
        raise ValueError(f"{op}: shapes {list(a.shape)} and {list(b.shape)} cannot be "
                         "multiplied")
    for x in (a, b):  # dense torch refuses an int operand too; never truncate the weight
        if not isinstance(x, Int4BaseTensor) and not x.is_floating_point():
            raise TypeError(f"{op} of an Int4Tensor with a {x.dtype} tensor: the other operand "
                            "must be floating-point (bf16/fp16/fp32)")
    dense_a = not isinstance(a, Int4BaseTensor)
    # (b's numel from its qdata: the subclass's .numel() goes through __torch_function__)
    if dense_a and isinstance(b, Int4Tensor) and b.is_transposed and a.numel() \
            and b.qdata.numel():
        _check_activation(a, op)
        stored = _stored(b) if kernels.is_eager(a) else _transposed(b)
        if len(sb) == 2:
            return kernels.int4_linear(a, stored, None)
        if len(sa) == 3 and sa[0] == sb[0]:
            return kernels.int4_bmm(a, stored)
    if not dense_a and isinstance(a, Int4Tensor) and not a.is_transposed \
            and isinstance(b, torch.Tensor) and not isinstance(b, Int4BaseTensor) \
            and len(sa) == len(sb) and len(sa) in (2, 3) and b.numel() and a.qdata.numel():
        # W @ x, the weight first: transformers' batched_mm experts (its decode default on GPU)
        # call torch.bmm(W[expert_ids], x.unsqueeze(-1)); (x^T @ W^T)^T is the kernels' form
        if len(sa) == 2 or sa[0] == sb[0]:
            x = weight_first_activation(b)
            _check_activation(x, op)
            out = kernels.int4_linear(x, a, None) if len(sa) == 2 else kernels.int4_bmm(x, a)
            return out.transpose(-2, -1)
    dtype = a.dtype if dense_a else (b.dtype if not isinstance(b, Int4BaseTensor) else a.dtype)
    return torch.matmul(_dense(a, dtype), _dense(b, dtype))


@Int4Tensor.implements([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
def _(func, args, kwargs):
    return _matmul(args[0], args[1], "matmul")


@Int4Tensor.implements([aten.mm.default, aten.bmm.default, torch.mm, torch.bmm, torch.Tensor.mm,
                        torch.Tensor.bmm])
def _(func, args, kwargs):
    a, b = args
    want = 2 if func in (aten.mm.default, torch.mm, torch.Tensor.mm) else 3
    name = "mm" if want == 2 else "bmm"
    sa, sb = _shape(a), _shape(b)
    if len(sa) != want or len(sb) != want:
        raise ValueError(f"{name}: expects {want}D operands, got {list(sa)} and {list(sb)}")
    if want == 3 and sa[0] != sb[0]:
        raise ValueError(f"bmm: batch sizes differ, {list(sa)} and {list(sb)}")
    return _matmul(a, b, name, sa, sb)


@Int4Tensor.implements([aten.addmm.default])
def _(func, args, kwargs):
    bias, a, b = args
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    out = _matmul(a, b, "addmm")
    return (out if alpha == 1 else alpha * out) + (bias if beta == 1 else beta * bias)


# ---- grouped matmul (MoE experts) ----------------------------------------------------------
# transformers' default experts implementation calls ``F.grouped_mm(x, w.transpose(-2, -1),
# offs=offs)`` (aten._grouped_mm). bf16 activations on a plain bf16-activation weight go to
# kernels.int4_grouped_mm (our grouped GEMV on CUDA for decode-sized groups, else the
# reference); every other combination has dense semantics on the dequantized weights.


def check_grouped(x: torch.Tensor, weight_shape, offs: torch.Tensor) -> None:
    """What ``_grouped_mm(x [T, K], b [E, K, N], offs [E])`` needs, for ``b`` of logical shape
    ``weight_shape`` (the dense op's own errors, raised before a kernel reads ``offs``)."""
    e, k = weight_shape[0], weight_shape[-2]
    if x.shape[-1] != k:
        raise ValueError(f"grouped_mm: activation {list(x.shape)} has K = {x.shape[-1]}, the "
                         f"expert weights {list(weight_shape)} K = {k}")
    if offs.dtype != torch.int32 or offs.ndim != 1 or offs.numel() != e \
            or offs.device != x.device:
        raise ValueError(f"grouped_mm: offs must be int32 [{e}] on {x.device} (cumulative rows "
                         f"per expert), got {offs.dtype} {list(offs.shape)} on {offs.device}")


def _group_of_rows(offs: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.searchsorted(offs.to(torch.int64), torch.arange(rows, device=offs.device),
                              right=True).clamp(max=offs.numel() - 1)


def pre_scaled_rows(x: torch.Tensor, pre: torch.Tensor | None, offs: torch.Tensor):
    """``x [T, K]`` times its expert's ``act_pre_scale [E, K]`` row by row (the expert of a row
    found from ``offs`` on the device: no host synchronization), or ``x`` without one. The
    kernels read only q, scale and zero point, so this is how an AWQ-style factor reaches them."""
    if pre is None:
        return x
    return x * pre.to(x.dtype)[_group_of_rows(offs, x.shape[0])]


# Registered on the base class: the preshuffled layout (after convert_model_to_packed_tensors_)
# takes the same reference path through its own dequantize().
@Int4BaseTensor.implements([aten._grouped_mm.default])
def grouped_mm_impl(func, args, kwargs):
    """``_grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None)`` with either operand
    an int4 tensor (typically ``mat_b = w.transpose(-2, -1)``, ``w [E, N, K]``, so ``mat_b
    [E, K, N]``; ``mat_a [T, K]`` bf16/fp16/fp32 sorted by expert, ``offs [E]`` int32 cumulative
    row counts; empty experts have equal consecutive offsets; rows from ``offs[-1]`` on belong
    to no expert and come out 0). ``bias [E, N]`` is added per group. The MoE case (bf16
    ``mat_a [T, K]``, ``mat_b`` a transposed plain Int4Tensor with bf16 activations, offs, no
    bias) runs :func:`kernels.int4_grouped_mm`; every other one dequantizes the Int4Tensor to
    the activation dtype and runs the dense op."""
    a, b, offs, bias, out_dtype = op_args(args, kwargs, ("mat_a", None), ("mat_b", None),
                                          ("offs", None), ("bias", None), ("out_dtype", None))
    if (isinstance(b, Int4Tensor) and not isinstance(a, Int4BaseTensor) and b.is_transposed
            and b.activation_dtype == "bf16" and a.dtype == torch.bfloat16 and a.ndim == 2
            and len(_shape(b)) == 3 and offs is not None and bias is None
            and out_dtype in (None, torch.bfloat16) and a.numel() and b.qdata.numel()):
        check_grouped(a, _shape(b), offs)
        return kernels.int4_grouped_mm(pre_scaled_rows(a, b.act_pre_scale, offs), _stored(b),
                                       offs)
    dense = a if not isinstance(a, Int4BaseTensor) else b
    if isinstance(dense, Int4BaseTensor):
        dtype = a.dtype
    else:
        _check_activation(dense, "grouped_mm")
        dtype = dense.dtype
    a, b = (t.dequantize(dtype) if isinstance(t, Int4BaseTensor) else t for t in (a, b))
    out = kernels.reference.grouped_mm_dense(a, b, offs, out_dtype)
    if bias is not None:
        if out.ndim == 2 and offs is not None:  # 2D x 3D: one bias row per group of rows
            bias = bias[_group_of_rows(offs, out.shape[0])]
        elif out.ndim == 3 and bias.ndim == 2:
            bias = bias.unsqueeze(1)
        out = out + bias.to(out.dtype)
    return out
