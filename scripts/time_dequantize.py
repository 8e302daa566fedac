"""Time the int4 -> bf16 dequantization: the CUDA kernel vs the torch ops (CUDA graphs)."""
import sys, torch
from benchmarks.common import graph_time_us, copy_bandwidth_gbs
from int4tensor import Int4Tensor, kernels, quant_primitives
bw = copy_bandwidth_gbs()
for n, k in [(8192, 8192), (28672, 8192), (4096, 14336)]:
    ts = [Int4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), (1, 128)) for _ in range(2)]
    t_k = graph_time_us([lambda t=t: kernels.dequantize_int4(t.qdata, t.scale, t.zero_point, 128, torch.bfloat16) for t in ts])
    t_t = graph_time_us([lambda t=t: quant_primitives.dequantize_int4(t.qdata, t.scale, t.zero_point, 128, torch.bfloat16) for t in ts])
    nbytes = n * k * 2 + n * k / 2 + 4 * n * k / 128
    print(f"dequantize {n}x{k}: kernel {t_k:.1f} us ({nbytes / t_k / 1e3 / bw * 100:.0f}% of copy), torch ops {t_t:.1f} us", flush=True)
