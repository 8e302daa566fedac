"""Which load structures read int4 weights near the copy bandwidth? Load-only kernels (nothing
computed) over buffers the size of int4 weights, timed like bench_linear (CUDA graph, rotating
copies): a grid-stride read with 1-8 loads in flight per thread at every occupancy, and the
decode GEMV's pattern (a warp reads 16 rows x 64 bytes per 128-wide K chunk, U chunks in
flight) with K split over S warps (strided or contiguous chunks) and W warps per block. Tells
whether the GEMV's gap to the read ceiling is its pattern or its parallelism."""

import torch

from benchmarks.common import copy_bandwidth_gbs, graph_time_us  # noqa: E402
from int4tensor.kernels import nvrtc  # noqa: E402

READ_ALL = r"""
extern "C" __global__ void read_all_L%(loads)d(const uint4* __restrict__ p, int n, unsigned* out) {
  unsigned acc = 0;
  const int stride = gridDim.x * blockDim.x;
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + (%(loads)d - 1) * stride < n; i += %(loads)d * stride) {
    uint4 v[%(loads)d];
#pragma unroll
    for (int j = 0; j < %(loads)d; ++j) v[j] = __ldg(p + i + j * stride);
#pragma unroll
    for (int j = 0; j < %(loads)d; ++j) acc ^= v[j].x ^ v[j].w;
  }
  for (; i < n; i += stride) acc ^= __ldg(p + i).x;
  if (acc == 0x9e3779b9u) out[0] = acc;
}
"""

# block (32, W); grid (N / 16 / W, S): warp = 16-row tile, blockIdx.y = K slice
PATTERN = r"""
extern "C" __global__ void pattern_U%(u)d_C%(contig)d(const uint4* __restrict__ q, unsigned* out,
                                                   int N, int K) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const int r0 = (blockIdx.x * blockDim.y + threadIdx.y) * 16;
  const int S = gridDim.y, slice = blockIdx.y, chunks = K >> 7, row_len = K >> 5;
  const uint4* qa = q + (size_t)(r0 + g) * row_len + t;
  const uint4* qb = q + (size_t)(r0 + g + 8) * row_len + t;
  const int per = chunks / S;
  unsigned acc = 0;
  for (int i = 0; i + %(u)d <= per; i += %(u)d) {
    uint4 a[%(u)d], b[%(u)d];
#pragma unroll
    for (int u = 0; u < %(u)d; ++u) {
      const int c = %(contig)d ? slice * per + i + u : slice + (i + u) * S;
      a[u] = __ldg(qa + c * 4); b[u] = __ldg(qb + c * 4);
    }
#pragma unroll
    for (int u = 0; u < %(u)d; ++u) acc ^= a[u].x ^ b[u].w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
"""


def main():
    bw = copy_bandwidth_gbs()
    cap = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s, {sms} SMs", flush=True)
    for n, k in [(8192, 8192), (28672, 8192)]:
        nbytes = n * k // 2
        pct = lambda us: nbytes / us / 1e3 / bw * 100  # noqa: E731
        copies = max(2, min(16, int(400e6 // nbytes)))
        bufs = [torch.empty(n, k // 2, dtype=torch.int8, device="cuda") for _ in range(copies)]
        print(f"== {n}x{k} int4 ({nbytes / 1e6:.1f} MB)", flush=True)
        for loads in (1, 2, 4, 8):
            kern = nvrtc.compile_kernel(READ_ALL % dict(loads=loads), f"read_all_L{loads}", cap)
            line = f"grid-stride, {loads} loads in flight/thread:"
            for warps_per_sm in (8, 16, 32, 64):
                threads = 256
                grid = sms * warps_per_sm * 32 // threads
                us = graph_time_us([lambda b=b: kern(grid=(grid, 1, 1), block=(threads, 1, 1),
                                                     args=[b, nbytes // 16, out]) for b in bufs])
                line += f" | {warps_per_sm} warps/SM {us:.2f} ({pct(us):.0f}%)"
            print(line, flush=True)
        for contig in (0, 1):
            for u in (1, 2, 4, 8):
                kern = nvrtc.compile_kernel(PATTERN % dict(u=u, contig=contig),
                                            f"pattern_U{u}_C{contig}", cap)
                line = f"GEMV pattern U={u} {'contiguous' if contig else 'strided'} K slices:"
                for w in (2, 4, 8):
                    for s in (4, 8, 16, 32):
                        if (k // 128) % (s * u):
                            continue
                        grid = (n // 16 // w, s, 1)
                        us = graph_time_us([lambda b=b: kern(grid=grid, block=(32, w, 1),
                                                             args=[b, out, n, k]) for b in bufs])
                        line += f" | W{w} S{s} {us:.2f} ({pct(us):.0f}%)"
                print(line, flush=True)
        del bufs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
