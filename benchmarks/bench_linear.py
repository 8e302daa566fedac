"""Linear layer speed: bf16 vs every int4 path, side by side in one run on one GPU.

    python benchmarks/bench_linear.py [--out DIR] [--quick] [--sweep]

For each shape (N x K) and batch M: median µs per call, speedup over bf16, GB/s of weight
bytes read and % of the copy bandwidth measured in the same run, and the relative error of the
output against the bf16 layer. Every path is timed inside a CUDA graph (no launch or Python
overhead, as in a server that captures its steps) over rotating weight copies, so that each
call reads its weight from HBM, not L2. Writes bench_linear.csv and bench_linear.png to --out
and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    copy_bandwidth_gbs, do_bench_us, graph_time_us, rel_error, write_csv)
from benchmarks.make_tables import plot  # noqa: E402
from int4tensor import Int4PreshuffledTensor, Int4Tensor  # noqa: E402
from int4tensor.kernels import fbgemm as fbgemm_backend  # noqa: E402
from int4tensor.kernels import cuda_gemm, cuda_gemv, reference, triton_int4  # noqa: E402

G = 128
SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336)]
MS = [1, 4, 8, 16, 24, 32, 64, 128, 1024, 8192]


def tinygemm_pack(t: Int4Tensor):
    """Our quantized values in torch's tinygemm layout (same u, scale and min-based zero)."""
    from int4tensor.quant_primitives import unpack_int4

    n, k = t.shape
    u = (unpack_int4(t.qdata).to(torch.int16) + 8).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), 8)
    # tinygemm dequantizes (u - 8) * scale + zero with zero = min + 8 * scale: our zero_point
    scales_zeros = torch.stack([t.scale, t.zero_point], dim=-1).contiguous()
    return packed, scales_zeros


def prepare(w, t: Int4Tensor, have_fbgemm: bool) -> dict:
    """Every layout of one weight that a path reads, made once per shape."""
    prep = dict(t=t, t_fp8=Int4Tensor(t.qdata, t.scale, t.zero_point, t.block_size, t.shape,
                                      activation_dtype="fp8"), tinygemm=tinygemm_pack(t))
    if have_fbgemm:
        prep["shuffled"] = fbgemm_backend.preshuffle(t.qdata, t.scale)
        prep["preshuffled"] = Int4PreshuffledTensor.from_int4_tensor(t)
        prep["preshuffled_fp8"] = Int4PreshuffledTensor.from_hp_fp8(w)
    return prep


def int4_paths(x, prep: dict, have_fbgemm: bool):
    """name -> zero-arg callable computing x @ W.T for one prepared weight."""
    t, m = prep["t"], x.shape[0]
    paths = {"int4 (dispatch)": lambda: F.linear(x, t),
             "int4 plain, fp8 activations": lambda: F.linear(x, prep["t_fp8"])}
    if m <= cuda_gemv.MAX_M:
        paths["int4 cuda tc-gemv"] = lambda: cuda_gemv.int4_gemv(
            x, t.qdata, t.scale, t.zero_point, G)
    if m <= 256:
        paths["int4 triton"] = lambda: triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, G)
    if have_fbgemm:
        fb = torch.ops.fbgemm
        wq, s = prep["shuffled"]
        p8 = prep["preshuffled_fp8"]
        paths["int4 preshuffled"] = lambda: F.linear(x, prep["preshuffled"])
        if 17 <= m <= 64:  # the dispatcher takes it for 17-32 rows
            pre = prep["preshuffled"]
            paths["int4 cuda tc-gemm (preshuffled)"] = lambda: cuda_gemm.int4_gemm(
                x, pre.qdata, pre.group_scale, pre.group_zero, G)
        paths["int4 preshuffled, fp8 activations"] = lambda: F.linear(x, p8)
        paths["fbgemm rowwise"] = lambda: fb.bf16i4bf16_rowwise(x, t.qdata, t.scale, t.zero_point)
        paths["fbgemm shuffled"] = lambda: fb.bf16i4bf16_shuffled(x, wq, s, t.zero_point)
        paths["fbgemm f8i4 shuffled (+x fp8)"] = lambda: fbgemm_f8i4_with_its_quantizer(x, p8)
    if m <= 128:
        tg = prep["tinygemm"]
        paths["tinygemm"] = lambda: torch.ops.aten._weight_int4pack_mm(x, tg[0], G, tg[1])
    return paths


def fbgemm_f8i4_with_its_quantizer(x, p8):
    """fbgemm's own fp8 path as its docs show it: Triton ``quantize_fp8_row`` + the kernel."""
    from fbgemm_gpu.experimental.gen_ai.quantize import quantize_fp8_row

    xq, xs = quantize_fp8_row(x)
    return torch.ops.fbgemm.f8i4bf16_shuffled(xq, p8.qdata, xs, p8.row_scale, p8.group_scale)


def bench_shape(n, k, ms, bw, have_fbgemm, rows):
    copies = max(2, min(16, int(400e6 // (n * k * 2))))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    quantized = [Int4Tensor.from_hp(w, (1, G)) for w in weights]
    prepared = [prepare(w, t, have_fbgemm) for w, t in zip(weights, quantized)]
    int4_bytes = n * k / 2 + 4 * n * k / G
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, weights[0])
        # large M: two copies are enough to leave L2, and a call takes long enough to time
        used = len(weights) if m <= 128 else 2
        per_copy = [int4_paths(x, prep, have_fbgemm) for prep in prepared[:used]]
        iters = 20 if m <= 1024 else 5
        t_bf16 = graph_time_us([lambda w=w: F.linear(x, w) for w in weights[:used]], iters)
        results = [("bf16", t_bf16, n * k * 2, 0.0)]
        for name in per_copy[0]:
            fns = [p[name] for p in per_copy if name in p]
            err = rel_error(ref, fns[0]())
            t = graph_time_us(fns, iters)
            results.append((name, t, int4_bytes, err))
        if m <= 16 and n * k <= 8192 * 8192:
            ref_path = lambda: reference.linear(x, quantized[0], None)  # noqa: E731
            results.append(("int4 reference path", do_bench_us(ref_path), int4_bytes,
                            rel_error(ref, ref_path())))
        for name, t, nbytes, err in results:
            gbs = nbytes / (t * 1e-6) / 1e9
            rows.append(dict(N=n, K=k, M=m, path=name, us=round(t, 2), speedup=round(t_bf16 / t, 3),
                             GBps=round(gbs), pct_copy=round(100 * gbs / bw, 1),
                             rel_err_vs_bf16=f"{err:.4f}"))
            print(f"{n:>6} {k:>6} {m:>5} {name:<32} {t:>9.2f} {t_bf16 / t:>6.2f}x "
                  f"{gbs:>6.0f} GB/s {100 * gbs / bw:>5.1f}%  err {err:.4f}", flush=True)
    del weights, quantized, prepared
    torch.cuda.empty_cache()


def sweep_configs(m):
    if m <= 4:
        for bn in (8, 16, 32, 64):
            for gpi in (1, 2, 4):
                for sk in (2, 4, 8, 16):
                    for warps in (2, 4):
                        yield dict(kernel="gemv", BLOCK_N=bn, SPLIT_K=sk, num_warps=warps,
                                   num_stages=3, GROUPS_PER_ITER=gpi)
    if m >= 2 and m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        for bn in (64, 128):
            for sk in (4, 8, 16):
                for gpi in (1,):
                    for stages in (3,):
                        yield dict(kernel="mma", BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=sk,
                                   GROUPS_PER_ITER=gpi, num_warps=4, num_stages=stages)


def sweep(n, k, ms, bw):
    """Time Triton kernel/launch configs (tuning aid for triton_int4.pick_config)."""
    zero_cast = graph_time_us([lambda: torch.zeros(1, n, device="cuda").to(torch.bfloat16)] * 8)
    print(f"sweep {n}x{k}: split-K overhead (zero-init + cast of the [1, N] output): "
          f"{zero_cast:.2f} us", flush=True)
    copies = max(2, min(16, int(400e6 // (n * k * 2))))
    qs = [Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), (1, G))
          for _ in range(copies)]
    nbytes = n * k / 2 + 4 * n * k / G
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference.linear(x, qs[0], None)
        ranked = []
        for cfg in sweep_configs(m):
            try:
                out = triton_int4.int4_matmul(x, qs[0].qdata, qs[0].scale, qs[0].zero_point, G, cfg)
                if rel_error(ref, out) > 1e-2:
                    print("WRONG", cfg, rel_error(ref, out))
                    continue
                t = graph_time_us([lambda q=q, c=cfg: triton_int4.int4_matmul(
                    x, q.qdata, q.scale, q.zero_point, G, c) for q in qs], iters=5)
            except Exception as e:  # noqa: BLE001 (out of resources, ...)
                print("FAILED", cfg, type(e).__name__, str(e)[:100])
                continue
            ranked.append((t, cfg))
        ranked.sort(key=lambda r: r[0])
        default = graph_time_us([lambda q=q: triton_int4.int4_matmul(
            x, q.qdata, q.scale, q.zero_point, G) for q in qs])
        print(f"sweep {n}x{k} M={m}: pick_config {default:.2f} us "
              f"({nbytes / default / 1e3 / bw * 100:.0f}% copy) {triton_int4.pick_config(m, n, k)}")
        for t, cfg in ranked[:4]:
            print(f"    {t:.2f} us ({nbytes / t / 1e3 / bw * 100:.0f}% copy) {cfg}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="two shapes, M in 1, 16, 128, 1024")
    parser.add_argument("--sweep", action="store_true", help="tune Triton configs instead")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}", flush=True)
    shapes, ms = (SHAPES[:1] + SHAPES[3:4], [1, 16, 128, 1024]) if args.quick else (SHAPES, MS)
    if args.sweep:
        for n, k in shapes:
            sweep(n, k, [1], bw)
        return
    have_fbgemm = fbgemm_backend.is_available()
    rows = []
    stamp = datetime.date.today().isoformat()
    for n, k in shapes:
        bench_shape(n, k, ms, bw, have_fbgemm, rows)
        write_csv(os.path.join(args.out, "bench_linear.csv"),  # after each shape: partial runs
                  f"{device}, copy bandwidth {bw:.0f} GB/s, {stamp}, torch {torch.__version__}", rows)
    plot(rows, os.path.join(args.out, "bench_linear.png"))
    print(f"\n{device}, copy {bw:.0f} GB/s, {stamp}")
    print(f"{'N':>6} {'K':>6} {'M':>5} {'path':<32} {'us':>9} {'vs bf16':>7} {'%copy':>6} {'rel err':>8}")
    for r in rows:
        print(f"{r['N']:>6} {r['K']:>6} {r['M']:>5} {r['path']:<32} {r['us']:>9.2f} "
              f"{r['speedup']:>6.2f}x {r['pct_copy']:>5.1f}% {r['rel_err_vs_bf16']:>8}")


if __name__ == "__main__":
    main()
