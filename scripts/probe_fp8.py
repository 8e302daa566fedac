"""Device exploration of fbgemm's fp8-activation int4 kernels (Hopper, fbgemm-gpu-genai).

1. The layout of the packed fp8 group scales ``[K/G, 8, N]`` that ``preshuffle_i4`` makes, and
   whether the preshuffled int4 values can be read back exactly through the kernel (needed to
   slice an fp8-activation Int4PreshuffledTensor along N or K).
2. The calling convention of ``f8i4bf16_shuffled_grouped`` for 3D (MoE) weights.
3. Where the time of the fp8 path goes (activation quantization vs the GEMM), inside CUDA
   graphs, next to bf16 and the bf16-activation kernels.
"""
import traceback

import torch

import fbgemm_gpu.experimental.gen_ai  # noqa: F401
from fbgemm_gpu.experimental.gen_ai import quantize as fq

from benchmarks.common import graph_time_us  # noqa: E402
from int4tensor import Int4Tensor  # noqa: E402
from int4tensor.quant_primitives import quantize_fp8_rows  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
fb = torch.ops.fbgemm
G = 128


def rel(ref, out):
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm())


def attempt(name, fn, ref=None):
    try:
        out = fn()
        torch.cuda.synchronize()
        extra = "" if ref is None else f" rel_err={rel(ref, out):.3e} bitwise={torch.equal(ref, out)}"
        print(f"{name:60s} shape={tuple(out.shape)}{extra}", flush=True)
        return out
    except Exception as e:  # noqa: BLE001
        print(f"{name:60s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def fp8_parts(w):
    """fbgemm's own steps before preshuffling: (q int8 [N, K], gs fp8 [K/G, N], row fp32 [N])."""
    wq8, row = fq.quantize_fp8_row(w)
    q, gs = fq.int4_row_quantize(wq8, G)
    return q, gs.to(torch.float8_e4m3fn), row


print("== 1. packed group scales and exact read-back")
N, K = 256, 512
w = torch.randn(N, K, dtype=torch.bfloat16, device=dev) * 0.05
q, gs, row = fp8_parts(w)
wq_ref, (packed_ref, row_ref) = fq.quantize_int4_preshuffle(w, G, dtype="fp8")
wq, packed = fb.preshuffle_i4(fq.pack_int4(q), gs)
print("packed", tuple(packed.shape), packed.dtype, packed.stride(), "gs", tuple(gs.shape))
print("same as quantize_int4_preshuffle:", torch.equal(wq, wq_ref),
      torch.equal(packed.view(torch.uint8), packed_ref.view(torch.uint8)), torch.equal(row, row_ref))
print("packed[0, :, 0] =", packed[0, :, 0].float().tolist(), " gs[0, 0] =", gs[0, 0].float().item())
print("packed.flatten()[:16] =", packed.flatten()[:16].float().tolist())
for name, view in [("[K/G, 8, N]", packed.float()),
                   ("[K/G, N, 8] as memory", packed.reshape(K // G, N, 8).permute(0, 2, 1).float())]:
    for j in range(8):
        for hyp, target in [("s*-(8-j)", (gs.float() * -(8 - j)).to(torch.float8_e4m3fn).float()),
                            ("s", gs.float())]:
            if torch.equal(view[:, j, :], target):
                print(f"  layout {name}: slot {j} == {hyp}")
# exact q through the kernel: identity activations, unit scales
_, unit_packed = fb.preshuffle_i4(fq.pack_int4(torch.zeros_like(q)),
                                  torch.ones_like(gs.float()).to(torch.float8_e4m3fn))
eye = torch.eye(K, device=dev, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
q_back = attempt("f8i4bf16_shuffled(I, wq, 1, 1, unit) = q^T",
                 lambda: fb.f8i4bf16_shuffled(eye, wq, torch.ones(K, device=dev),
                                              torch.ones(N, device=dev), unit_packed).t(),
                 q.to(torch.bfloat16))
if q_back is not None:
    wq2, packed2 = fb.preshuffle_i4(fq.pack_int4(q_back.round().to(torch.int8)), gs)
    print("re-preshuffle of the read-back is bitwise the original:", torch.equal(wq2, wq),
          torch.equal(packed2.view(torch.uint8), packed.view(torch.uint8)))
# does the unit-packed layout depend on the int4 data? (it should not)
_, unit_packed2 = fb.preshuffle_i4(fq.pack_int4(q), torch.ones_like(gs.float()).to(torch.float8_e4m3fn))
print("unit packed independent of q:", torch.equal(unit_packed.view(torch.uint8), unit_packed2.view(torch.uint8)))
# slice along N of the shuffled layout with fbgemm's helper vs re-preshuffle
try:
    sl = fq.shuffle_slice(wq, wq.ndim - 2, 64, 128, dtype="fp8")
    wq_s, _ = fb.preshuffle_i4(fq.pack_int4(q[64:192].contiguous()), gs[:, 64:192].contiguous())
    print("shuffle_slice N [64:192] == re-preshuffled slice:", torch.equal(sl, wq_s))
except Exception:  # noqa: BLE001
    traceback.print_exc()

print("== 2. f8i4bf16_shuffled_grouped for 3D weights")
E, M, N, K = 4, 16, 512, 1024
w3 = torch.randn(E, N, K, dtype=torch.bfloat16, device=dev) * 0.05
wq3, (gs3, rs3) = fq.quantize_int4_preshuffle(w3, G, dtype="fp8")
print("3D:", tuple(wq3.shape), tuple(gs3.shape), tuple(rs3.shape))
x3 = torch.randn(E, M, K, dtype=torch.bfloat16, device=dev)
xq3, xs3 = quantize_fp8_rows(x3.reshape(-1, K))
ref3 = torch.stack([fb.f8i4bf16_shuffled(xq3[e * M:(e + 1) * M], wq3[e], xs3[e * M:(e + 1) * M],
                                         rs3[e], gs3[e]) for e in range(E)]).reshape(E * M, N)
for dt in (torch.int64, torch.int32):
    ms = torch.full((E,), M, dtype=dt, device=dev)
    attempt(f"grouped M_sizes {dt}", lambda: fb.f8i4bf16_shuffled_grouped(xq3, wq3, xs3, rs3, gs3, ms), ref3)
for m in (1, 5, 64):
    xm = torch.randn(E * m, K, dtype=torch.bfloat16, device=dev)
    xqm, xsm = quantize_fp8_rows(xm)
    refm = torch.cat([fb.f8i4bf16_shuffled(xqm[e * m:(e + 1) * m], wq3[e], xsm[e * m:(e + 1) * m],
                                           rs3[e], gs3[e]) for e in range(E)])
    attempt(f"grouped equal M={m}", lambda: fb.f8i4bf16_shuffled_grouped(
        xqm, wq3, xsm, rs3, gs3, torch.full((E,), m, dtype=torch.int64, device=dev)), refm)
ragged = [3, 0, 20, 9]
xr = torch.randn(sum(ragged), K, dtype=torch.bfloat16, device=dev)
xqr, xsr = quantize_fp8_rows(xr)
offs = [0, 3, 3, 23, 32]
refr = torch.cat([fb.f8i4bf16_shuffled(xqr[offs[e]:offs[e + 1]], wq3[e], xsr[offs[e]:offs[e + 1]],
                                       rs3[e], gs3[e]) for e in range(E) if ragged[e]])
attempt("grouped ragged [3,0,20,9]", lambda: fb.f8i4bf16_shuffled_grouped(
    xqr, wq3, xsr, rs3, gs3, torch.tensor(ragged, dtype=torch.int64, device=dev)), refr)
# bf16 grouped with flattened scales (session 1 tried only 3D scales)
t3 = Int4Tensor.from_hp(w3, (1, 1, G))
sh = [fb.preshuffle_i4(t3.qdata[e].clone(), t3.scale[e]) for e in range(E)]
bq = torch.stack([a for a, _ in sh]); bs = torch.stack([b for _, b in sh])
xb = torch.randn(E * M, K, dtype=torch.bfloat16, device=dev)
refb = torch.stack([fb.bf16i4bf16_shuffled(xb[e * M:(e + 1) * M], bq[e], bs[e], t3.zero_point[e])
                    for e in range(E)]).reshape(E * M, N)
for nm, s_, z_ in [("3D", bs, t3.zero_point), ("flat", bs.reshape(-1, N), t3.zero_point.reshape(-1, N))]:
    attempt(f"bf16 grouped scales {nm}", lambda: fb.bf16i4bf16_shuffled_grouped(
        xb, bq, s_, z_, torch.full((E,), M, dtype=torch.int64, device=dev)), refb)

print("== 3. time (µs, CUDA graph, rotating weights) of the fp8 path's parts")
print(f"{'N':>6} {'K':>6} {'M':>5} {'bf16':>8} {'bf16i4sh':>9} {'q_torch':>8} {'q_fbgemm':>9} "
      f"{'f8i4 only':>9} {'f8i4 grp1':>9} {'f8i4 rw':>8}")
for n, k in [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]:
    copies = max(2, min(8, int(300e6 // (n * k * 2))))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    f8 = [fq.quantize_int4_preshuffle(x, G, dtype="fp8") for x in ws]
    ts = [Int4Tensor.from_hp(x, (1, G)) for x in ws]
    b16 = [fb.preshuffle_i4(t.qdata.clone(), t.scale) for t in ts]
    for m in (1, 16, 128, 1024, 8192):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xs = quantize_fp8_rows(x)
        fq.quantize_fp8_row(x)  # autotune outside the graph
        one = torch.ones(1, dtype=torch.int64, device=dev) * m
        it = 20 if m <= 1024 else 5
        row = [
            graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws], it),
            graph_time_us([lambda b=b, t=t: fb.bf16i4bf16_shuffled(x, b[0], b[1], t.zero_point)
                           for b, t in zip(b16, ts)], it),
            graph_time_us([lambda: quantize_fp8_rows(x)], it),
            graph_time_us([lambda: fq.quantize_fp8_row(x)], it),
            graph_time_us([lambda f=f: fb.f8i4bf16_shuffled(xq, f[0], xs, f[1][1], f[1][0]) for f in f8], it),
        ]
        try:
            row.append(graph_time_us([lambda f=f: fb.f8i4bf16_shuffled_grouped(
                xq, f[0][None], xs, f[1][1][None], f[1][0][None], one) for f in f8], it))
        except Exception as e:  # noqa: BLE001
            row.append(float("nan")); print("grouped timing failed:", str(e)[:100])
        row.append(graph_time_us([lambda t=t: fb.f8i4bf16_rowwise(xq, t.qdata, xs, t.scale, t.zero_point)
                                  for t in ts], it))
        print(f"{n:>6} {k:>6} {m:>5} " + " ".join(f"{v:>8.1f}" for v in row), flush=True)
    del ws, f8, ts, b16
    torch.cuda.empty_cache()
