"""Device probe for the mid-M tensor-core GEMM (int4tensor/kernels/cuda_gemm.py): correctness
against the reference path, then a launch-config sweep timed in CUDA graphs over rotating
weights, next to bf16 and fbgemm's kernel for the same layout on the same weights
(bf16i4bf16_shuffled; with --plain the GEMM reads the plain layout, against bf16i4bf16_rowwise).

    python -m scripts.probe_cuda_gemm [--plain] [--csv PATH] [--shapes NxK,...] [--ms 17,32,64]
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth_gbs, graph_time_us, rel_error, write_csv  # noqa: E402
from int4tensor import Int4PreshuffledTensor, Int4Tensor  # noqa: E402
from int4tensor.kernels import cuda_gemm, custom_ops, reference  # noqa: E402


def arg(flag, default):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def check():
    t0, worst = time.time(), 0.0
    cases = [(n, k, g, m) for n, k in [(512, 1024), (208, 384), (1008, 4224), (4096, 4096)]
             for g in (128, 256) if k % g == 0 for m in (17, 24, 31, 40, 57, 64)]
    for n, k, g, m in cases:
        t = Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, (1, g))
        p = Int4PreshuffledTensor.from_int4_tensor(t)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference.linear(x, t, None)
        for cfg in (None, dict(U=1, BLOCK_CHUNKS=2), dict(U=2, BLOCK_CHUNKS=3, MIN_BLOCKS=1),
                    dict(U=1, BLOCK_CHUNKS=8, MIN_BLOCKS=1, PREFETCH=False),
                    dict(U=2, BLOCK_CHUNKS=5, MIN_BLOCKS=1, PREFETCH=True)):
            for shuffled in (True, False):
                f = (p.qdata, p.group_scale, p.group_zero) if shuffled else (t.qdata, t.scale, t.zero_point)
                out = cuda_gemm.int4_gemm(x, *f, g, cfg, shuffled=shuffled)[:, :n]
                err = rel_error(ref, out)
                worst = max(worst, err)
                if err > 1e-2:
                    print(f"WRONG n={n} k={k} g={g} m={m} cfg={cfg} shuffled={shuffled}: "
                          f"rel err {err:.4f}", flush=True)
    print(f"check: {len(cases)} cases x 5 configs x 2 layouts, worst rel err vs reference {worst:.2e} "
          f"({time.time() - t0:.1f} s incl. compile)", flush=True)


def sweep(bw):
    shapes = [tuple(int(v) for v in s.split("x")) for s in
              arg("--shapes", "8192x8192,14336x4096,4096x14336,28672x8192,6144x4096,4096x4096").split(",")]
    ms = [int(v) for v in arg("--ms", "17,24,32,48").split(",")]
    records = []
    for n, k in shapes:
        copies = max(2, min(16, int(400e6 // (n * k * 2))))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        ts = [Int4Tensor.from_hp(w, (1, 128)) for w in ws]
        shuffled = "--plain" not in sys.argv
        if shuffled:
            ps = [Int4PreshuffledTensor.from_int4_tensor(t) for t in ts]
            fields = [(p.qdata, p.group_scale, p.group_zero) for p in ps]
            fbgemm_op = custom_ops.fbgemm_bf16i4_shuffled
        else:
            fields = [(t.qdata, t.scale, t.zero_point) for t in ts]
            fbgemm_op = custom_ops.int4_matmul_fbgemm
        nbytes = n * k / 2 + 4 * n * k / 128
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = graph_time_us([lambda w=w: F.linear(x, w) for w in ws])
            t_fb = graph_time_us([lambda f=f: fbgemm_op(x, *f, *([128] if not shuffled else []))
                                  for f in fields])
            ranked = []
            m_tiles = -(-m // 8)
            grid = [(u, bc, b, pf) for u in (1, 2) for bc in (2, 4, 8, 16)
                    for b in ((1, 2) if m_tiles <= 3 else (1,)) for pf in (True,)]
            for u, bc, b, pf in grid:
                cfg = dict(U=u, BLOCK_CHUNKS=bc, MIN_BLOCKS=b, PREFETCH=pf)
                smem = cuda_gemm._smem_bytes(m_tiles, min(bc, k // 128))
                if smem > cuda_gemm.MAX_SMEM or smem * b > 227 * 1024:
                    continue
                t = graph_time_us([lambda f=f, c=cfg: cuda_gemm.int4_gemm(x, *f, 128, c, shuffled)
                                   for f in fields], iters=5)
                ranked.append((t, cfg))
                records.append(dict(N=n, K=k, M=m, **cfg, us=round(t, 2)))
            ranked.sort(key=lambda r: r[0])
            t_def = graph_time_us([lambda f=f: cuda_gemm.int4_gemm(x, *f, 128, shuffled=shuffled)
                                   for f in fields])
            pct = lambda t: nbytes / t / 1e3 / bw * 100  # noqa: E731
            print(f"{n}x{k} M={m}: bf16 {t_bf16:.2f} | fbgemm {'shuffled' if shuffled else 'rowwise'}"
                  f" {t_fb:.2f} ({t_bf16 / t_fb:.2f}x)"
                  f" | gemm default {t_def:.2f} ({t_bf16 / t_def:.2f}x, "
                  f"{pct(t_def):.0f}% copy) {cuda_gemm.pick_config(m, n, k, 132)} | best "
                  f"{ranked[0][0]:.2f} ({t_bf16 / ranked[0][0]:.2f}x) {ranked[0][1]}, "
                  f"{ranked[1][0]:.2f} {ranked[1][1]}, {ranked[2][0]:.2f} {ranked[2][1]}", flush=True)
        del ws, ts, fields
        torch.cuda.empty_cache()
        if "--csv" in sys.argv and records:
            write_csv(arg("--csv", ""), torch.cuda.get_device_name(), records)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    check()
    sweep(copy_bandwidth_gbs())
