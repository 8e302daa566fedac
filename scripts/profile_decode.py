"""Where a decode step of the bench_decode model spends its GPU time (kernel totals, eager).

    python -m scripts.profile_decode [--layers 32] [--batch 1 32] [--compile]

Profiles a few eager (or compiled) decode steps with torch.profiler, in bf16 and after
quantize_ + convert (preshuffled), and prints per-kernel GPU time per step, split into the
linear layers' kernels and everything else. Also times the attention op alone in two forms:
SDPA with ``enable_gqa`` over the static cache, and the query heads folded per KV head.
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F

from benchmarks.bench_decode import LLAMA3_8B, Decoder  # noqa: E402
from int4tensor import Int4WeightOnlyConfig, convert_model_to_packed_tensors_, quantize_  # noqa: E402

LINEAR_HINTS = ("gemv", "gemm", "nvjet", "cutlass", "sm90", "f8i4", "bf16i4", "int4", "splitk",
                "Kernel2", "gemmk", "xmma")


def kernel_times(model, batch, start, steps=3, compile=False):
    tokens = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([start], device="cuda")
    step = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    with torch.no_grad():
        for _ in range(3):
            step(tokens, pos)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(tokens, pos)
            torch.cuda.synchronize()
    totals = collections.Counter()
    counts = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] += ev.device_time / steps
            counts[ev.name] += 1 / steps
    return totals, counts


def is_linear(name):  # Inductor names its fused kernels after the ops they follow: not GEMMs
    return not name.startswith("triton_") and any(h in name for h in LINEAR_HINTS)


def report(label, totals, counts):
    lin = sum(t for n, t in totals.items() if is_linear(n))
    total = sum(totals.values())
    print(f"\n== {label}: {total / 1e3:.3f} ms of kernels per step; linear-like {lin / 1e3:.3f} ms, "
          f"other {(total - lin) / 1e3:.3f} ms")
    for name, t in totals.most_common(18):
        tag = "L" if is_linear(name) else " "
        print(f"  {tag} {t:9.1f} us  x{counts[name]:5.0f}  {name[:110]}")


def time_attention(batch, max_len=1024, start=512):
    c = LLAMA3_8B
    hd, h, kvh = c["dim"] // c["heads"], c["heads"], c["kv_heads"]
    q = torch.randn(batch, h, 1, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kvh, max_len, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = (torch.arange(max_len, device="cuda") <= start)[None, None, None, :]

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def folded():  # [B, KVH, H/KVH, D]: one KV head's query heads as its query rows
        qf = q.view(batch, kvh, h // kvh, hd)
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask).view(batch, h, 1, hd)

    ref = gqa().float()
    err = float((folded().float() - ref).norm() / ref.norm())
    import triton.testing
    for name, fn in (("sdpa enable_gqa", gqa), ("sdpa folded heads", folded)):
        us = triton.testing.do_bench(fn, warmup=20, rep=100) * 1e3
        print(f"  attention batch {batch}: {name:<18} {us:7.1f} us   (x32 layers = {us * 32 / 1e3:.3f} ms)")
    print(f"  folded vs gqa rel err {err:.2e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for batch in args.batch:
        time_attention(batch)
    config = dict(LLAMA3_8B, layers=args.layers)
    for batch in args.batch:
        with torch.device("cuda"):
            model = Decoder(config, batch, 1024).to(torch.bfloat16).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.02) if p.ndim > 1 else None
        report(f"bf16 batch {batch}", *kernel_times(model, batch, 512, compile=args.compile))
        quantize_(model, Int4WeightOnlyConfig(group_size=128))
        convert_model_to_packed_tensors_(model)
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        report(f"int4 preshuffled batch {batch}", *kernel_times(model, batch, 512, compile=args.compile))
        del model
        torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
