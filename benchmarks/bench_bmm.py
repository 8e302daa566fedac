"""MoE expert weights (3D, ``torch.bmm``): bf16 vs the int4 paths, side by side in one run.

    python benchmarks/bench_bmm.py [--out DIR]

For expert stacks ``[E, N, K]`` of published MoE models and M activation rows per expert:
median µs per call (CUDA graph, rotating weight copies so each call reads HBM), speedup over
bf16 ``torch.bmm``, % of the copy bandwidth measured in the same run (int4 weight + scale +
zero bytes), and the relative error against the bf16 result. Writes bench_bmm.csv.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth_gbs, graph_time_us, rel_error, write_csv  # noqa: E402
from int4tensor import Int4PreshuffledTensor, Int4Tensor, kernels  # noqa: E402
from int4tensor.kernels import fbgemm as fbgemm_backend  # noqa: E402

G = 128
#: (model, E, N, K): gate/up and down projections of the experts
SHAPES = [("Mixtral-8x7B w1", 8, 14336, 4096), ("Mixtral-8x7B w2", 8, 4096, 14336),
          ("DeepSeek-V2-Lite up", 64, 1408, 2048), ("DeepSeek-V2-Lite down", 64, 2048, 1408),
          ("Qwen3-30B-A3B up", 128, 768, 2048), ("Qwen3-30B-A3B down", 128, 2048, 768)]
MS = [1, 4, 16, 32, 64]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    device = torch.cuda.get_device_name()
    have_fbgemm = fbgemm_backend.is_available()
    print(f"{device}: copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}", flush=True)
    rows = []
    for model, e, n, k in SHAPES:
        copies = max(2, min(8, int(600e6 // (e * n * k * 2))))
        weights = [torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                   for _ in range(copies)]
        plain = [Int4Tensor.from_hp(w, (1, 1, G)) for w in weights]
        shuffled = [Int4PreshuffledTensor.from_int4_tensor(t) for t in plain] if have_fbgemm else []
        int4_bytes = e * (n * k / 2 + 4 * n * k / G)
        for m in MS:
            x = torch.randn(e, m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.bmm(x, weights[0].mT)
            paths = {"bf16": [lambda w=w: torch.bmm(x, w.mT) for w in weights],
                     "int4 (dispatch)": [lambda t=t: torch.bmm(x, t.mT) for t in plain]}
            if have_fbgemm:
                paths["int4 preshuffled"] = [lambda p=p: torch.bmm(x, p.mT) for p in shuffled]
                paths["fbgemm rowwise batched"] = [lambda t=t: fbgemm_backend.bmm(x, t) for t in plain]
            backend = kernels.bmm_backend(x, plain[0])
            t_bf16 = None
            for name, fns in paths.items():
                err = 0.0 if name == "bf16" else rel_error(ref, fns[0]())
                us = graph_time_us(fns)
                t_bf16 = t_bf16 or us
                nbytes = e * n * k * 2 if name == "bf16" else int4_bytes
                pct = 100 * nbytes / (us * 1e-6) / 1e9 / bw
                rows.append(dict(model=model, E=e, N=n, K=k, M=m, path=name, us=round(us, 2),
                                 speedup=round(t_bf16 / us, 3), pct_copy=round(pct, 1),
                                 rel_err_vs_bf16=f"{err:.4f}",
                                 backend=backend if name == "int4 (dispatch)" else ""))
                print(f"{model:<22} E={e:<3} {n:>5}x{k:<5} M={m:<3} {name:<24} {us:>8.2f} us "
                      f"{t_bf16 / us:>5.2f}x {pct:>5.1f}% copy  err {err:.4f}", flush=True)
        del weights, plain, shuffled
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "bench_bmm.csv"),
              f"{device}, copy bandwidth {bw:.0f} GB/s, {datetime.date.today().isoformat()}, "
              f"torch {torch.__version__}", rows)


if __name__ == "__main__":
    main()
