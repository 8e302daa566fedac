"""End-to-end decode speed of a Llama-3-8B-shaped decoder: bf16 vs int4, in one run.

    python benchmarks/bench_decode.py [--layers 32] [--batch 1 8 32] [--out DIR]

The model is built from the Llama-3-8B config with random weights (nothing is downloaded):
dim 4096, 32 layers, 32 query / 8 key-value heads, MLP 14336, vocabulary 128256. Decoding uses
a static KV cache (max 1024 positions, starting at position 512 so attention reads a realistic
cache) and one CUDA graph per decode step; tokens/s = batch / (median step time). The same
model is timed in bf16, then quantized in place with Int4WeightOnlyConfig (every nn.Linear,
lm_head included) and timed again with the plain Int4Tensor layout (dispatch), and after
convert_model_to_packed_tensors_ (fbgemm's preshuffled layout).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_csv  # noqa: E402
from int4tensor import (  # noqa: E402
    Int4WeightOnlyConfig,
    convert_model_to_packed_tensors_,
    quantize_,
)

LLAMA3_8B = dict(vocab=128256, dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336,
                 rope_theta=500000.0)


class Attention(nn.Module):
    def __init__(self, c, batch, max_len):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c["heads"], c["kv_heads"], c["dim"] // c["heads"]
        self.wqkv = nn.Linear(c["dim"], (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(c["dim"], c["dim"], bias=False)
        cache = (batch, self.kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.randn(cache) * 0.5, persistent=False)
        self.register_buffer("v_cache", torch.randn(cache) * 0.5, persistent=False)

    def forward(self, x, freqs, pos, mask):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim,
             self.kv_heads * self.head_dim], dim=-1)
        q = rope(q.view(b, s, self.heads, self.head_dim), freqs).transpose(1, 2)
        k = rope(k.view(b, s, self.kv_heads, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask,
                                             enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def rope(x, freqs):  # x [B, S, H, D], freqs [S, D/2] complex
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, c, batch, max_len):
        super().__init__()
        self.attn = Attention(c, batch, max_len)
        self.w1 = nn.Linear(c["dim"], c["ffn"], bias=False)
        self.w3 = nn.Linear(c["dim"], c["ffn"], bias=False)
        self.w2 = nn.Linear(c["ffn"], c["dim"], bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(c["dim"]), nn.RMSNorm(c["dim"])

    def forward(self, x, freqs, pos, mask):
        x = x + self.attn(self.norm1(x), freqs, pos, mask)
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Decoder(nn.Module):
    def __init__(self, c, batch, max_len):
        super().__init__()
        self.embed = nn.Embedding(c["vocab"], c["dim"])
        self.blocks = nn.ModuleList(Block(c, batch, max_len) for _ in range(c["layers"]))
        self.norm = nn.RMSNorm(c["dim"])
        self.lm_head = nn.Linear(c["dim"], c["vocab"], bias=False)
        head_dim = c["dim"] // c["heads"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_len).float(), inv)
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)
        self.max_len = max_len

    def forward(self, tokens, pos):  # tokens [B, 1], pos [1]
        mask = (torch.arange(self.max_len, device=tokens.device) <= pos)[None, None, None, :]
        x = self.embed(tokens)
        freqs = self.freqs[pos]
        for block in self.blocks:
            x = block(x, freqs, pos, mask)
        return self.lm_head(self.norm(x))


def time_decode(model, batch, start, steps=32, compile=False):
    """Median ms per decode step, replaying one CUDA graph per step; also returns the first
    block's output of the first step (deep random-weight stacks decorrelate any two models'
    logits, so accuracy is compared where one quantized block acts)."""
    tokens = torch.randint(0, 1000, (batch, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    pos = torch.tensor([start], device="cuda")
    captured = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: captured.append(o.float().clone()))
    with torch.no_grad():
        model(tokens, pos)
    hook.remove()
    if compile:  # each variant compiled afresh, as a user compiles once after quantizing (a
        # recompile of the same module after quantize_ measured 13.8 instead of 7.3 ms per step
        # at batch 32 on an H200: benchmarks/results/bench_decode_compiled_batch32_log.txt)
        torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    with torch.no_grad():
        for _ in range(3):  # warm-up: kernel compilation and autotuning happen here
            step(tokens, pos)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(tokens, pos)
            next_tokens = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for i in range(steps):
        pos.fill_(start + i)
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_ev.record()
        graph.replay()
        end_ev.record()
        end_ev.synchronize()
        tokens.copy_(next_tokens)
        times.append(start_ev.elapsed_time(end_ev))
    times.sort()
    return times[len(times) // 2], captured[0]


def weight_gb(model):
    total = 0
    for p in model.parameters():
        inner = p._tensors().values() if hasattr(p, "_tensors") else [p]
        total += sum(t.numel() * t.element_size() for t in inner)
    return total / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["layers"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model (fuses the small ops) before graph capture")
    parser.add_argument("--no-preshuffled", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    config = dict(LLAMA3_8B, layers=args.layers)
    max_len, start = 1024, 512
    device = torch.cuda.get_device_name()
    stamp = datetime.date.today().isoformat()
    name = "bench_decode_compiled.csv" if args.compile else "bench_decode.csv"
    rows = []
    for batch in args.batch:
        with torch.device("cuda"):
            model = Decoder(config, batch, max_len).to(torch.bfloat16).eval()
        for p in model.parameters():  # weights of a trained model's scale, not N(0, 1)
            p.data.normal_(0, 0.02) if p.ndim > 1 else None
        results = {}
        ms, ref = time_decode(model, batch, start, compile=args.compile)
        results["bf16"] = (ms, weight_gb(model), 0.0)
        quantize_(model, Int4WeightOnlyConfig(group_size=128))
        torch.cuda.empty_cache()
        ms, out = time_decode(model, batch, start, compile=args.compile)
        err = float((out - ref).norm() / ref.norm())
        results["int4 plain (dispatch)"] = (ms, weight_gb(model), err)
        if not args.no_preshuffled:
            convert_model_to_packed_tensors_(model)
            ms, out = time_decode(model, batch, start, compile=args.compile)
            results["int4 preshuffled"] = (ms, weight_gb(model),
                                                    float((out - ref).norm() / ref.norm()))
        base = results["bf16"][0]
        for path, (ms, gb, err) in results.items():
            row = dict(batch=batch, path=path, ms_per_step=round(ms, 3),
                       tokens_per_s=round(batch * 1000 / ms, 1), speedup=round(base / ms, 2),
                       weights_GB=round(gb, 2), block0_rel_err_vs_bf16=round(err, 4))
            rows.append(row)
            print(row, flush=True)
        del model
        torch.cuda.empty_cache()
        write_csv(os.path.join(args.out, name),  # after each batch size: partial runs
                  f"{device}, {stamp}, torch {torch.__version__}, layers={args.layers}, "
                  f"compile={args.compile}", rows)
    print(f"\n{device}, {stamp}, Llama-3-8B shapes, {args.layers} layers, CUDA graph per step"
          f"{', torch.compile' if args.compile else ''}")
    print(f"{'batch':>5} {'path':<28} {'ms/step':>8} {'tok/s':>8} {'vs bf16':>7} {'weights GB':>10} {'blk0 err':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['path']:<28} {r['ms_per_step']:>8.3f} {r['tokens_per_s']:>8.1f} "
              f"{r['speedup']:>6.2f}x {r['weights_GB']:>10.2f} {r['block0_rel_err_vs_bf16']:>9.4f}")


if __name__ == "__main__":
    main()
