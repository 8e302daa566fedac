"""Device exploration: the calling convention of fbgemm's f8i4bf16_rowwise (plain int4 layout,
fp8 activations)."""
import torch

import fbgemm_gpu.experimental.gen_ai  # noqa: F401

from int4tensor import Int4Tensor
from int4tensor.quant_primitives import quantize_fp8_rows

torch.manual_seed(0)
fb = torch.ops.fbgemm


def rel(ref, out):
    return float((ref.double() - out.double()).norm() / ref.double().norm())


for domain in ("float", "none"):
    for m, n, k in ((16, 512, 1024), (1, 4096, 4096), (128, 200, 384)):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        t = Int4Tensor.from_hp(w, (1, 128), zero_point_domain=domain)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        ref = x.float() @ t.dequantize(torch.float32).t()
        xq, xs = quantize_fp8_rows(x)
        tr = lambda a: a.t().contiguous()  # noqa: E731
        for name, args in {
            "scale [K/G,N] bf16": (t.scale, t.zero_point),
            "scale [K/G,N] fp32": (t.scale.float(), t.zero_point.float()),
            "scale [N,K/G] bf16": (tr(t.scale), tr(t.zero_point)),
            "scale [N,K/G] fp32": (tr(t.scale).float(), tr(t.zero_point).float()),
        }.items():
            try:
                out = fb.f8i4bf16_rowwise(xq, t.qdata, xs, *args)
                torch.cuda.synchronize()
                print(f"{domain:5s} M={m} N={n} K={k} {name:22s} rel_err={rel(ref, out):.3e} "
                      f"shape={tuple(out.shape)} dtype={out.dtype}")
            except Exception as e:  # noqa: BLE001
                print(f"{domain:5s} M={m} N={n} K={k} {name:22s} FAILED {str(e).splitlines()[0][:120]}")
