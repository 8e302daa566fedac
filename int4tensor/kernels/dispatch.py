"""Which kernel computes an int4 product, as data: one ordered table of candidates per op,
weight layout and activation dtype, decided once per weight and activation signature.

A :class:`Candidate` answers ``why_not(call) -> str | None``: ``None`` takes the call, a string
says why not, in words a user can act on. The first candidate of a table that takes a call
runs it; :func:`explain` reports the refusals of the ones before it. Predicates read only
the :class:`Call` (the activation as the kernel receives it, the weight's fields, the device
type, its compute capability and the optional libraries present), so the ordering and the
reasons are testable on a CPU with the device passed in (``describe(x, w, device_type="cuda",
capability=(9, 0), features=...)``).

Eager decisions are cached on the weight (``weight._dispatch_plans``), keyed by the op and
the activation's shape, strides, dtype, device and 16-byte alignment, together with the call
itself planned for that signature (reshapes, activation rounding, the kernel's launch): a
repeated eager call pays one dictionary lookup and the launch. ``copy_`` clears the cache; ``.to()``, slicing and layout conversion
make new tensors with empty caches.

Eager calls run the kernels directly; under ``torch.compile``, with fake or functional
tensors, or when the activation needs a gradient, the same candidate runs through its
``torch.library`` custom op (fake implementation, autograd formula).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from int4tensor.kernels import cuda_gemv, fbgemm

__all__ = ["Call", "Candidate", "Decision", "cached_plan", "describe", "decide",
           "device_features", "eager_plan", "is_eager", "plan_count", "register", "tables"]


@dataclass(frozen=True)
class Call:
    """What a candidate may look at.

    Attributes:
        op: ``"linear"`` (``x [M, K] @ W.T``, W ``[N, K]``), ``"bmm"`` (``x [B, M, K] @
            W[b].T``, W ``[B, N, K]``) or ``"grouped_mm"`` (``x [T, K]`` sorted by expert,
            W ``[E, N, K]``; the offsets are not part of the call: they stay on the device).
        x: the activation as the kernel receives it (2D for linear, 3D for bmm).
        weight: the stored (never transposed) weight; candidates read its fields only.
        device_type: ``"cuda"``, ``"cpu"``, ...
        capability: the GPU's compute capability, None off CUDA.
        features: optional backends present: ``"nvrtc"`` (our CUDA kernels compile and load),
            ``"fbgemm"`` (fbgemm-gpu-genai's int4 ops), ``"triton"``.
    """

    op: str
    x: torch.Tensor
    weight: Any
    device_type: str
    capability: tuple[int, int] | None
    features: frozenset[str]

    @property
    def rows(self) -> int:
        """Activation rows (per batch entry for bmm, all experts' for grouped_mm)."""
        return self.x.shape[-2] if self.x.ndim >= 2 else 1


@dataclass(frozen=True)
class Candidate:
    """One way to compute an op: ``run(x, weight)`` traceable (custom ops), ``run_eager`` the
    same computation called directly (default: ``run``). With ``takes_bias`` (linear on a
    dense weight) the functions take the bias too, ``run(x, weight, bias)``, so it is added the
    way ``F.linear`` adds it."""

    name: str
    why_not: Callable[[Call], str | None]
    run: Callable[..., torch.Tensor]
    run_eager: Callable[..., torch.Tensor] | None = None
    takes_bias: bool = False
    #: ``bind(x, weight) -> f(x)``: the eager call for activations of x's signature, with its
    #: launch planned once (our CUDA kernels); None: ``run_eager`` each call
    bind: Callable[[torch.Tensor, Any], Callable[[torch.Tensor], torch.Tensor]] | None = None

    def __call__(self, x: torch.Tensor, weight, eager: bool, *bias) -> torch.Tensor:
        return ((self.run_eager or self.run) if eager else self.run)(x, weight, *bias)


@dataclass(frozen=True)
class Decision:
    """The candidate that runs a call and why each one before it was refused."""

    candidate: Candidate
    refused: tuple[tuple[str, str], ...] = field(default=())

    @property
    def backend(self) -> str:
        return self.candidate.name


#: ``(op, layout, activation_dtype) -> [Candidate, ...]``, best first; filled by
#: :func:`register` (int4tensor.kernels registers the tables it builds).
_TABLES: dict[tuple[str, str, str], list[Candidate]] = {}


def register(op: str, layout: str, activation_dtype: str, candidates: list[Candidate]) -> None:
    """Set the ordered candidate table of ``op`` on weights of ``layout`` with
    ``activation_dtype`` activations; its last candidate should take every call."""
    _TABLES[(op, layout, activation_dtype)] = list(candidates)


def tables() -> dict[tuple[str, str, str], list[str]]:
    """The registered tables, as candidate names in order (what docs/kernels.md shows)."""
    return {key: [c.name for c in table] for key, table in _TABLES.items()}


@functools.lru_cache(maxsize=None)
def _cuda_features(device_index: int) -> frozenset[str]:
    found = set()
    if cuda_gemv.is_available() and cuda_gemv.can_compile(device_index):
        found.add("nvrtc")
    if fbgemm.is_available():
        found.add("fbgemm")
    try:
        import triton  # noqa: F401  (ships with torch's CUDA builds)
        found.add("triton")
    except ImportError:
        pass
    return frozenset(found)


def device_features(device: torch.device) -> tuple[tuple[int, int] | None, frozenset[str]]:
    """``(capability, features)`` of a real device, probed once per device."""
    if device.type != "cuda":
        return None, frozenset()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index), _cuda_features(index)


def describe(op: str, x: torch.Tensor, weight, *, device_type: str | None = None,
             capability: tuple[int, int] | None = None,
             features: frozenset[str] | None = None) -> Call:
    """The :class:`Call` for these arguments; ``device_type``/``capability``/``features``
    override what is probed from ``x``'s device (tests of the tables on a CPU)."""
    if device_type is None:
        device_type = x.device.type
        probed_capability, probed_features = device_features(x.device)
        capability = probed_capability if capability is None else capability
        features = probed_features if features is None else features
    return Call(op, x, weight, device_type, capability, frozenset(features or ()))


def decide(call: Call, layout: str) -> Decision:
    """The first candidate of the call's table that takes it, with the earlier refusals."""
    table = _TABLES.get((call.op, layout, call.weight.activation_dtype))
    if table is None:
        raise NotImplementedError(f"no kernels for {call.op} on the {layout} layout with "
                                  f"{call.weight.activation_dtype} activations")
    refused = []
    for candidate in table:
        reason = candidate.why_not(call)
        if reason is None:
            return Decision(candidate, tuple(refused))
        refused.append((candidate.name, reason))
    reasons = "; ".join(f"{name}: {why}" for name, why in refused)
    raise RuntimeError(f"no kernel can run {call.op} of a {layout} weight "
                       f"{list(call.weight.shape)} with activation {list(call.x.shape)} "
                       f"{call.x.dtype} on {call.device_type}: {reasons}")


def is_eager(x: torch.Tensor) -> bool:
    """True for a plain call outside compilation that needs no gradient for ``x``: kernels
    may be called directly, skipping their custom ops."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not (x.requires_grad and torch.is_grad_enabled()))


def _plan_key(op: str, x: torch.Tensor) -> tuple:
    return (op, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15)


def eager_plan(op: str, x: torch.Tensor, weight, build: Callable[[], tuple]) -> Callable:
    """The eager plan of ``op`` for this weight and activation signature: ``build()`` returns
    ``(Decision, plan)`` the first time, cached on the weight; later calls pay one lookup."""
    plans = weight.__dict__.get("_dispatch_plans")
    if plans is None:
        plans = weight.__dict__["_dispatch_plans"] = {}
    key = _plan_key(op, x)
    entry = plans.get(key)
    if entry is None:
        entry = plans[key] = build()
    if _recording is not None:
        _recording.append((weight, op, tuple(x.shape), entry[0]))
    return entry[1]


def plan_count(weight) -> int:
    """How many eager plans :func:`eager_plan` has made for this weight (one per op and
    activation signature)."""
    return len(weight.__dict__.get("_dispatch_plans", ()))


def cached_plan(op: str, x: torch.Tensor, weight) -> Callable | None:
    """The plan :func:`eager_plan` made earlier for ``op`` on this weight and ``x``'s signature,
    or None (none made yet, or the call is not eager): the first thing an op's eager call
    asks, so that a repeated call skips its operand checks and decisions, which were made
    with the plan and cannot change for the same weight and signature."""
    if not is_eager(x):
        return None
    plans = weight.__dict__.get("_dispatch_plans")
    entry = plans.get(_plan_key(op, x)) if plans else None
    if entry is None:
        return None
    if _recording is not None:
        _recording.append((weight, op, tuple(x.shape), entry[0]))
    return entry[1]


#: set by :func:`recording` while explain() runs a model
_recording: list | None = None


class recording:
    """Context manager collecting ``(weight, op, x shape, Decision)`` of every dispatched call."""

    def __enter__(self) -> list:
        global _recording
        self._previous, _recording = _recording, []
        return _recording

    def __exit__(self, *exc) -> None:
        global _recording
        _recording = self._previous
