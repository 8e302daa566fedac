"""Where the mid-M GEMM's time goes (int4tensor/kernels/cuda_gemm.py): the kernel timed with one
part at a time removed (the source is edited here; results are wrong on purpose), in CUDA
graphs over rotating weights, without the zero-fill and cast around it.

    python scripts/probe_gemm_ablation.py
"""
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.common import graph_time_us  # noqa: E402
from int4tensor import Int4PreshuffledTensor, Int4Tensor  # noqa: E402
from int4tensor.kernels import cuda_gemm, nvrtc  # noqa: E402

EDITS = {
    "no atomics (plain store)": [("atomicAdd(out + (size_t)m * N + n, acc[r][mt][i]);",
                                  "out[(size_t)m * N + n] = acc[r][mt][i];")],
    "no x staging": [("copy16(xs + m * xs_stride + 8 * p, x + (size_t)min(m, M - 1) * ldx + k0 + 8 * p, m < M);",
                      "")],
    "no mma": [("      : \"+f\"(d[0]), \"+f\"(d[1]), \"+f\"(d[2]), \"+f\"(d[3])\n", "")],
    "no dequant": [("  asm(\"fma.rn.bf16x2 %%0, %%1, %%2, %%3;\" : \"=r\"(q) : \"r\"(v), \"r\"(0x3f803f80u), \"r\"(0xc308c308u));\n"
                    "  asm(\"fma.rn.bf16x2 %%0, %%1, %%2, %%3;\" : \"=r\"(w) : \"r\"(q), \"r\"(s2), \"r\"(z2));",
                    "  q = v ^ s2; w = q + z2;")],
}


def kernel_for(edits, m_tiles, stages, min_blocks, cap, tag):
    src, helpers = cuda_gemm._SOURCE, nvrtc.MMA_HELPERS
    for old, new in edits:
        if old in src:
            src = src.replace(old, new)
        else:
            old, new = old.replace("%%", "%"), new.replace("%%", "%")
            assert old in helpers, old[:60]
            if "mma.sync" in helpers and not new:  # "no mma": the asm keeps its inputs only
                helpers = helpers.replace(
                    'asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "\n'
                    '      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"\n'
                    '      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])\n'
                    '      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));',
                    "d[0] += __uint_as_float(a0 ^ a1 ^ b0); d[1] += __uint_as_float(a2 ^ a3 ^ b1);")
            else:
                helpers = helpers.replace(old, new)
    name = f"gemm_ablate_{tag}_{m_tiles}_{stages}_{min_blocks}"
    src = src % dict(m_tiles=m_tiles, stages=stages, min_blocks=min_blocks, name=name,
                     bf16_helpers=nvrtc.BF16_HELPERS, mma_helpers=helpers)
    kernel = nvrtc.compile_kernel(src, name, cap)
    kernel.set_shared_memory_config(cuda_gemm.MAX_SMEM)
    return kernel


def main():
    cap = torch.cuda.get_device_capability()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for n, k in [(8192, 8192), (4096, 14336)]:
        copies = max(2, min(16, int(400e6 // (n * k * 2))))
        ps = [Int4PreshuffledTensor.from_int4_tensor(Int4Tensor.from_hp(
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, (1, 128))) for _ in range(copies)]
        for m, stages, bc, b in [(17, 2, 8, 2), (32, 2, 8, 2), (64, 2, 8, 1)]:
            mt = -(-m // 8)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.zeros(m, n, device="cuda")
            smem = cuda_gemm._smem_bytes(mt, bc, stages)
            grid = (-(-n // cuda_gemm.BLOCK_N), -(-(k // 128) // bc), 1)
            line = f"{n}x{k} M={m} S{stages} BC{bc} B{b}:"
            for tag, edits in [("full", [])] + list(EDITS.items()):
                kern = kernel_for(edits, mt, stages, b, cap, tag.split()[0] + tag.split()[-1][:4])
                t = graph_time_us([lambda p=p, kern=kern: kern(
                    grid=grid, block=(256, 1, 1),
                    args=[x, p.qdata, p.group_scale, p.group_zero, out, m, n, k, x.stride(0),
                          p.group_scale.stride(0), 7, bc], shared_mem=smem) for p in ps])
                line += f" | {tag} {t:.2f}"
            print(line, flush=True)
        del ps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
