"""Where the decode GEMV's time goes: the kernel of int4tensor/kernels/cuda_gemv.py timed with
one part at a time removed (the source is edited here, results are wrong on purpose): no
activation sums, no activation loads, no tensor-core math, no scale/zero loads, and everything
but the weight loads removed. Timed in CUDA graphs over rotating weights. (Its first run, on
the kernel that summed activations in a per-block prologue, is what moved the sums onto the
tensor cores.)"""

import torch

from benchmarks.common import copy_bandwidth_gbs, graph_time_us  # noqa: E402
from int4tensor import Int4Tensor  # noqa: E402
from int4tensor.kernels import cuda_gemv, nvrtc  # noqa: E402

EDITS = {
    "no activation sums": [(
        "      mma_bf16(e[mt], one, one, one, one, x04, x15);\n"
        "      mma_bf16(e[mt], one, one, one, one, x26, x37);", "")],
    "no x loads": [("xv[mt][j] = m < M ? __ldg(xp + (SHUFFLED ? (j & 1) + 8 * (j >> 1) : j)) : make_uint4(0, 0, 0, 0);",
                    "xv[mt][j] = make_uint4(kc, j, m, (unsigned)(size_t)xp);")],
    "no mma": [(
        '  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%%0,%%1,%%2,%%3}, "\n'
        '      "{%%4,%%5,%%6,%%7}, {%%8,%%9}, {%%0,%%1,%%2,%%3};"\n'
        '      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])\n'
        '      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));',
        "  d[0] += __uint_as_float(a0 ^ a1 ^ b0); d[1] += __uint_as_float(a2 ^ a3 ^ b1);")],
    "no scale loads": [("sz[0][r] = scale[gi + ra[r]]; sz[1][r] = scale[gi + rb[r]];",
                        "sz[0][r] = (bf16_t)(gi + ra[r]); sz[1][r] = (bf16_t)(gi + rb[r]);"),
                       ("sz[2][r] = zero[gi + ra[r]]; sz[3][r] = zero[gi + rb[r]];",
                        "sz[2][r] = (bf16_t)(gi - ra[r]); sz[3][r] = (bf16_t)(gi - rb[r]);")],
}
EDITS["weights only"] = [e for k in ("no activation sums", "no x loads", "no mma", "no scale loads")
                         for e in EDITS[k]]


def kernel_for(edits, m_tiles, cfg, cap, tag, prefix="ablate"):
    """The GEMV kernel of cuda_gemv.py with ``edits`` (old, new) applied, compiled."""
    src, helpers = cuda_gemv._SOURCE, nvrtc.MMA_HELPERS
    for old, new in edits:
        if old in src:
            src = src.replace(old, new)
        else:  # the shared helpers are not %-formatted: no %% escapes
            old, new = old.replace("%%", "%"), new.replace("%%", "%")
            assert old in helpers, old[:60]
            helpers = helpers.replace(old, new)
    name = f"{prefix}_{tag}"
    src = src % dict(m_tiles=m_tiles, u=cfg["U"], warps_n=cfg["WARPS_N"], max_warps=8, name=name,
                     bf16_helpers=nvrtc.BF16_HELPERS, mma_helpers=helpers, min_blocks=cfg["MIN_BLOCKS"],
                     r=cfg.get("R", 1), shuffled=0)
    return nvrtc.compile_kernel(src, name, cap)


def main():
    bw = copy_bandwidth_gbs()
    cap = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} copy {bw:.0f} GB/s", flush=True)
    for n, k in [(8192, 8192), (28672, 8192), (4096, 4096), (4096, 14336)]:
        copies = max(2, min(16, int(400e6 // (n * k * 2))))
        qs = [Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), (1, 128))
              for _ in range(copies)]
        nbytes = n * k / 2 + 4 * n * k / 128
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = cuda_gemv.pick_config(m, n, k, sms)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            smem = cuda_gemv._smem_bytes(1, cfg["WARPS_N"], cfg["SLICES"], cfg["R"])
            line = f"{n}x{k} M={m} {cfg['WARPS_N']}/{cfg['U']}/{cfg['SLICES']}/R{cfg['R']}:"
            for i, (tag, edits) in enumerate([("full", [])] + list(EDITS.items())):
                kern = kernel_for(edits, 1, cfg, cap, f"{i}_{cfg['WARPS_N']}_{cfg['U']}")
                fns = [lambda q=q, kern=kern: kern(
                    grid=(-(-n // (16 * cfg["R"] * cfg["WARPS_N"])), 1, 1), block=(32, cfg["WARPS_N"], cfg["SLICES"]),
                    args=[x, q.qdata, q.scale, q.zero_point, out, m, n, k, x.stride(0),
                          q.scale.stride(0), out.stride(0), 7, 0, 0, 0, 0], shared_mem=smem) for q in qs]
                t = graph_time_us(fns)
                line += f" | {tag} {t:.2f} ({nbytes / t / 1e3 / bw * 100:.0f}%)"
            print(line, flush=True)
        del qs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
