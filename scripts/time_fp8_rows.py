"""Time the per-row fp8 activation quantization: the CUDA kernel (quantize and round modes)
vs the torch ops, and the plain fp8 linear's parts at decode sizes (CUDA graphs)."""

import torch
import torch.nn.functional as F

from benchmarks.common import graph_time_us  # noqa: E402
from int4tensor import Int4Tensor, kernels, quant_primitives  # noqa: E402

for m, k in [(1, 4096), (1, 8192), (1, 28672), (16, 28672), (1024, 4096), (8192, 4096)]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    t_q = graph_time_us([lambda: kernels.quantize_fp8_rows(x)])
    t_r = graph_time_us([lambda: kernels.round_fp8_rows(x)])
    t_t = graph_time_us([lambda: quant_primitives.round_fp8_rows(x)])
    t_e = graph_time_us([lambda: torch.empty_like(x)])
    print(f"M={m} K={k}: quantize kernel {t_q:.2f} us, round kernel {t_r:.2f} us, "
          f"torch ops (round) {t_t:.2f} us, an empty graph node {t_e:.2f} us", flush=True)
for n, k in [(8192, 28672), (4096, 4096)]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ts = [Int4Tensor.from_hp(w, (1, 128)) for _ in range(4)]
    t8 = [Int4Tensor(t.qdata, t.scale, t.zero_point, t.block_size, t.shape, activation_dtype="fp8")
          for t in ts]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    a = graph_time_us([lambda t=t: F.linear(x, t) for t in ts])
    b = graph_time_us([lambda t=t: F.linear(x, t) for t in t8])
    c = graph_time_us([lambda t=t: F.linear(kernels.round_fp8_rows(x), t) for t in ts])
    print(f"{n}x{k} M=1: bf16-act linear {a:.2f} us, fp8-act linear {b:.2f} us, "
          f"round + bf16-act linear {c:.2f} us", flush=True)
