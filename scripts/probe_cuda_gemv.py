"""Device probe for the tensor-core GEMV (int4tensor/kernels/cuda_gemv.py): correctness against the
reference path over shapes, M, group sizes and unaligned N/K, then a config sweep timed inside
CUDA graphs next to bf16 and the Triton kernels.
Usage: python -m scripts.probe_cuda_gemv [--quick] [--csv PATH (every config's time)]
    [--shuffled (sweep the GEMV on fbgemm's bf16 preshuffled layout; needs fbgemm)]
    [--shapes NxK,NxK,...] [--ms 1,8] [--blocks 1,2 (MIN_BLOCKS values swept)] [--no-check]"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth_gbs, graph_time_us, rel_error, write_csv  # noqa: E402
from int4tensor import Int4Tensor  # noqa: E402
from int4tensor.kernels import cuda_gemv, reference, triton_int4  # noqa: E402


def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1]


def check():
    worst = 0.0
    t0 = time.time()
    cases = [(n, k, g, m) for (n, k) in [(256, 1024), (200, 384), (1000, 4096 + 128), (4096, 4096),
                                          (96, 640)]
             for g in (128, 256) if k % g == 0 for m in (1, 2, 3, 5, 8, 9, 16)]
    for n, k, g, m in cases:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t = Int4Tensor.from_hp(w, (1, g))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference.linear(x, t, None)
        for cfg in (None, dict(WARPS_N=1, U=2, SLICES=8), dict(WARPS_N=4, U=8, SLICES=2),
                    dict(WARPS_N=8, U=4, SLICES=1, MIN_BLOCKS=1), dict(WARPS_N=2, U=2, SLICES=4),
                    dict(WARPS_N=2, U=2, SLICES=4, R=2), dict(WARPS_N=1, U=1, SLICES=8, R=2)):
            out = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, g, cfg)
            err = rel_error(ref, out)
            worst = max(worst, err)
            if err > 1e-2:
                print(f"WRONG n={n} k={k} g={g} m={m} cfg={cfg}: rel err {err:.4f}", flush=True)
    print(f"check: {len(cases)} cases x 7 configs, worst rel err vs reference {worst:.2e} "
          f"({time.time() - t0:.1f} s incl. compile)", flush=True)


def sweep(bw):
    records = []  # every timed config, written to --csv PATH after each shape
    shapes = [(8192, 8192), (28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096),
              (4096, 14336), (1024, 4096), (6144, 4096)]
    if "--quick" in sys.argv:
        shapes = [(8192, 8192), (28672, 8192), (4096, 4096), (4096, 14336)]
    if "--shapes" in sys.argv:
        shapes = [tuple(int(v) for v in s.split("x")) for s in arg("--shapes").split(",")]
    ms = (1, 4, 8, 16) if "--quick" in sys.argv else (1, 2, 4, 8, 16)
    if "--ms" in sys.argv:
        ms = tuple(int(v) for v in arg("--ms").split(","))
    blocks = tuple(int(v) for v in arg("--blocks").split(",")) if "--blocks" in sys.argv else (1, 2)
    for n, k in shapes:
        copies = max(2, min(16, int(400e6 // (n * k * 2))))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        qs = [Int4Tensor.from_hp(w, (1, 128)) for w in ws]
        shuffled = "--shuffled" in sys.argv
        if shuffled:
            from int4tensor import Int4PreshuffledTensor
            from int4tensor.kernels import custom_ops
            ps = [Int4PreshuffledTensor.from_int4_tensor(q) for q in qs]
            fields = [(p.qdata, p.group_scale, p.group_zero) for p in ps]
        else:
            fields = [(q.qdata, q.scale, q.zero_point) for q in qs]
        nbytes = n * k / 2 + 4 * n * k / 128
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            pct = lambda t: nbytes / t / 1e3 / bw * 100  # noqa: E731
            t_bf16 = graph_time_us([lambda w=w: F.linear(x, w) for w in ws])
            t_tri = graph_time_us([lambda q=q: triton_int4.int4_matmul(
                x, q.qdata, q.scale, q.zero_point, 128) for q in qs])
            line = f"{n}x{k} M={m}: bf16 {t_bf16:.2f} | triton {t_tri:.2f} ({t_bf16 / t_tri:.2f}x)"
            if m <= cuda_gemv.MAX_M:
                ranked = []
                combos = [(wn, sl) for wn in (1, 2, 4, 8) for sl in (1, 2, 4, 8)
                          if wn * sl == cuda_gemv.MAX_WARPS]
                grid = [(wn, u, sl, b, r) for wn, sl in combos for u in (1, 2, 4) for b in blocks
                        for r in (1, 2)]
                for wn, u, sl, b, r in grid:
                    cfg = dict(WARPS_N=wn, U=u, SLICES=sl, MIN_BLOCKS=b, R=r)
                    t = graph_time_us([lambda f=f, c=cfg: cuda_gemv.int4_gemv(
                        x, *f, 128, c, shuffled=shuffled) for f in fields], iters=5)
                    ranked.append((t, cfg))
                    records.append(dict(N=n, K=k, M=m, **cfg, us=round(t, 2)))
                ranked.sort(key=lambda r: r[0])
                d = cuda_gemv.pick_config(m, n, k, sms, shuffled)
                t_def = graph_time_us([lambda f=f: cuda_gemv.int4_gemv(
                    x, *f, 128, shuffled=shuffled) for f in fields])
                if shuffled:
                    t_plain = graph_time_us([lambda q=q: cuda_gemv.int4_gemv(
                        x, q.qdata, q.scale, q.zero_point, 128) for q in qs])
                    t_fb = graph_time_us([lambda f=f: custom_ops.fbgemm_bf16i4_shuffled(x, *f)
                                          for f in fields])
                    line += f" | plain layout {t_plain:.2f} | fbgemm shuffled {t_fb:.2f}"
                line += (f" | {'shuffled ' if shuffled else ''}cuda default {t_def:.2f} ({t_bf16 / t_def:.2f}x, {pct(t_def):.0f}% copy)"
                         f" {d} | best {ranked[0][0]:.2f} ({pct(ranked[0][0]):.0f}%) {ranked[0][1]},"
                         f" {ranked[1][0]:.2f} {ranked[1][1]}, {ranked[2][0]:.2f} {ranked[2][1]}")
            print(line, flush=True)
        del ws, qs, fields
        torch.cuda.empty_cache()
        if "--csv" in sys.argv and records:
            write_csv(arg("--csv"), torch.cuda.get_device_name(), records)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if "--no-check" not in sys.argv:
        check()
    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    sweep(bw)

