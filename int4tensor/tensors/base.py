"""The shared mechanism of int4tensor's tensor subclasses.

A subclass declares its fields once::

    tensor_data_names = ("qdata", "scale", "zero_point")   # inner tensors
    tensor_attribute_names = ("block_size", "shape")       # plain metadata

and gets from this module: ``__tensor_flatten__``/``__tensor_unflatten__`` (torch.compile),
pickling for ``torch.save``, a ``repr``, an op table filled with the :meth:`implements`
decorator, and the ops whose meaning is "do the same to every inner tensor" (detach, alias,
clone, contiguous, ``.to()``, pinning) plus a checked ``copy_`` and ``param.data = ...``. Ops
that are not registered raise ``NotImplementedError`` naming the op and the class, never a
crash deep in torch.

A subclass also defines ``_layout_problem()`` (do the fields agree with each other and the
attributes?); its constructor calls :meth:`Int4BaseTensor._validate`, and so do unpickling and
``__tensor_unflatten__`` (through the constructor), so no tensor with contradictory fields is
ever built from a file or a pickle.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import threading
import weakref
from typing import Any, Callable, ClassVar

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

aten = torch.ops.aten

OpImpl = Callable[[Any, tuple, dict], Any]


class LayoutError(ValueError):
    """A tensor's fields contradict each other or its attributes (``problem`` says how)."""

    def __init__(self, class_name: str, problem: str):
        super().__init__(f"inconsistent {class_name}: {problem}")
        self.problem = problem


class Int4BaseTensor(torch.Tensor):
    """Base class: a wrapper tensor whose logical value is computed from inner tensors."""

    tensor_data_names: ClassVar[tuple[str, ...]] = ()
    optional_tensor_data_names: ClassVar[tuple[str, ...]] = ()  # may be None
    tensor_attribute_names: ClassVar[tuple[str, ...]] = ()

    # ---- op tables -------------------------------------------------------------------------
    @classmethod
    def implements(cls, funcs) -> Callable[[OpImpl], OpImpl]:
        """Register ``impl(func, args, kwargs)`` for aten ops and/or torch functions.

        aten ops (``torch.ops.aten.x.default`` or the packet ``torch.ops.aten.x``) are looked up
        in ``__torch_dispatch__``; anything else (``F.linear``, ``torch.bmm``) in
        ``__torch_function__``. Subclasses inherit their parents' registrations.
        """
        funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]

        def register(impl: OpImpl) -> OpImpl:
            for func in funcs:
                is_aten = isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
                table_name = "_aten_impls" if is_aten else "_torch_function_impls"
                if table_name not in cls.__dict__:
                    setattr(cls, table_name, {})
                cls.__dict__[table_name][func] = impl
            pending = [cls]  # registrations after a lookup: forget what this class tree found
            while pending:
                klass = pending.pop()
                klass.__dict__.get("_impl_cache", {}).clear()
                pending += klass.__subclasses__()
            return impl

        return register

    @classmethod
    def _find_impl(cls, table_name: str, func) -> OpImpl | None:
        # found once per class and op: this runs on every call of every op
        cache = cls.__dict__.get("_impl_cache")
        if cache is None:
            cache = {}
            setattr(cls, "_impl_cache", cache)
        try:
            return cache[(table_name, func)]
        except KeyError:
            impl = cache[(table_name, func)] = cls._lookup_impl(table_name, func)
            return impl
        except TypeError:  # an unhashable callable
            return cls._lookup_impl(table_name, func)

    @classmethod
    def _lookup_impl(cls, table_name: str, func) -> OpImpl | None:
        keys = (func, getattr(func, "overloadpacket", None))
        for klass in cls.__mro__:
            table = klass.__dict__.get(table_name)
            if table:
                for key in keys:
                    if key is not None and key in table:
                        return table[key]
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._find_impl("_torch_function_impls", func)
        if impl is not None:
            return impl(func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            try:
                return func(*args, **kwargs)
            except (NotImplementedError, torch.OutOfMemoryError):
                raise  # an OOM inside a supported op is not an unsupported op
            except RuntimeError as e:
                # Composite functions (torch.fft.fft, ...) check dtypes in C++ before any aten
                # op reaches __torch_dispatch__; name the op instead of torch's internal error.
                # NotImplementedError is a RuntimeError: callers catching that still do.
                name = getattr(func, "__qualname__", None) or getattr(func, "__name__", func)
                raise NotImplementedError(
                    f"{cls.__name__} does not support {name} (torch said: {e}); supported ops "
                    "are listed in docs/ops.md (dequantize() first to use it as a dense tensor)"
                ) from e

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._find_impl("_aten_impls", func)
        if impl is not None:
            return impl(func, args, kwargs)
        raise NotImplementedError(
            f"{cls.__name__} does not support the op {func}; supported ops are listed in "
            "docs/ops.md (dequantize() first to use it as a dense tensor)"
        )

    # ---- fields ----------------------------------------------------------------------------
    # Constructors take ``cls(*tensor_data, **attributes, **optional_tensor_data)``, with
    # parameters named as the declared fields.
    # The protocol serialization, checkpoints and torch.compile use: ``inner_tensors`` /
    # ``attribute_values`` take a tensor apart, ``from_fields`` puts it back together.
    def inner_tensors(self) -> dict[str, torch.Tensor]:
        """Inner tensors by name, required first, absent optional ones left out."""
        names = self.tensor_data_names + self.optional_tensor_data_names
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def attribute_values(self) -> list[Any]:
        """The values of :attr:`tensor_attribute_names`, in that order."""
        return [getattr(self, name) for name in self.tensor_attribute_names]

    @classmethod
    def from_fields(cls, tensors: dict[str, torch.Tensor], attributes: list[Any],
               validate: bool = True) -> "Int4BaseTensor":
        """``cls(...)`` from fields by name. ``validate=False`` is for the ops that derive a
        tensor from checked ones by construction (views, transposes, ``.to``, cat): they skip
        the consistency check, which costs tens of microseconds, on hot paths."""
        optional = {n: tensors.get(n) for n in cls.optional_tensor_data_names}
        named = dict(zip(cls.tensor_attribute_names, attributes))
        args = [tensors[n] for n in cls.tensor_data_names]
        if validate:
            return cls(*args, **named, **optional)
        _derived.active = True
        try:
            return cls(*args, **named, **optional)
        finally:
            _derived.active = False

    # The short names the ops inside tensors/ use.
    _tensors = inner_tensors
    _attributes = attribute_values

    @classmethod
    def _build(cls, tensors: dict[str, torch.Tensor], attributes: list[Any],
               validate: bool = True) -> "Int4BaseTensor":
        return cls.from_fields(tensors, attributes, validate)

    def _with_data(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Int4BaseTensor":
        """A new tensor of the same class and metadata with ``fn`` applied to each inner tensor
        (same shapes, dtypes at most re-typed together: consistent by construction)."""
        return self._build({n: fn(t) for n, t in self._tensors().items()}, self._attributes(),
                           validate=False)

    def __getstate__(self) -> dict:
        # pickled state: the fields, not what dispatch caches on this tensor
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_dispatch_")}

    def _dispatch_cached(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()``, kept on this tensor under ``_dispatch_<name>`` (eager dispatch only:
        never pickled, dropped by ``copy_``)."""
        key = "_dispatch_" + name
        value = self.__dict__.get(key)
        if value is None:
            value = self.__dict__[key] = make()
        return value

    def _drop_dispatch_caches(self) -> None:
        """Forget what dispatch kept on this tensor (plans, shapes, views): after its inner
        tensors' values or identities change, decisions are remade."""
        for key in [k for k in self.__dict__ if k.startswith("_dispatch_")]:
            del self.__dict__[key]

    # ---- block-size facts every layout shares ----------------------------------------------
    @property
    def group_size(self) -> int:
        return max(self.block_size)

    @property
    def is_transposed(self) -> bool:
        """True when the logical last two dims are ``(K, N)`` (a transposed view)."""
        return self.block_size[-2] != 1

    @property
    def stored_n(self) -> int:
        """N of the stored (untransposed) weight; the padded layouts store more rows than
        that."""
        shape = self._logical_shape()
        return shape[-1] if self.is_transposed else shape[-2]

    def _copy_source(self, src: torch.Tensor) -> "Int4BaseTensor":
        """What ``self.copy_(src)`` copies from: ``src`` itself if it is int4, else ``src``
        quantized like ``self``; a layout may also accept other int4 layouts here."""
        return src if isinstance(src, Int4BaseTensor) else self._quantize_like(src)

    def _logical_shape(self) -> tuple[int, ...]:
        """``tuple(self.shape)``, kept on the tensor: a subclass's ``.shape`` and ``.ndim`` go
        through ``__torch_function__`` (~2 us each on every eager call)."""
        return self._dispatch_cached("shape", lambda: tuple(self.shape))

    def _as_transposed_view_of(self, source: "Int4BaseTensor") -> "Int4BaseTensor":
        """Mark this tensor, made by transposing the stored weight ``source``, as its view:
        eager calls on it use ``source``'s dispatch plans (see :meth:`_stored_weight`). The
        reference is weak: ``source`` keeps its view (the eager transpose cache), and a cycle
        would hold a deleted model's memory until the garbage collector runs."""
        self.__dict__["_dispatch_transposed_of"] = weakref.ref(source)
        return self

    def _stored_weight(self, transpose: Callable[["Int4BaseTensor"], "Int4BaseTensor"]):
        """The stored (untransposed) weight of this transposed view, where eager dispatch
        plans live: the tensor it was transposed from (``w.transpose(-2, -1)`` on every forward
        finds the parameter's plans), else ``transpose(self)``, made once and kept here."""
        ref = self.__dict__.get("_dispatch_transposed_of")
        source = ref() if ref is not None else None
        return source if source is not None else \
            self._dispatch_cached("stored", lambda: transpose(self))

    def __tensor_flatten__(self):
        return list(self._tensors()), self._attributes()

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, attributes, outer_size, outer_stride):
        return cls._build(inner_tensors, attributes)

    # ---- consistency ---------------------------------------------------------------------
    #: Values for fields absent from states pickled by older versions.
    #: (torchao's optional tensor attributes): files and pickles written before an attribute
    #: existed load with this value; the constructor's default is the same.
    attribute_defaults: ClassVar[dict[str, Any]] = {}

    def _layout_problem(self) -> str | None:
        """Hook: the first inconsistency between the inner tensors and the attributes (shapes,
        dtypes, devices, block size), else None. Checks metadata only, never values."""
        return None

    def _validate(self) -> None:
        """Raise ``ValueError`` if the fields contradict each other. Run by every constructor,
        by unpickling and by ``__tensor_unflatten__`` outside tracing (where the inner tensors
        are fake and their shapes may be symbolic, the check is skipped)."""
        if getattr(_derived, "active", False):
            return
        # the check reads this wrapper's shape and dtype: skip __torch_function__ for those
        with torch._C.DisableTorchFunctionSubclass():
            if _is_fake(self._tensors().values()):
                return
            problem = self._layout_problem()
        if problem is not None:
            raise LayoutError(type(self).__name__, problem)

    def __setstate__(self, state) -> None:
        """Unpickling (``torch.load``, also with ``weights_only=True``) sets the fields without
        running the constructor: check them as the constructor would."""
        dict_state = state[0] if isinstance(state, tuple) else state
        if not isinstance(dict_state, dict):
            raise ValueError(f"cannot unpickle {type(self).__name__}: its state is a "
                             f"{type(dict_state).__name__}, not a dict of fields")
        torch._utils._set_obj_state(self, state)
        for name, default in self.attribute_defaults.items():
            if not hasattr(self, name):
                setattr(self, name, default)
        for name in self.optional_tensor_data_names:
            if not hasattr(self, name):
                setattr(self, name, None)
        names = self.tensor_data_names + self.tensor_attribute_names
        missing = [n for n in names if n != "shape" and n not in self.__dict__]
        if missing:
            raise ValueError(f"cannot unpickle {type(self).__name__}: its state lacks {missing} "
                             f"(it holds {sorted(dict_state)}; saved from another tensor class?)")
        self._validate()

    def _quantize_like(self, dense: torch.Tensor) -> "Int4BaseTensor":
        """Hook for ``copy_`` from a dense tensor: a tensor of this class holding ``dense``."""
        raise TypeError(f"copy_ into {type(self).__name__} from a dense tensor is not supported;"
                        f" copy from a {type(self).__name__}")

    def _check_to(self, device, dtype) -> None:
        """Hook: raise if this tensor cannot move to ``device`` / be cast to ``dtype``."""

    def _stable_hash_for_caching(self) -> str:
        """Metadata key for torch.compile's AOT autograd cache (values are not part of it)."""
        inner = [(n, str(t.dtype), tuple(t.shape), t.stride(), t.device.type)
                 for n, t in self._tensors().items()]
        key = repr((type(self).__qualname__, tuple(self.shape), self._attributes(), inner,
                    _code_fingerprint()))
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        def describe(t):
            if isinstance(t, torch.Tensor):
                return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            return repr(list(t)) if isinstance(t, tuple) else repr(t)

        parts = [f"{n}={describe(v)}"
                 for n, v in zip(self.tensor_attribute_names, self._attributes())]
        parts.append(f"dtype={self.dtype}, device={self.device.type}")
        parts += [f"{n}={describe(v)}" for n, v in self._tensors().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    def _mismatch(self, other: "Int4BaseTensor") -> str | None:
        """Describe the first difference in type, shape, metadata or inner dtypes, else None."""
        if type(other) is not type(self):
            return f"type {type(other).__name__} != {type(self).__name__}"
        if self.shape != other.shape:
            return f"shape {list(other.shape)} != {list(self.shape)}"
        for name in self.tensor_attribute_names:
            if getattr(self, name) != getattr(other, name):
                return f"{name} {getattr(other, name)} != {getattr(self, name)}"
        mine, theirs = self._tensors(), other._tensors()
        if mine.keys() != theirs.keys():
            return f"inner tensors {list(theirs)} != {list(mine)}"
        for name, a in mine.items():
            b = theirs[name]
            if a.dtype != b.dtype or a.shape != b.shape:
                return (
                    f"{name} {b.dtype}{list(b.shape)} != {a.dtype}{list(a.shape)}"
                )
        return None


implements = Int4BaseTensor.implements

# Set while an op builds a tensor derived from checked ones (``_build(..., validate=False)``).
_derived = threading.local()


@functools.lru_cache(maxsize=None)
def _code_fingerprint() -> str:
    """A hash of the package's source files. torch.compile's caches key a graph with tensor
    subclass inputs on the subclass metadata above, not on the code of its ops: without this,
    a graph compiled by an older int4tensor would be reused after an upgrade."""
    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _is_fake(tensors) -> bool:
    """True while tracing (torch.compile, FakeTensorMode): inner tensors are fake."""
    return any(isinstance(t, _fake_tensor_class()) for t in tensors)


@functools.lru_cache(maxsize=None)
def _fake_tensor_class() -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def linear_operands(cls: type, args: tuple, kwargs: dict) -> tuple:
    """``(x, weight, bias)`` of ``F.linear`` / ``aten.linear`` on an int4 ``weight`` of class
    ``cls``; raises for any other combination (an int4 input, a weight of another class)."""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(weight, cls) or isinstance(x, Int4BaseTensor):
        raise NotImplementedError(f"{cls.__name__} supports linear with the {cls.__name__} as "
                                  "the weight (second argument) and a dense input")
    return x, weight, bias


def op_args(args: tuple, kwargs: dict, *defaults: tuple[str, Any]) -> list[Any]:
    """An aten op's arguments after the first few positional ones, by position or keyword,
    with defaults: ``dim, start = op_args(args[1:], kwargs, ("dim", 0), ("start", None))``."""
    return [args[i] if i < len(args) else kwargs.get(name, default)
            for i, (name, default) in enumerate(defaults)]


@implements([aten.detach.default, aten.alias.default])
def _(func, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0]._with_data(func))


@implements([aten.clone.default])
def _(func, args, kwargs):
    out = args[0]._with_data(lambda t: t.clone(**kwargs))
    return return_and_correct_aliasing(func, args, kwargs, out)


@implements([aten.contiguous.default, torch.Tensor.contiguous])
def _(func, args, kwargs):
    """Contiguous inner tensors. ``Tensor.contiguous`` is intercepted before torch's own early
    return: the wrapper always reports contiguous strides, its fields may not be (a slice)."""
    self = args[0]
    if all(t.is_contiguous() for t in self._tensors().values()):
        return self
    return self._with_data(torch.Tensor.contiguous)


@implements([torch.Tensor.transpose, torch.transpose, torch.Tensor.t, torch.t,
             torch.Tensor.mT.__get__])
def _(func, args, kwargs):
    """Eager ``w.transpose(-2, -1)`` / ``w.t()`` / ``w.mT`` return one view kept on ``w``: a
    model makes it on every forward (transformers' MoE experts before each grouped_mm), and
    the aten op with its aliasing bookkeeping costs ~20 us a call on this project's CPU machine
    against ~1 us for the lookup. Other dims, compilation and keyword arguments take the aten
    op (``__torch_dispatch__``)."""
    t = args[0]

    def aten_op():
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    if kwargs or torch.compiler.is_compiling() or not isinstance(t, Int4BaseTensor):
        return aten_op()
    nd = len(t._logical_shape())
    if func in (torch.Tensor.t, torch.t):
        dims = (0, 1) if nd == 2 else None
    elif func == torch.Tensor.mT.__get__:  # (a new method-wrapper on each access)
        dims = (nd - 2, nd - 1) if nd >= 2 else None
    else:
        dims = args[1:3] if len(args) == 3 and all(isinstance(d, int) for d in args[1:3]) \
            else None
        dims = tuple(d % nd for d in dims) if dims is not None and nd else None
    if dims is None or set(dims) != {nd - 2, nd - 1}:
        return aten_op()

    def unaliased():
        # the same fields without the autograd view's strong reference to ``t`` (its _base):
        # kept on ``t``, that reference would make a cycle the garbage collector cannot see
        view = aten_op()
        out = type(view)._build(view._tensors(), view._attributes(), validate=False)
        return out._as_transposed_view_of(t) if "_dispatch_transposed_of" in view.__dict__ \
            else out
    return t._dispatch_cached("transposed", unaliased)


@implements([aten.is_pinned.default])
def _(func, args, kwargs):
    return all(t.is_pinned() for t in args[0]._tensors().values())


@implements([aten._pin_memory.default])
def _(func, args, kwargs):
    return args[0]._with_data(torch.Tensor.pin_memory)


@implements([torch.Tensor.to])
def _(func, args, kwargs):
    """``Tensor.to`` semantics: ``self`` when nothing changes, else a converted copy."""
    self = args[0]
    kwargs = dict(kwargs)
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    same_device = device is None or torch.device(device) == self.device
    if same_device and (dtype is None or dtype == self.dtype) and not copy:
        return self
    return _to_copy(self, device=device, dtype=dtype, non_blocking=non_blocking)


@implements([aten._to_copy.default])
def _(func, args, kwargs):
    return _to_copy(args[0], **kwargs)


def _to_copy(self, device=None, dtype=None, non_blocking=False, **_):
    """``.to(device)`` moves every inner tensor; ``.to(float_dtype)`` re-types scale/zero."""
    self._check_to(device, dtype)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(
            f"{type(self).__name__} can only be cast to a floating dtype (its scale/zero dtype), "
            f"got {dtype}; use .dequantize() for a dense tensor"
        )

    def move(t: torch.Tensor) -> torch.Tensor:
        new_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.to(device=device, dtype=new_dtype, non_blocking=non_blocking, copy=True)

    return self._with_data(move)


@implements([aten.copy_.default])
def _(func, args, kwargs):
    """``dst.copy_(src)`` between tensors of the same class, shape and metadata (in place)."""
    dst, src = args[0], args[1]
    if not isinstance(dst, Int4BaseTensor):
        # dense.copy_(int4), e.g. load_state_dict of a quantized state into a dense model:
        # the dense tensor receives the value the int4 tensor stands for.
        return dst.copy_(src.dequantize(dst.dtype if dst.is_floating_point() else None))
    src = dst._copy_source(src)
    problem = dst._mismatch(src)
    if problem is not None:
        raise ValueError(f"copy_ into {type(dst).__name__}: source differs, {problem}")
    for name, t in dst._tensors().items():
        t.copy_(getattr(src, name))
    dst._drop_dispatch_caches()  # decisions are remade for the new values
    return dst


def _shallow_copy_problem(dst: torch.Tensor, src: torch.Tensor) -> str | None:
    """Why ``dst.data = src`` cannot keep ``dst``'s wrapper (None: it can)."""
    if not isinstance(dst, Int4BaseTensor) or not isinstance(src, Int4BaseTensor):
        return (f"a {type(src).__name__} cannot become the data of a {type(dst).__name__}")
    if src.device != dst.device:
        return f"device {src.device} != {dst.device}"
    return dst._mismatch(src)


@implements([torch._has_compatible_shallow_copy_type,
             aten._has_compatible_shallow_copy_type.default])
def _(func, args, kwargs):
    # True only for the same class, device, shape, metadata and inner dtypes: then
    # ``param.data = new`` swaps the inner tensors (below). nn.Module._apply (``.to``, ``.cuda``)
    # asks this and replaces the whole Parameter otherwise.
    return _shallow_copy_problem(args[0], args[1]) is None


@implements([torch.Tensor.data.__set__])
def _(func, args, kwargs):
    """``param.data = new``: the parameter takes ``new``'s inner tensors (same class, shape,
    metadata, device); anything else raises instead of leaving the old value in place."""
    dst, src = args[0], args[1]
    problem = _shallow_copy_problem(dst, src)
    if problem is not None:
        raise TypeError(f"cannot assign .data of a {type(dst).__name__} "
                        f"{list(dst.shape)}: {problem}; replace the parameter instead "
                        "(int4tensor.quantize.replace_parameter or setattr(module, name, "
                        "nn.Parameter(new, requires_grad=False)))")
    for name in dst.tensor_data_names + dst.optional_tensor_data_names:
        setattr(dst, name, getattr(src, name))
    dst._drop_dispatch_caches()  # plans made for the old inner tensors
