"""MoE experts as serving engines run them: one grouped matmul over the tokens sorted by expert
(``torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)``, transformers' default experts
implementation), bf16 vs int4, side by side in one run.

    python benchmarks/bench_moe.py [--tokens 1 4 16 64 256 2048] [--shapes mixtral ...] [--out DIR]

For the expert stacks ``[E, N, K]`` of published MoE models and T tokens, each routed to its
top-k experts drawn uniformly (k of the model), the columns are: bf16 ``torch._grouped_mm``
(the floor to beat), ``F.grouped_mm`` on the Int4Tensor stack (what dispatch picks: our grouped
GEMV or the reference path, named in ``int4_backend``), our grouped GEMV called directly at
every T (to show where it stops paying), our Triton tensor-core grouped kernel called directly
at every T (``triton_us``: what dispatch runs above GROUPED_GEMV_MAX_ROWS rows per expert and
for G = 64), our Triton grouped GEMV up to 4 rows per expert (``triton_gemv_us``: what
dispatch runs for G = 64 up to TRITON_GROUPED_GEMV_MAX_ROWS), and today's ``torch.bmm`` path with the rows spread
evenly over all experts where that fits (M <= 64 rows per expert). With fbgemm-gpu-genai, the
same for the stack in fbgemm's preshuffled layout (``convert_model_to_packed_tensors_`` on
Hopper): ``F.grouped_mm`` on it (``preshuffled_backend``) and our grouped GEMV reading it,
called directly at every T. Times are medians inside
CUDA graphs, rotating over 8 routings (different experts and inputs per call, so the active
experts' weights come from HBM; the stacks are larger than L2). ``%copy`` counts only the
active experts' int4 bytes (weights, scales, zero points) against the copy bandwidth measured
in the same run. Writes bench_moe.csv and bench_moe.png (speedup vs bf16 against T, a panel
per stack); ``python benchmarks/bench_moe.py --plot CSV PNG`` redraws the plot from a CSV
(needs matplotlib).

    python benchmarks/bench_moe.py --sweep [--tokens 64 256 2048]

times the Triton grouped kernel's launch configurations instead (bench_moe_sweep.csv), the
data behind ``triton_int4.pick_grouped_config``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth_gbs, graph_time_us, rel_error, write_csv  # noqa: E402
from int4tensor import Int4PreshuffledTensor, Int4WeightOnlyConfig, kernels  # noqa: E402
from int4tensor.kernels import cuda_gemv, fbgemm, reference  # noqa: E402

try:
    from int4tensor.kernels import triton_int4  # noqa: E402  (CUDA builds of torch)
except ImportError:
    triton_int4 = None

#: name -> (model, E, N, K, top_k): the experts' fused gate/up and down projections
SHAPES = {
    "mixtral-gate_up": ("Mixtral-8x7B gate_up", 8, 28672, 4096, 2),
    "mixtral-down": ("Mixtral-8x7B down", 8, 4096, 14336, 2),
    "qwen3-gate_up": ("Qwen3-30B-A3B gate_up", 128, 1536, 2048, 8),
    "qwen3-down": ("Qwen3-30B-A3B down", 128, 2048, 768, 8),
    "deepseek-gate_up": ("DeepSeek-V3 gate_up", 256, 4096, 7168, 8),
    "deepseek-down": ("DeepSeek-V3 down", 256, 7168, 2048, 8),
    "gpt-oss-gate_up": ("gpt-oss-20b-like gate_up", 32, 5760, 2880, 4),
    "gpt-oss-down": ("gpt-oss-20b-like down", 32, 2880, 2880, 4),
}
ROUTINGS = 8
#: launch configurations the sweep times: BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT_X,
#: DEQUANT, BLOCK_K (0: the group size), SWAP_AB; the integer-dot kernel first, then the
#: dequantizing one, then the dequantizing one computing W x^T
SWEEP = [(16, 128, 4, 3, False, False, 0, False), (64, 128, 4, 3, True, False, 0, False),
         (64, 128, 4, 3, True, True, 64, False), (128, 128, 4, 3, True, True, 64, False),
         (256, 128, 8, 3, True, True, 64, False),
         (32, 128, 4, 4, True, True, 64, True), (64, 128, 4, 3, True, True, 64, True),
         (128, 128, 4, 3, True, True, 64, True), (128, 128, 8, 3, True, True, 64, True),
         (128, 256, 8, 3, True, True, 64, True), (256, 128, 8, 3, True, True, 64, True),
         (64, 256, 8, 3, True, True, 64, True), (128, 128, 4, 4, True, True, 128, True)]
#: the sweep's configuration fields, in SWEEP's order
SWEEP_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "SPLIT_X", "DEQUANT", "BLOCK_K",
                "SWAP_AB")


def group_size_for(k: int) -> int:
    """G = 128 where it divides K; gpt-oss's K = 2880 takes G = 64 (the reference path)."""
    return 128 if k % 128 == 0 else 64


def quantized_stack(w: torch.Tensor, g: int):
    """The Int4Tensor of ``w [E, N, K]``, quantized a few experts at a time (bounded memory)."""
    cfg = Int4WeightOnlyConfig(group_size=g)
    return torch.cat([cfg.quantize_weight(chunk) for chunk in w.split(16)], dim=0)


def routing(tokens: int, e: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    choice = torch.rand(tokens, e, generator=gen).argsort(dim=1)[:, :top_k]
    counts = torch.bincount(choice.flatten(), minlength=e)
    return torch.cumsum(counts, 0).to(torch.int32).cuda()


def expert_stacks(e: int, n: int, k: int, g: int):
    """(bf16 ``[E, N, K]`` stack, its Int4Tensor), seeded: the same weights in every run."""
    torch.manual_seed(0)
    w = torch.randn(e, n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    return w, quantized_stack(w, g)


def routed_inputs(tokens: int, e: int, k: int, top_k: int, gen: torch.Generator):
    """ROUTINGS pairs of (offs, x sorted by expert) for ``tokens`` tokens routed top-k."""
    offs = [routing(tokens, e, top_k, gen) for _ in range(ROUTINGS)]
    xs = [torch.randn(tokens * top_k, k, dtype=torch.bfloat16, device="cuda")
          for _ in range(ROUTINGS)]
    return offs, xs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 2048])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-preshuffled", action="store_true",
                        help="skip the preshuffled-layout columns")
    parser.add_argument("--sweep", action="store_true",
                        help="time the Triton grouped kernel's launch configurations")
    parser.add_argument("--plot", nargs=2, metavar=("CSV", "PNG"),
                        help="only redraw the plot of a bench_moe.csv")
    args = parser.parse_args()
    if args.plot:
        return plot(read_csv(args.plot[0]), args.plot[1])
    if args.sweep:
        return sweep(args)
    copy_bw = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy_bw:.0f} GB/s")
    rows = []
    for key in args.shapes:
        model, e, n, k, top_k = SHAPES[key]
        g = group_size_for(k)
        w, t = expert_stacks(e, n, k, g)
        wt, tt = w.transpose(-2, -1), t.transpose(-2, -1)
        p = None
        if fbgemm.is_available() and not args.no_preshuffled:
            try:
                p = Int4PreshuffledTensor.from_int4_tensor(t)
            except Exception as error:  # noqa: BLE001  (reported, the other columns still run)
                print(f"{model}: no preshuffled stack ({error})")
        expert_bytes = n * k // 2 + 2 * 2 * n * (k // g)
        gen = torch.Generator().manual_seed(1)
        for tokens in args.tokens:
            offs, xs = routed_inputs(tokens, e, k, top_k, gen)
            active = sum(int((torch.diff(o, prepend=o.new_zeros(1)) > 0).sum()) for o in offs)
            active_bytes = active / ROUTINGS * expert_bytes
            backend = kernels.explain_call("grouped_mm", xs[0], t).backend
            ref = torch._grouped_mm(xs[0], wt, offs=offs[0])
            dq = reference.grouped_mm(xs[0], t, offs[0])
            out = F.grouped_mm(xs[0], tt, offs=offs[0])
            bf16_us = graph_time_us([lambda x=x, o=o: torch._grouped_mm(x, wt, offs=o)
                                     for x, o in zip(xs, offs)])
            int4_us = graph_time_us([lambda x=x, o=o: F.grouped_mm(x, tt, offs=o)
                                     for x, o in zip(xs, offs)])
            gemv_us = float("nan")
            if cuda_gemv.grouped_operands_problem(xs[0], t.qdata, t.scale, t.zero_point,
                                                  g) is None:
                gemv = cuda_gemv.bind_grouped(xs[0], t.qdata, t.scale, t.zero_point, g)
                assert rel_error(dq, gemv(xs[0], offs[0])) < 1e-2
                gemv_us = graph_time_us([lambda x=x, o=o: gemv(x, o) for x, o in zip(xs, offs)])
            shuffled = dict(preshuffled_us=float("nan"), preshuffled_backend="",
                            preshuffled_gemv_us=float("nan"))
            if p is not None:
                pt = p.transpose(-2, -1)
                shuffled["preshuffled_backend"] = kernels.explain_call("grouped_mm", xs[0], p).backend
                assert rel_error(dq, F.grouped_mm(xs[0], pt, offs=offs[0])) < 1e-2
                shuffled["preshuffled_us"] = graph_time_us(
                    [lambda x=x, o=o: F.grouped_mm(x, pt, offs=o) for x, o in zip(xs, offs)])
                if cuda_gemv.grouped_operands_problem(xs[0], p.qdata, p.group_scale,
                                                      p.group_zero, g) is None:
                    sg = cuda_gemv.bind_grouped(xs[0], p.qdata, p.group_scale, p.group_zero, g,
                                                True)
                    assert rel_error(dq, sg(xs[0], offs[0])[:, :n]) < 1e-2
                    shuffled["preshuffled_gemv_us"] = graph_time_us(
                        [lambda x=x, o=o: sg(x, o) for x, o in zip(xs, offs)])
            triton_us = float("nan")
            if kernels._triton_grouped_why_not(_call(xs[0], t)) is None:
                assert rel_error(dq, triton_int4.int4_grouped_matmul(
                    xs[0], t.qdata, t.scale, t.zero_point, offs[0], g)) < 1e-2
                triton_us = graph_time_us([
                    lambda x=x, o=o, f=(t.qdata, t.scale, t.zero_point):
                    triton_int4.int4_grouped_matmul(x, *f, o, g) for x, o in zip(xs, offs)])
            triton_gemv_us = float("nan")  # up to 4 rows per expert: where it stops paying
            if kernels._triton_grouped_refusal(4, "")(_call(xs[0], t)) is None:
                assert rel_error(dq, triton_int4.int4_grouped_gemv(
                    xs[0], t.qdata, t.scale, t.zero_point, offs[0], g)) < 1e-2
                triton_gemv_us = graph_time_us([
                    lambda x=x, o=o, f=(t.qdata, t.scale, t.zero_point):
                    triton_int4.int4_grouped_gemv(x, *f, o, g) for x, o in zip(xs, offs)])
            bmm_us = float("nan")
            per_expert = -(-tokens * top_k // e)
            if per_expert <= 64:
                xb = torch.randn(e, per_expert, k, dtype=torch.bfloat16, device="cuda")
                bmm_us = graph_time_us([lambda: torch.bmm(xb, tt)])
            row = dict(model=model, E=e, N=n, K=k, G=g, top_k=top_k, tokens=tokens,
                       rows=tokens * top_k, active_experts=round(active / ROUTINGS, 1),
                       bf16_grouped_mm_us=round(bf16_us, 1), int4_us=round(int4_us, 1),
                       int4_backend=backend, speedup=round(bf16_us / int4_us, 2),
                       int4_pct_copy=round(100 * active_bytes / (int4_us * 1e-6) / 1e9 / copy_bw, 1),
                       grouped_gemv_us=round(gemv_us, 1),
                       gemv_speedup=round(bf16_us / gemv_us, 2),
                       triton_us=round(triton_us, 1), triton_speedup=round(bf16_us / triton_us, 2),
                       triton_gemv_us=round(triton_gemv_us, 1),
                       triton_gemv_speedup=round(bf16_us / triton_gemv_us, 2),
                       bmm_all_experts_us=round(bmm_us, 1),
                       preshuffled_us=round(shuffled["preshuffled_us"], 1),
                       preshuffled_backend=shuffled["preshuffled_backend"],
                       preshuffled_speedup=round(bf16_us / shuffled["preshuffled_us"], 2),
                       preshuffled_gemv_us=round(shuffled["preshuffled_gemv_us"], 1),
                       int4_rel_err_vs_reference=round(rel_error(dq, out), 5),
                       int4_rel_err_vs_bf16=round(rel_error(ref, out), 4))
            rows.append(row)
            print(f"{model:26s} T={tokens:5d} rows={tokens * top_k:6d} active={active / ROUTINGS:6.1f}"
                  f"  bf16 {bf16_us:8.1f} us  int4[{backend}] {int4_us:8.1f} us "
                  f"({bf16_us / int4_us:5.2f}x, {row['int4_pct_copy']:5.1f}% copy)"
                  f"  gemv {gemv_us:8.1f}  triton {triton_us:8.1f}  triton_gemv {triton_gemv_us:8.1f}"
                  f"  bmm {bmm_us:8.1f}"
                  f"  preshuffled[{shuffled['preshuffled_backend']}] "
                  f"{shuffled['preshuffled_us']:8.1f} ({row['preshuffled_speedup']:5.2f}x)"
                  f" gemv {shuffled['preshuffled_gemv_us']:8.1f}"
                  f"  err {row['int4_rel_err_vs_reference']:.1e}", flush=True)
            del xs, offs
        del w, t, p
        torch.cuda.empty_cache()
        os.makedirs(args.out, exist_ok=True)  # written after each shape: a cut run keeps its rows
        write_csv(os.path.join(args.out, "bench_moe.csv"),
                  f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
                  f"{copy_bw:.0f} GB/s, {datetime.date.today()}", rows)
    plot(rows, os.path.join(args.out, "bench_moe.png"))


#: (CSV column, label) of the int4 paths the plot shows against bf16 grouped_mm
PLOTTED = [("int4_us", "int4 F.grouped_mm (dispatch)"), ("grouped_gemv_us", "our grouped GEMV"),
           ("triton_us", "our Triton grouped kernel"), ("triton_gemv_us", "our Triton grouped GEMV"),
           ("preshuffled_us", "int4 preshuffled")]


def read_csv(path: str) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def plot(rows: list[dict], path: str) -> None:
    """Speedup over bf16 ``torch._grouped_mm`` against tokens, a panel per expert stack (rows as
    written to the CSV; strings are fine). Missing values (nan) are left out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    stacks = list(dict.fromkeys(r["model"] for r in rows))
    cols = -(-len(stacks) // 2)
    fig, axes = plt.subplots(2, cols, figsize=(4.5 * cols, 7.5), squeeze=False)
    for ax, stack in zip(axes.T.flat, stacks):
        mine = [r for r in rows if r["model"] == stack]
        for i, (column, label) in enumerate(PLOTTED):
            pts = [(int(r["tokens"]), float(r["bf16_grouped_mm_us"]) / float(r[column]))
                   for r in mine if column in r and float(r[column]) == float(r[column])]
            if pts:
                ax.plot(*zip(*pts), marker="osDv^"[i], color=f"C{i}", label=label,
                        lw=2 if i == 0 else 1)
        ax.axhline(1.0, color="gray", lw=0.8, label="bf16 grouped_mm")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{stack} [{mine[0]['E']}x{mine[0]['N']}x{mine[0]['K']}], "
                     f"top {mine[0]['top_k']}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup vs bf16")
    for ax in list(axes.T.flat)[len(stacks):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _call(x, t):
    from int4tensor.kernels.dispatch import describe

    return describe("grouped_mm", x, t)


def sweep(args) -> None:
    """Time every SWEEP configuration of the Triton grouped kernel per shape and T; print
    the best beside bf16 grouped_mm."""
    rows = []
    for key in args.shapes:
        model, e, n, k, top_k = SHAPES[key]
        g = group_size_for(k)
        w, t = expert_stacks(e, n, k, g)
        wt = w.transpose(-2, -1)
        gen = torch.Generator().manual_seed(1)
        for tokens in args.tokens:
            offs, xs = routed_inputs(tokens, e, k, top_k, gen)
            dq = reference.grouped_mm(xs[0], t, offs[0])
            bf16_us = graph_time_us([lambda x=x, o=o: torch._grouped_mm(x, wt, offs=o)
                                     for x, o in zip(xs, offs)])
            default = dict(triton_int4.pick_grouped_config(
                cuda_gemv.rows_per_expert(tokens * top_k, e), g))
            default.setdefault("SPLIT_X", False)
            default.setdefault("DEQUANT", False)
            default.setdefault("SWAP_AB", False)
            default["BLOCK_K"] = min(default.get("BLOCK_K") or g, g)
            dkey = tuple(default[f] for f in SWEEP_FIELDS)
            times = {}
            for entry in SWEEP:
                cfg = dict(zip(SWEEP_FIELDS, entry))
                cfg["BLOCK_K"] = min(cfg["BLOCK_K"] or g, g)
                cfg_key = tuple(cfg[f] for f in SWEEP_FIELDS)
                try:
                    out = triton_int4.int4_grouped_matmul(xs[0], t.qdata, t.scale, t.zero_point,
                                                          offs[0], g, cfg)
                    err = rel_error(dq, out)
                    us = graph_time_us([
                        lambda x=x, o=o, c=cfg, f=(t.qdata, t.scale, t.zero_point):
                        triton_int4.int4_grouped_matmul(x, *f, o, g, c)
                        for x, o in zip(xs, offs)])
                except Exception as error:  # noqa: BLE001  (out of resources: reported)
                    print(f"  {cfg}: {type(error).__name__} {str(error)[:80]}")
                    continue
                times[cfg_key] = us
                tflops = 2 * tokens * top_k * n * k / us / 1e6
                rows.append(dict(model=model, E=e, N=n, K=k, G=g, tokens=tokens,
                                 rows=tokens * top_k, **{f.lower(): v for f, v in cfg.items()},
                                 us=round(us, 1), tflops=round(tflops, 1),
                                 bf16_grouped_mm_us=round(bf16_us, 1),
                                 speedup=round(bf16_us / us, 2), rel_err=round(err, 5),
                                 is_default=cfg_key == dkey))
            best = min(times, key=times.get)
            print(f"{model:26s} T={tokens:5d} bf16 {bf16_us:8.1f}  best {best} "
                  f"{times[best]:8.1f} ({bf16_us / times[best]:.2f}x)  default {dkey} "
                  f"{times.get(dkey, float('nan')):8.1f}", flush=True)
            del xs, offs
        del w, t
        torch.cuda.empty_cache()
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "bench_moe_sweep.csv"),
                  f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                  f"{datetime.date.today()}", rows)


if __name__ == "__main__":
    main()
