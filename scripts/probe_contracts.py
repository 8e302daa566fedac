"""Device exploration: the exact contracts of fbgemm's batched / shuffled / fp8 int4 kernels.

Prints the relative error of each candidate calling convention against int4tensor's reference
path on the same quantized data. Run on a Hopper GPU with fbgemm-gpu-genai importable.
"""
import inspect
import traceback

import torch

import fbgemm_gpu.experimental.gen_ai  # noqa: F401
from fbgemm_gpu.experimental.gen_ai import quantize as fq

from int4tensor import Int4Tensor
from int4tensor.kernels import reference

torch.manual_seed(0)
dev = "cuda"
fb = torch.ops.fbgemm


def rel(ref, out):
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm())


def attempt(name, fn, ref):
    try:
        out = fn()
        torch.cuda.synchronize()
        print(f"{name:60s} shape={tuple(out.shape)} rel_err={rel(ref, out):.3e} "
              f"bitwise={torch.equal(ref, out)}")
        return out
    except Exception as e:  # noqa: BLE001
        print(f"{name:60s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}")


B, M, N, K = 4, 16, 512, 1024
w3 = torch.randn(B, N, K, dtype=torch.bfloat16, device=dev) * 0.02
t3 = Int4Tensor.from_hp(w3, (1, 1, 128))
x3 = torch.randn(B, M, K, dtype=torch.bfloat16, device=dev)
ref3 = reference.bmm(x3, t3)
print("== bf16i4bf16_rowwise_batched")
attempt("A scale [B,K/G,N] bf16", lambda: fb.bf16i4bf16_rowwise_batched(x3, t3.qdata, t3.scale, t3.zero_point), ref3)
attempt("B scale [B,K/G,N] fp32", lambda: fb.bf16i4bf16_rowwise_batched(x3, t3.qdata, t3.scale.float(), t3.zero_point.float()), ref3)
tr = lambda a: a.transpose(-1, -2).contiguous()  # noqa: E731
attempt("C scale [B,N,K/G] bf16", lambda: fb.bf16i4bf16_rowwise_batched(x3, t3.qdata, tr(t3.scale), tr(t3.zero_point)), ref3)
attempt("D scale [B,N,K/G] fp32", lambda: fb.bf16i4bf16_rowwise_batched(x3, t3.qdata, tr(t3.scale).float(), tr(t3.zero_point).float()), ref3)
attempt("E loop of 2D rowwise", lambda: torch.stack([fb.bf16i4bf16_rowwise(x3[b], t3.qdata[b], t3.scale[b], t3.zero_point[b]) for b in range(B)]), ref3)
# a variant where the whole batch's scales are laid out as one 2D [K/G, B*N]
attempt("F scale [K/G, B*N]", lambda: fb.bf16i4bf16_rowwise_batched(x3, t3.qdata, t3.scale.transpose(0, 1).reshape(K // 128, B * N).contiguous(), t3.zero_point.transpose(0, 1).reshape(K // 128, B * N).contiguous()), ref3)
attempt("G scale [B*K/G, N] (flattened)", lambda: fb.bf16i4bf16_rowwise_batched(x3, t3.qdata, t3.scale.reshape(B * K // 128, N), t3.zero_point.reshape(B * K // 128, N)), ref3)

print("== preshuffle_i4 + bf16i4bf16_shuffled (2D)")
t2 = t3[0]
x2 = x3[0]
ref2 = reference.linear(x2, t2, None)
q_before = t2.qdata.clone()
wq, s_sh = fb.preshuffle_i4(t2.qdata.clone(), t2.scale)
print('preshuffle_i4 leaves its input alone:', torch.equal(q_before, t2.qdata))
q_in = t2.qdata.clone(); _ = fb.preshuffle_i4(q_in, t2.scale); print('input modified in place:', not torch.equal(q_in, t2.qdata))
print("preshuffle_i4 bf16 scale: wq", wq.shape, wq.dtype, "scale", s_sh.shape, s_sh.dtype,
      "scale unchanged:", torch.equal(s_sh, t2.scale) if s_sh.shape == t2.scale.shape else "n/a")
row = attempt("rowwise 2D", lambda: fb.bf16i4bf16_rowwise(x2, t2.qdata, t2.scale, t2.zero_point), ref2)
sh = attempt("shuffled 2D", lambda: fb.bf16i4bf16_shuffled(x2, wq, s_sh, t2.zero_point), ref2)
if row is not None and sh is not None:
    print("shuffled vs rowwise bitwise:", torch.equal(row, sh), "max abs diff", (row.float() - sh.float()).abs().max().item())
# preshuffle of qdata twice gives same? is it a pure permutation of bytes?
print("preshuffled bytes are a permutation:", torch.equal(torch.sort(wq.flatten().view(torch.uint8))[0], torch.sort(t2.qdata.flatten().view(torch.uint8))[0]))

print("== bf16i4bf16_shuffled_batched / grouped")
shuf = [fb.preshuffle_i4(t3.qdata[b].clone(), t3.scale[b]) for b in range(B)]
wq3 = torch.stack([a for a, _ in shuf])
s3 = torch.stack([b_ for _, b_ in shuf])
attempt("shuffled_batched scale [B,K/G,N]", lambda: fb.bf16i4bf16_shuffled_batched(x3, wq3, s3, t3.zero_point), ref3)
m_sizes = torch.full((B,), M, dtype=torch.int32, device=dev)
attempt("shuffled_grouped X [B*M,K] M_sizes int64", lambda: fb.bf16i4bf16_shuffled_grouped(x3.reshape(B * M, K), wq3, s3, t3.zero_point, m_sizes).view(B, M, N), ref3)
attempt("shuffled_grouped M_sizes int32", lambda: fb.bf16i4bf16_shuffled_grouped(x3.reshape(B * M, K), wq3, s3, t3.zero_point, m_sizes.int()).view(B, M, N), ref3)
ragged = torch.tensor([3, 0, 20, 9], dtype=torch.int32, device=dev)
xr = torch.randn(int(ragged.sum()), K, dtype=torch.bfloat16, device=dev)
refr = torch.cat([reference.linear(part, t3[b], None) for b, part in enumerate(xr.split(ragged.tolist()))])
attempt("shuffled_grouped ragged M_sizes [3,0,20,9]", lambda: fb.bf16i4bf16_shuffled_grouped(xr, wq3, s3, t3.zero_point, ragged), refr)

print("== fp8 activations")
w2 = w3[0]
wq8, (gs8, rs8) = fq.quantize_int4_preshuffle(w2, group_size=128, dtype="fp8")
print("fp8 preshuffle: wq", wq8.shape, wq8.dtype, "group_scale", gs8.shape, gs8.dtype, "row_scale", rs8.shape, rs8.dtype)
print(inspect.signature(fq.quantize_fp8_row))
xq, xs = fq.quantize_fp8_row(x2)
print("quantize_fp8_row ->", xq.shape, xq.dtype, xs.shape, xs.dtype)
dense_ref = x2.float() @ w2.float().t()
attempt("f8i4bf16_shuffled vs float", lambda: fb.f8i4bf16_shuffled(xq, wq8, xs, rs8, gs8), dense_ref)
for m in (1, 3, 16, 128):
    xm = torch.randn(m, K, dtype=torch.bfloat16, device=dev)
    xq, xs = fq.quantize_fp8_row(xm)
    attempt(f"f8i4bf16_shuffled M={m}", lambda: fb.f8i4bf16_shuffled(xq, wq8, xs, rs8, gs8), xm.float() @ w2.float().t())

print("== alignment of the shuffled/rowwise kernels")
for n, k in [(200, 384), (96, 640), (112, 256), (80, 256), (48, 256), (16, 256), (32, 384), (160, 640)]:
    for m in (1, 3):
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev)
        t = Int4Tensor.from_hp(w, (1, 128))
        x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        ref = reference.linear(x, t, None)
        attempt(f"rowwise N={n} K={k} M={m}", lambda: fb.bf16i4bf16_rowwise(x, t.qdata, t.scale, t.zero_point), ref)
        try:
            a, b = fb.preshuffle_i4(t.qdata.clone(), t.scale)
            attempt(f"shuffled N={n} K={k} M={m}", lambda: fb.bf16i4bf16_shuffled(x, a, b, t.zero_point), ref)
        except Exception as e:  # noqa: BLE001
            print(f"preshuffle N={n} K={k} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}")
for g in (32, 64, 256):
    w = torch.randn(256, 1024, dtype=torch.bfloat16, device=dev)
    t = Int4Tensor.from_hp(w, (1, g))
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device=dev)
    ref = reference.linear(x, t, None)
    attempt(f"rowwise G={g}", lambda: fb.bf16i4bf16_rowwise(x, t.qdata, t.scale, t.zero_point), ref)
    try:
        a, b = fb.preshuffle_i4(t.qdata.clone(), t.scale)
        attempt(f"shuffled G={g}", lambda: fb.bf16i4bf16_shuffled(x, a, b, t.zero_point), ref)
    except Exception as e:  # noqa: BLE001
        print(f"preshuffle G={g} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}")

print("== batched with M=1, and grouped with ragged sizes, bigger shapes")
B2, N2, K2 = 8, 1024, 2048
tb = Int4Tensor.from_hp(torch.randn(B2, N2, K2, dtype=torch.bfloat16, device=dev), (1, 1, 128))
for m in (1, 5, 64):
    xb = torch.randn(B2, m, K2, dtype=torch.bfloat16, device=dev)
    refb = reference.bmm(xb, tb)
    attempt(f"rowwise_batched flattened scale M={m}", lambda: fb.bf16i4bf16_rowwise_batched(xb, tb.qdata, tb.scale.reshape(-1, N2), tb.zero_point.reshape(-1, N2)), refb)
    sh2 = [fb.preshuffle_i4(tb.qdata[b].clone(), tb.scale[b]) for b in range(B2)]
    wq2 = torch.stack([a for a, _ in sh2]); s2 = torch.stack([c for _, c in sh2])
    attempt(f"shuffled_batched 3D scale M={m}", lambda: fb.bf16i4bf16_shuffled_batched(xb, wq2, s2, tb.zero_point), refb)
    attempt(f"shuffled_batched flattened scale M={m}", lambda: fb.bf16i4bf16_shuffled_batched(xb, wq2, s2.reshape(-1, N2), tb.zero_point.reshape(-1, N2)), refb)
    ms_ = torch.full((B2,), m, dtype=torch.int32, device=dev)
    attempt(f"shuffled_grouped M={m}", lambda: fb.bf16i4bf16_shuffled_grouped(xb.reshape(-1, K2), wq2, s2, tb.zero_point, ms_).view(B2, m, N2), refb)
print("== shuffle_slice source")
try:
    print(inspect.getsource(fq.shuffle_slice))
except Exception:
    traceback.print_exc()
