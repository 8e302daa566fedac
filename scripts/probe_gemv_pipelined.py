"""An experiment kept for the record (not shipped: slower; scripts/results/
probe_gemv_pipelined.txt): the decode GEMV's per-chunk math (cuda_gemv._CHUNK_MATH) fed by a
bulk-copy pipeline instead of register loads. Correctness against the reference path (shapes,
M, G = 128 / 256, K not a multiple of the stage), then a config sweep (TILES x CH x STAGES)
timed in CUDA graphs next to bf16 and the shipped kernel, and its 'weights only' ablation (the
chunk math removed). Usage: python -m scripts.probe_gemv_pipelined [--quick]"""
import functools
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth_gbs, graph_time_us, rel_error  # noqa: E402
from int4tensor import Int4Tensor  # noqa: E402
from int4tensor.kernels import cuda_gemv, nvrtc, reference  # noqa: E402

# The same per-chunk math fed from shared memory: one producer warp streams each block's
# rows into a STAGES-deep ring with Hopper's bulk copies (cp.async.bulk, completion counted on
# an mbarrier), so the bytes in flight no longer depend on how long the consumer warps take to
# compute. Block: TILES 16-row tiles x all of K; stage = CH chunks of every row plus their
# scales and zero points; consumer warp (tile, slot) computes chunk slot of each stage.
PIPELINED_SOURCE = cuda_gemv._CHUNK_MATH + r"""
#define TILES %(tiles)d
#define CH %(ch)d
#define STAGES %(stages)d
#define ROWS (16 * TILES)
#define CONSUMERS (TILES * CH)
// row pitch in a stage: consecutive rows 64 bytes apart modulo 128, so the 16-byte reads of
// lanes (g, t) and (g + 1, t) fall in different banks
#define ROW_PITCH (CH * 64 + ((CH * 64) %% 128 == 0 ? 64 : 0))
#define GROUPS_MAX CH  // groups per stage, G = 128
#define BAR_BYTES ((16 * STAGES + 127) / 128 * 128)  // full[STAGES], empty[STAGES], 8 bytes each

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %%1; cvt.u32.u64 %%0, t; }" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%%0], %%1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%%0], %%1;" :: "r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%%1], %%2;"
                 " selp.u32 %%0, 1, 0, p; }" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes,
                                          unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%%0], [%%1], %%2, [%%3];" :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

extern "C" __global__ void __launch_bounds__(32 * (CONSUMERS + 1))
%(name)s(const bf16_t* __restrict__ x, const unsigned char* __restrict__ q,
         const bf16_t* __restrict__ scale, const bf16_t* __restrict__ zero,
         bf16_t* __restrict__ out, int M, int N, int K, int ldx, int lds, int ldo,
         int group_shift) {
  // dynamic shared memory: full[STAGES], empty[STAGES] barriers, then the stages: ROWS rows
  // x ROW_PITCH bytes of weights, then scales [GROUPS_MAX][ROWS] and zeros [GROUPS_MAX][ROWS]
  extern __shared__ __align__(128) unsigned char smem[];
  const int STAGE_BYTES = ((ROWS * ROW_PITCH + 4 * GROUPS_MAX * ROWS) + 127) & ~127;
  unsigned char* stages = smem + BAR_BYTES;
  const unsigned bars = smem_u32(smem);  // full[s] at bars + 8 s, empty[s] at bars + 8 (STAGES + s)
  const int warp = threadIdx.y, lane = threadIdx.x;
  const int chunks = K >> 7, iters = (chunks + CH - 1) / CH;
  const int r0 = blockIdx.x * ROWS;

  if (warp == 0 && lane < 2 * STAGES) mbar_init(bars + 8 * lane, lane < STAGES ? 1 : CONSUMERS);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();

  if (warp == CONSUMERS) {  // producer
    for (int it = 0; it < iters; ++it) {
      const int s = it %% STAGES;
      if (it >= STAGES) mbar_wait(bars + 8 * (STAGES + s), ((it / STAGES) - 1) & 1);
      const int c0 = it * CH, ch = min(CH, chunks - c0);
      const int g0 = (c0 << 7) >> group_shift, g1 = (((c0 + ch) << 7) - 1) >> group_shift;
      const int groups = g1 - g0 + 1;
      unsigned char* st = stages + s * STAGE_BYTES;
      if (lane == 0) mbar_expect(bars + 8 * s, ROWS * ch * 64 + 4 * groups * ROWS);
      __syncwarp();
      for (int r = lane; r < ROWS; r += 32)
        bulk_copy(smem_u32(st + r * ROW_PITCH), q + (size_t)(r0 + r) * (K >> 1) + c0 * 64,
                  ch * 64, bars + 8 * s);
      for (int i = lane; i < 2 * groups; i += 32) {
        const bf16_t* src = (i & 1 ? zero : scale) + (size_t)(g0 + (i >> 1)) * lds + r0;
        unsigned char* dst = st + ROWS * ROW_PITCH + ((i & 1) * GROUPS_MAX + (i >> 1)) * ROWS * 2;
        bulk_copy(smem_u32(dst), src, ROWS * 2, bars + 8 * s);
      }
    }
  } else {  // consumer (tile, slot)
    const int g = lane >> 2, t = lane & 3, tile = warp / CH, slot = warp %% CH;
    const int ra = tile * 16 + g, rb = ra + 8;
    float acc[1][M_TILES][4];  // R = 1 tile per consumer warp
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[0][mt][i] = 0.f;
    for (int it = 0; it < iters; ++it) {
      const int s = it %% STAGES, c = it * CH + slot;
      mbar_wait(bars + 8 * s, (it / STAGES) & 1);
      const unsigned char* st = stages + s * STAGE_BYTES;
      uint4 wa = make_uint4(0, 0, 0, 0), wb = wa;
      float sa = 0.f, sb = 0.f, za = 0.f, zb = 0.f;
      if (c < chunks) {
        wa = *reinterpret_cast<const uint4*>(st + ra * ROW_PITCH + slot * 64 + t * 16);
        wb = *reinterpret_cast<const uint4*>(st + rb * ROW_PITCH + slot * 64 + t * 16);
        const int gl = ((c << 7) >> group_shift) - (((it * CH) << 7) >> group_shift);
        const bf16_t* ss = reinterpret_cast<const bf16_t*>(st + ROWS * ROW_PITCH) + gl * ROWS;
        const bf16_t* zz = ss + GROUPS_MAX * ROWS;
        sa = bf16_to_f(ss[ra]); sb = bf16_to_f(ss[rb]);
        za = bf16_to_f(zz[ra]); zb = bf16_to_f(zz[rb]);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(bars + 8 * (STAGES + s));  // stage s read: the producer may refill it
      if (c < chunks) {
        const uint4 wa1[1] = {wa}, wb1[1] = {wb};
        const float sa1[1] = {sa}, sb1[1] = {sb}, za1[1] = {za}, zb1[1] = {zb};
        accumulate_chunk(acc, wa1, wb1, sa1, sb1, za1, zb1, x, M, ldx, c, g, t);
      }
    }
    // partial sums of the CH slots of a tile, reduced by slot 0 in the stage memory, free
    // once every consumer is done (every copy has landed: each was waited for)
    asm volatile("bar.sync 1, %%0;" :: "r"(32 * CONSUMERS) : "memory");
    float* partial = reinterpret_cast<float*>(stages);
    const int me = warp * 32 + lane;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[me * 4 * M_TILES + mt * 4 + i] = acc[0][mt][i];
    asm volatile("bar.sync 1, %%0;" :: "r"(32 * CONSUMERS) : "memory");
    if (slot != 0) return;
    for (int z = 1; z < CH; ++z) {
      const int other = (warp + z) * 32 + lane;
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[0][mt][i] += partial[other * 4 * M_TILES + mt * 4 + i];
    }
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 8 * mt + 2 * t + (i & 1), n = r0 + tile * 16 + g + 8 * (i >> 1);
        if (m < M && n < N) out[(size_t)m * ldo + n] = f_to_bf16(acc[0][mt][i]);
      }
  }
}
"""


def smem_bytes(m_tiles: int, tiles: int, ch: int, stages: int) -> int:
    """Dynamic shared memory of the pipelined kernel: barriers, then ``stages`` stages (which
    hold the partial sums at the end)."""
    rows = 16 * tiles
    pitch = ch * 64 + (64 if ch * 64 % 128 == 0 else 0)
    stage = -(-(rows * pitch + 4 * ch * rows) // 128) * 128
    assert stages * stage >= 4 * 32 * tiles * ch * 4 * m_tiles, "stages too small for the partial sums"
    return -(-16 * stages // 128) * 128 + stages * stage


@functools.lru_cache(maxsize=None)
def compiled(m_tiles: int, tiles: int, ch: int, stages: int, capability: tuple[int, int]):
    """The pipelined kernel for ``8 * m_tiles`` activation rows, ``tiles`` 16-row tiles per
    block, ``ch`` chunks per stage and ``stages`` stages (NVRTC, once per process)."""
    name = f"int4_tc_gemv_pipelined_m{m_tiles}_t{tiles}_c{ch}_s{stages}"
    source = PIPELINED_SOURCE % dict(m_tiles=m_tiles, tiles=tiles, ch=ch, stages=stages, name=name,
                                     bf16_helpers=nvrtc.BF16_HELPERS, mma_helpers=nvrtc.MMA_HELPERS, r=1, shuffled=0)
    kernel = nvrtc.compile_kernel(source, name, capability)
    kernel.set_shared_memory_config(smem_bytes(m_tiles, tiles, ch, stages))
    return kernel


def can_pipeline(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 tiles: int) -> bool:
    """The bulk copies' contract on top of ``cuda_gemv.can_run``: whole blocks of ``16 * tiles`` rows,
    and every group's scales and zero points starting on a 16-byte boundary."""
    return (qdata.shape[0] % (16 * tiles) == 0
            and scale.stride(0) % 8 == 0
            and scale.data_ptr() % 16 == 0
            and zero_point.data_ptr() % 16 == 0)


def pipelined_gemv(x, qdata, scale, zero_point, group_size, cfg):
    """``x [M <= 16, K] @ W.T`` through the pipelined kernel; needs :func:`can_pipeline`."""
    m, k = x.shape
    n = qdata.shape[0]
    assert cuda_gemv.can_run(x, qdata, scale, zero_point, group_size)
    assert can_pipeline(qdata, scale, zero_point, cfg["TILES"])
    m_tiles = 1 if m <= 8 else 2
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    kernel = compiled(m_tiles, cfg["TILES"], cfg["CH"], cfg["STAGES"], torch.cuda.get_device_capability())
    kernel(
        grid=(n // (16 * cfg["TILES"]), 1, 1),
        block=(32, cfg["TILES"] * cfg["CH"] + 1, 1),
        args=[x, qdata, scale, zero_point, out, m, n, k, x.stride(0), scale.stride(0),
              out.stride(0), group_size.bit_length() - 1],
        shared_mem=smem_bytes(m_tiles, cfg["TILES"], cfg["CH"], cfg["STAGES"]),
    )
    return out


CONFIGS = [dict(TILES=t, CH=c, STAGES=s) for t, c in [(1, 4), (1, 8), (2, 2), (2, 4), (4, 2)]
           for s in (4, 8, 12)]


def check():
    worst, t0 = 0.0, time.time()
    cases = [(n, k, g, m) for n, k in [(256, 1024), (128, 4096 + 128), (4096, 4096), (96, 640),
                                        (256, 8192)]
             for g in (128, 256) if k % g == 0 for m in (1, 3, 8, 9, 16)]
    for n, k, g, m in cases:
        t = Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), (1, g))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference.linear(x, t, None)
        for cfg in [c for c in CONFIGS if can_pipeline(t.qdata, t.scale, t.zero_point, c["TILES"])]:
            out = pipelined_gemv(x, t.qdata, t.scale, t.zero_point, g, cfg)
            err = rel_error(ref, out)
            worst = max(worst, err)
            if err > 1e-2:
                print(f"WRONG n={n} k={k} g={g} m={m} cfg={cfg}: rel err {err:.4f}", flush=True)
    print(f"check: {len(cases)} cases, worst rel err vs reference {worst:.2e} "
          f"({time.time() - t0:.1f} s incl. compile)", flush=True)


WEIGHTS_ONLY = ("        accumulate_chunk(acc, wa1, wb1, sa1, sb1, za1, zb1, x, M, ldx, c, g, t);",
                "        acc[0][0][0] += __uint_as_float(wa.x ^ wb.y ^ __float_as_uint(sa + zb));")


def weights_only_kernel(m_tiles, cfg, cap):
    src = PIPELINED_SOURCE
    assert WEIGHTS_ONLY[0] in src
    name = "pipelined_weights_only_t{TILES}_c{CH}_s{STAGES}".format(**cfg)
    src = src.replace(*WEIGHTS_ONLY) % dict(m_tiles=m_tiles, tiles=cfg["TILES"], ch=cfg["CH"],
                                            stages=cfg["STAGES"], name=name,
                                            bf16_helpers=nvrtc.BF16_HELPERS, mma_helpers=nvrtc.MMA_HELPERS, r=1, shuffled=0)
    kernel = nvrtc.compile_kernel(src, name, cap)
    kernel.set_shared_memory_config(smem_bytes(m_tiles, cfg["TILES"], cfg["CH"], cfg["STAGES"]))
    return kernel


def sweep(bw):
    cap = torch.cuda.get_device_capability()
    shapes = [(8192, 8192), (28672, 8192), (4096, 14336), (4096, 4096)]
    if "--quick" not in sys.argv:
        shapes += [(14336, 4096), (6144, 4096), (1024, 4096)]
    for n, k in shapes:
        copies = max(2, min(16, int(400e6 // (n * k * 2))))
        qs = [Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, (1, 128))
              for _ in range(copies)]
        ws = [q.dequantize() for q in qs]
        nbytes = n * k / 2 + 4 * n * k / 128
        pct = lambda us: nbytes / us / 1e3 / bw * 100  # noqa: E731
        for m in (1, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = graph_time_us([lambda w=w: F.linear(x, w) for w in ws])
            t_reg = graph_time_us([lambda q=q: cuda_gemv.int4_gemv(
                x, q.qdata, q.scale, q.zero_point, 128) for q in qs])
            ranked = []
            for cfg in CONFIGS:
                t = graph_time_us([lambda q=q, c=cfg: pipelined_gemv(
                    x, q.qdata, q.scale, q.zero_point, 128, c) for q in qs], iters=10)
                ranked.append((t, cfg))
            ranked.sort(key=lambda r: r[0])
            best_t, best = ranked[0]
            line = (f"{n}x{k} M={m}: bf16 {t_bf16:.2f} | register {t_reg:.2f} ({pct(t_reg):.0f}%)"
                    f" | pipelined best {best_t:.2f} ({pct(best_t):.0f}%, {t_bf16 / best_t:.2f}x bf16) "
                    f"{best}, then " + ", ".join(f"{t:.2f} {c}" for t, c in ranked[1:4]))
            if m == 1:
                m_tiles = 1
                kern = weights_only_kernel(m_tiles, best, cap)
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                smem = smem_bytes(m_tiles, best["TILES"], best["CH"], best["STAGES"])
                t_w = graph_time_us([lambda q=q: kern(
                    grid=(n // (16 * best["TILES"]), 1, 1), block=(32, best["TILES"] * best["CH"] + 1, 1),
                    args=[x, q.qdata, q.scale, q.zero_point, out, m, n, k, x.stride(0),
                          q.scale.stride(0), out.stride(0), 7], shared_mem=smem) for q in qs])
                line += f" | its weights only {t_w:.2f} ({pct(t_w):.0f}%)"
            print(line, flush=True)
        del qs, ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    check()
    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    sweep(bw)
