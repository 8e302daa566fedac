"""Would a decode-specific weight layout help the GEMV? The GEMV's warps read, per 128-wide K
chunk, 64 bytes from each of 16 rows; the fastest one-kernel read of the same bytes
(scripts/probe_read_ceiling.py) is contiguous. This probe stores each warp's chunk (16 rows x
64 bytes) as 1 KB contiguous, in the order the lanes load it, edits the kernel of
int4tensor/kernels/cuda_gemv.py to read that layout (nothing else changes), checks it against
the plain kernel, and times both, with everything and with only the weight loads."""

import torch

from benchmarks.common import copy_bandwidth_gbs, graph_time_us, rel_error  # noqa: E402
from int4tensor import Int4Tensor  # noqa: E402
from int4tensor.kernels import cuda_gemv  # noqa: E402

from scripts.probe_gemv_ablation import EDITS, kernel_for  # noqa: E402

TILED = [  # with one 16-row tile per warp (R = 1)
    ("  const uint4* qa = q + (size_t)ra[0] * row_len + t;  // tile r's rows: + (ra[r] - ra[0]) rows\n"
     "  const uint4* qb = q + (size_t)rb[0] * row_len + t;",
     "  const uint4* qa = q + ((size_t)(min(r0, N - 16) >> 4) * (row_len >> 2)) * 64 + 2 * lane;\n"
     "  const uint4* qb = qa + 1;"),
    ("    wa[r] = qa[(size_t)(ra[r] - ra[0]) * row_len + c * 4];\n"
     "    wb[r] = qb[(size_t)(rb[r] - rb[0]) * row_len + c * 4];",
     "    wa[r] = qa[c * 64];\n    wb[r] = qb[c * 64];"),
]


def tiled(qdata: torch.Tensor) -> torch.Tensor:
    """[N, K/2] -> per (16-row tile, 128-K chunk): lane (g, t) holds rows g, g + 8, bytes 16t..."""
    n, half = qdata.shape
    v = qdata.view(n // 16, 2, 8, half // 64, 4, 16)  # tile, ab, g, chunk, t, byte
    return v.permute(0, 3, 2, 4, 1, 5).contiguous().view(n, half)


def main():
    bw = copy_bandwidth_gbs()
    cap = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} copy {bw:.0f} GB/s", flush=True)
    for n, k in [(8192, 8192), (28672, 8192), (4096, 4096), (4096, 14336)]:
        copies = max(2, min(16, int(400e6 // (n * k * 2))))
        qs = [Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), (1, 128))
              for _ in range(copies)]
        tq = [tiled(q.qdata) for q in qs]
        nbytes = n * k / 2 + 4 * n * k / 128
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = dict(cuda_gemv.pick_config(m, n, k, sms), R=1)  # the tiled edits assume R = 1
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            smem = cuda_gemv._smem_bytes(1, cfg["WARPS_N"], cfg["SLICES"], cfg["R"])
            line = f"{n}x{k} M={m}:"
            variants = [("plain", [], False), ("plain weights only", EDITS["weights only"], False),
                        ("tiled", TILED, True), ("tiled weights only", TILED + EDITS["weights only"], True)]
            for i, (tag, edits, use_tiled) in enumerate(variants):
                kern = kernel_for(edits, 1, cfg, cap, f"{i}_{cfg['WARPS_N']}_{cfg['U']}", "tiled")
                data = tq if use_tiled else [q.qdata for q in qs]

                def call(qd, q, kern=kern):
                    kern(grid=(-(-n // (16 * cfg["R"] * cfg["WARPS_N"])), 1, 1),
                         block=(32, cfg["WARPS_N"], cfg["SLICES"]),
                         args=[x, qd, q.scale, q.zero_point, out, m, n, k, x.stride(0),
                               q.scale.stride(0), out.stride(0), 7, 0, 0, 0, 0], shared_mem=smem)
                    return out
                if i in (0, 2):
                    ref = cuda_gemv.int4_gemv(x, qs[0].qdata, qs[0].scale, qs[0].zero_point, 128)
                    err = rel_error(ref, call(data[0], qs[0]).clone())
                    line += f" [{tag} vs kernel: rel err {err:.1e}]"
                t = graph_time_us([lambda qd=qd, q=q: call(qd, q) for qd, q in zip(data, qs)])
                line += f" | {tag} {t:.2f} ({nbytes / t / 1e3 / bw * 100:.0f}%)"
            print(line, flush=True)
        del qs, tq
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
