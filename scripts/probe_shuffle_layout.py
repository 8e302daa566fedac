"""Device exploration: where fbgemm's ``preshuffle_i4`` puts each int4 weight (fp8 and bf16
activation layouts). Each weight's position ``n * K + k`` is written 3 bits at a time into the
int4 values of several weights, preshuffled, and read back from every stored nibble, giving the
map stored nibble -> (n, k). Saves the maps to $OUT/shuffle_maps.pt and prints their start."""
import os

import torch

import fbgemm_gpu.experimental.gen_ai  # noqa: F401

from int4tensor.quant_primitives import pack_int4  # noqa: E402

dev = "cuda"
out = {}
for n, k in [(128, 256), (256, 512), (512, 1024)]:
    pos = torch.arange(n * k, device=dev, dtype=torch.int64).view(n, k)
    for kind, scale in [("fp8", torch.ones(k // 128, n, device=dev).to(torch.float8_e4m3fn)),
                        ("bf16", torch.ones(k // 128, n, device=dev, dtype=torch.bfloat16))]:
        found = torch.zeros(n * k, dtype=torch.int64, device=dev)
        for probe in range((n * k - 1).bit_length() // 3 + 1):
            q = ((pos >> (3 * probe)) & 7).to(torch.int8)
            shuffled, _ = torch.ops.fbgemm.preshuffle_i4(pack_int4(q), scale)
            b = shuffled.view(torch.uint8).flatten().to(torch.int64)
            nib = torch.stack([b & 15, b >> 4], -1).flatten()  # stored nibble order: low first
            found |= (nib & 7) << (3 * probe)
        out[(kind, n, k)] = found.cpu()
        ns, ks = found // k, found % k
        print(f"{kind} N={n} K={k}: bijective={found.unique().numel() == n * k}")
        for row in range(6):
            seg = slice(row * 32, row * 32 + 32)  # 16 bytes = 32 nibbles
            print("  bytes", row * 16, ":", list(zip(ns[seg].tolist(), ks[seg].tolist()))[:32])
torch.save(out, os.path.join(os.environ.get("OUT", "."), "shuffle_maps.pt"))

# bf16 layout, tile order: (n // 16, k // 16) of the first nibble of each 128-byte block
for n, k in [(128, 256), (512, 1024)]:
    found = out[("bf16", n, k)]
    blocks = found.view(-1, 256)[:, 0]
    order = [(int(b) // k // 16, int(b) % k // 16) for b in blocks[:48]]
    print(f"bf16 N={n} K={k}: 128-byte blocks -> (n // 16, k // 16):", order)
