"""Do cache hints on the decode GEMV's weight loads read HBM faster? The kernel of
int4tensor/kernels/cuda_gemv.py with its weight loads (read once, never reused) issued as
``ld.global.nc`` with L1 no-allocate and/or an L2 prefetch size, timed in CUDA graphs over
rotating weights at the default launch config, on both layouts.

    python -m scripts.probe_load_hints
"""

import torch

from benchmarks.common import copy_bandwidth_gbs, graph_time_us, rel_error  # noqa: E402
from int4tensor import Int4PreshuffledTensor, Int4Tensor  # noqa: E402
from int4tensor.kernels import cuda_gemv  # noqa: E402

HINTS = {
    "plain __ldg": None,
    "L1::no_allocate": "ld.global.nc.L1::no_allocate.v4.u32",
    "L2::256B": "ld.global.nc.L2::256B.v4.u32",
    "no_allocate + L2::256B": "ld.global.nc.L1::no_allocate.L2::256B.v4.u32",
    "L2::128B": "ld.global.nc.L2::128B.v4.u32",
}
LOADS = [("wa[r] = qa[off];", "wa[r] = ldw(qa + off);"), ("wb[r] = qb[off];", "wb[r] = ldw(qb + off);"),
         ("wa[r] = qa[(size_t)(ra[r] - ra[0]) * row_len + c * 4];",
          "wa[r] = ldw(qa + (size_t)(ra[r] - ra[0]) * row_len + c * 4);"),
         ("wb[r] = qb[(size_t)(rb[r] - rb[0]) * row_len + c * 4];",
          "wb[r] = ldw(qb + (size_t)(rb[r] - rb[0]) * row_len + c * 4);")]


def source_with(src, instr):
    if instr is None:
        return src
    helper = (
        "__device__ __forceinline__ uint4 ldw(const uint4* p) {\n"
        "  uint4 v;\n"
        f'  asm volatile("{instr} {{%%0, %%1, %%2, %%3}}, [%%4];"\n'
        '      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));\n'
        "  return v;\n}\n")
    for old, new in LOADS:
        assert old in src, old
        src = src.replace(old, new)
    anchor = "__device__ __forceinline__ void load_chunk("
    return src.replace(anchor, helper + anchor)


def main():
    bw = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} copy {bw:.0f} GB/s", flush=True)
    original = cuda_gemv._SOURCE
    shapes = [(8192, 8192), (14336, 4096), (4096, 14336), (6144, 4096), (4096, 4096), (28672, 8192)]
    try:
        for n, k in shapes:
            copies = max(2, min(16, int(400e6 // (n * k * 2))))
            qs = [Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02,
                                     (1, 128)) for _ in range(copies)]
            ps = [Int4PreshuffledTensor.from_int4_tensor(q) for q in qs]
            nbytes = n * k / 2 + 4 * n * k / 128
            for m in (1, 8):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for shuffled in (False, True):
                    fields = ([(p.qdata, p.group_scale, p.group_zero) for p in ps] if shuffled
                              else [(q.qdata, q.scale, q.zero_point) for q in qs])
                    line = f"{n}x{k} M={m} {'shuffled' if shuffled else 'plain   '}:"
                    ref = None
                    for tag, instr in HINTS.items():
                        cuda_gemv._SOURCE = source_with(original, instr)
                        cuda_gemv._kernel_source.cache_clear()
                        cuda_gemv._compiled.cache_clear()
                        out = cuda_gemv.int4_gemv(x, *fields[0], 128, shuffled=shuffled)
                        ref = out if ref is None else ref
                        assert rel_error(ref, out) == 0.0, tag
                        t = graph_time_us([lambda f=f: cuda_gemv.int4_gemv(
                            x, *f, 128, shuffled=shuffled) for f in fields])
                        line += f" | {tag} {t:.2f} ({nbytes / t / 1e3 / bw * 100:.0f}%)"
                    print(line, flush=True)
            del qs, ps
            torch.cuda.empty_cache()
    finally:
        cuda_gemv._SOURCE = original
        cuda_gemv._kernel_source.cache_clear()
        cuda_gemv._compiled.cache_clear()


if __name__ == "__main__":
    main()
