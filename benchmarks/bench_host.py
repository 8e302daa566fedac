"""Host cost per call: what a Python caller pays for each int4 path, beside bf16, in one run.

    python benchmarks/bench_host.py [--out DIR] [--n 4096] [--k 4096]

For every path (bf16 ``F.linear``; ``F.linear`` on the plain and preshuffled layouts with bf16
and fp8 activations, 2D and 3D ``x``; ``torch.bmm`` on 3D expert stacks of both layouts) and
M = 1, 8, 32 rows: the eager wall time per call of a Python loop of calls (synchronized once
at the end, so a path bound by its host work shows that work) and the GPU time per call of
the same call replayed in a CUDA graph (no host work at all); and a chain of 225
``nn.Linear`` modules (1024x1024) called in turn, bf16 and int4, per call, as a decode step
meets a new weight on every call; at M = 1 that chain entered at each depth of the call
(module, ``F.linear``, the op implementation, the plan, the bound kernel, the launch), over
225 distinct weights and over one weight 225 times. A path is host-bound when its
wall time exceeds its GPU time. Writes bench_host.csv to --out and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import graph_time_us, write_csv  # noqa: E402
from int4tensor import Int4PreshuffledTensor, Int4Tensor  # noqa: E402
from int4tensor.kernels import fbgemm, quantize_fp8_rows  # noqa: E402

MS = (1, 8, 32)


def eager_us(fn, calls: int = 2000, warmup: int = 500) -> float:
    """Median over 5 rounds of the wall µs per call of ``calls`` back-to-back calls."""
    for _ in range(warmup):  # first-call planning, allocator, clocks
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[2]


def paths(n: int, k: int, m: int, experts: int) -> dict:
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 128))
    t8 = Int4Tensor(t.qdata, t.scale, t.zero_point, t.block_size, t.shape, activation_dtype="fp8")
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    x3 = x.view(1, m, k)
    we = torch.randn(experts, n // experts, k, dtype=torch.bfloat16, device="cuda") * 0.02
    te = Int4Tensor.from_hp(we, (1, 1, 128)).transpose(-1, -2)  # logical [E, K, N/E]
    xe = torch.randn(experts, m, k, dtype=torch.bfloat16, device="cuda")
    # grouped_mm (transformers' default experts): M rows routed over the experts, sorted
    counts = torch.full((experts,), m // experts, dtype=torch.int32)
    counts[: m % experts] += 1
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    xg = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = {
        "bf16 F.linear": lambda: F.linear(x, w),
        "int4 plain F.linear": lambda: F.linear(x, t),
        "int4 plain F.linear, 3D x": lambda: F.linear(x3, t),
        "int4 plain fp8-act F.linear": lambda: F.linear(x, t8),
        "bf16 bmm (experts)": lambda: torch.bmm(xe, we.transpose(-1, -2)),
        "int4 plain bmm (experts)": lambda: torch.bmm(xe, te),
        "bf16 grouped_mm (experts)": lambda: F.grouped_mm(xg, we.transpose(-1, -2), offs=offs),
        "int4 plain grouped_mm (experts)": lambda: F.grouped_mm(xg, te, offs=offs),
    }
    if fbgemm.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        p = Int4PreshuffledTensor.from_int4_tensor(t)
        p8 = Int4PreshuffledTensor.from_hp_fp8(w)
        pe = Int4PreshuffledTensor.from_int4_tensor(te.transpose(-1, -2)).transpose(-1, -2)
        out.update({
            "int4 preshuffled F.linear": lambda: F.linear(x, p),
            "int4 preshuffled F.linear, 3D x": lambda: F.linear(x3, p),
            "int4 preshuffled fp8-act F.linear": lambda: F.linear(x, p8),
            "int4 preshuffled bmm (experts)": lambda: torch.bmm(xe, pe),
            "fbgemm bf16i4bf16_rowwise (op called directly)":
                lambda: torch.ops.fbgemm.bf16i4bf16_rowwise(x, t.qdata, t.scale, t.zero_point),
            # the two halves of the preshuffled fp8-activation call, each alone
            "fp8 row quantization (kernels.quantize_fp8_rows)": lambda: quantize_fp8_rows(x),
            "fbgemm f8i4bf16_shuffled (op called directly, x quantized before)":
                lambda: torch.ops.fbgemm.f8i4bf16_shuffled(xq, p8.qdata, x_scale, p8.row_scale,
                                                           p8.group_scale),
        })
        xq, x_scale = quantize_fp8_rows(x)
    return out


def layer_sequence_paths(m: int, count: int = 225, size: int = 1024) -> dict:
    """``count`` ``nn.Linear`` modules called in turn, as a decode step calls a model's 225
    linears (Llama-3-8B): each call meets another weight, so what a path keeps per weight is
    not in the CPU's caches the way a loop over one weight keeps it. Timed per pass, reported
    per call."""
    from torch import nn

    from int4tensor import Int4WeightOnlyConfig, quantize_

    def chain():
        return nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in range(count)]).to(
            device="cuda", dtype=torch.bfloat16)

    torch.manual_seed(0)
    bf16, int4 = chain(), chain()
    quantize_(int4, Int4WeightOnlyConfig(group_size=128))
    x = torch.randn(m, size, dtype=torch.bfloat16, device="cuda")

    def each(modules):
        def run():
            for module in modules:
                module(x)  # the same input for all: no dependency, only host cost
        return run
    return {f"bf16 nn.Linear, {count} weights in turn": (each(bf16), count),
            f"int4 plain nn.Linear, {count} weights in turn": (each(int4), count)}


def each(fn, items):
    """A runner calling ``fn`` on every item in turn, results dropped (as a model's step)."""
    def run():
        for item in items:
            fn(item)
    return run


def call_depth_paths(count: int = 225, size: int = 1024) -> dict:
    """Where an eager int4 call's host time goes, M = 1: the chain of ``count`` int4 modules
    entered at successive depths of the call (the module; ``F.linear``; the registered op
    implementation; ``kernels.int4_linear``; the cached plan; the bound kernel; the launch
    alone into a preallocated output), each over ``count`` distinct weights and over one
    weight ``count`` times (what a per-weight object costs when it is not in the CPU caches)."""
    from torch import nn

    from int4tensor import Int4WeightOnlyConfig, kernels, quantize_
    from int4tensor.kernels import cuda_gemv

    torch.manual_seed(0)
    bf16 = nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in range(count)]).to(
        device="cuda", dtype=torch.bfloat16)
    int4 = nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in range(count)]).to(
        device="cuda", dtype=torch.bfloat16)
    quantize_(int4, Int4WeightOnlyConfig(group_size=128))
    x = torch.randn(1, size, dtype=torch.bfloat16, device="cuda")
    impl = Int4Tensor._find_impl("_torch_function_impls", F.linear)
    out = {}
    for spread, pick in (("distinct", lambda ms: list(ms)), ("one", lambda ms: [ms[0]] * count)):
        b_mods, mods = pick(bf16), pick(int4)
        b_ws, ws = [m.weight for m in b_mods], [m.weight for m in mods]
        for w in ws:
            F.linear(x, w)  # plans made
        plans = [next(iter(w.__dict__["_dispatch_plans"].values()))[1] for w in ws]
        gemvs = [cuda_gemv.bind(x, w.qdata, w.scale, w.zero_point, w.group_size) for w in ws]
        launch = cuda_gemv._launch_plan(tuple(x.shape), x.stride(), tuple(ws[0].qdata.shape),
                                        ws[0].qdata.stride(0), ws[0].scale.stride(),
                                        x.device.index, 128, False, ()).launch
        y = torch.empty(1, size, dtype=torch.bfloat16, device="cuda")
        depths = {
            "bf16 module": each(lambda m: m(x), b_mods),
            "bf16 F.linear": each(lambda w: F.linear(x, w), b_ws),
            "int4 module": each(lambda m: m(x), mods),
            "int4 F.linear": each(lambda w: F.linear(x, w), ws),
            "int4 op implementation": each(lambda w: impl(F.linear, (x, w), {}), ws),
            "int4 kernels.int4_linear": each(lambda w: kernels.int4_linear(x, w, None), ws),
            "int4 cached plan": each(lambda p: p(x, None), plans),
            "int4 bound kernel": each(lambda g: g(x), gemvs),
            "int4 launch only": each(lambda w: launch(x, w.qdata, w.scale, w.zero_point, y), ws),
        }
        for name, fn in depths.items():
            out[f"depth: {name}, {count} {spread} weights"] = (fn, count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--no-depths", action="store_true",
                        help="leave out the call-depth rows (M = 1)")
    args = parser.parse_args()
    rows = []
    with torch.no_grad():
        for m in MS:
            bf16 = {}
            timed = {name: (fn, 1) for name, fn in paths(args.n, args.k, m, args.experts).items()}
            timed.update(layer_sequence_paths(m))
            if m == 1 and not args.no_depths:
                timed.update(call_depth_paths())
            for name, (fn, per) in timed.items():
                wall = eager_us(fn, calls=2000 // per + 5, warmup=max(3, 500 // per)) / per
                gpu = graph_time_us([fn]) / per
                base = ("bf16 bmm (experts)" if "bmm" in name else
                        "bf16 grouped_mm (experts)" if "grouped_mm" in name else
                        next(b for b in timed if b.startswith("bf16 nn.Linear"))
                        if "weights in turn" in name else
                        name.split(": ")[0] + ": bf16 module, " + name.split(", ")[-1]
                        if name.startswith("depth") else "bf16 F.linear")
                if name.startswith("bf16") or name.startswith("depth: bf16"):
                    bf16[name] = wall
                rows.append(dict(M=m, path=name, eager_us=round(wall, 1), gpu_us=round(gpu, 1),
                                 eager_vs_bf16=round(wall / bf16[base], 2)))
                print(f"M={m:3d} {name:48s} eager {wall:7.1f} us  gpu {gpu:7.1f} us  "
                      f"{wall / bf16[base]:5.2f}x bf16's eager", flush=True)
    os.makedirs(args.out, exist_ok=True)
    comment = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
               f"{args.n}x{args.k}, {args.experts} experts of {args.n // args.experts}x{args.k}, "
               f"{datetime.date.today()}")
    write_csv(os.path.join(args.out, "bench_host.csv"), comment, rows)


if __name__ == "__main__":
    main()
