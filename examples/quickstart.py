"""Quickstart: quantize a small model to int4, check its outputs, save it and load it back.

    python examples/quickstart.py
"""

import os
import tempfile

import torch
from torch import nn

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, quantize_


class TinyDecoderMLP(nn.Module):
    """A stack of Llama-style gated MLP blocks (the layers that hold most of an LLM's weights)."""

    def __init__(self, dim=1024, hidden=2816, layers=4):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.RMSNorm(dim),
                    "gate": nn.Linear(dim, hidden, bias=False),
                    "up": nn.Linear(dim, hidden, bias=False),
                    "down": nn.Linear(hidden, dim, bias=False),
                }
            )
            for _ in range(layers)
        )

    def forward(self, x):
        for b in self.blocks:
            h = b["norm"](x)
            x = x + b["down"](nn.functional.silu(b["gate"](h)) * b["up"](h))
        return x


def weight_megabytes(model: nn.Module) -> float:
    total = 0
    for p in model.parameters():
        tensors = [p.qdata, p.scale, p.zero_point] if isinstance(p, Int4Tensor) else [p]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total / 2**20


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyDecoderMLP().to(device=device, dtype=torch.bfloat16).eval()
    x = torch.randn(2, 16, 1024, device=device, dtype=torch.bfloat16)

    with torch.inference_mode():
        reference = model(x)
    before = weight_megabytes(model)

    quantize_(model, Int4WeightOnlyConfig(group_size=128))
    with torch.inference_mode():
        quantized = model(x)
    after = weight_megabytes(model)
    print(f"device: {device}")
    print(f"weights: {before:.1f} MiB bf16 -> {after:.1f} MiB int4 ({before / after:.2f}x smaller)")
    print(f"a quantized weight: {model.blocks[0]['gate'].weight}")
    print(f"output SQNR vs bf16: {sqnr_db(reference, quantized):.1f} dB")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model_int4.pt")
        torch.save(model.state_dict(), path)
        print(f"saved state_dict: {os.path.getsize(path) / 2**20:.1f} MiB")
        state_dict = torch.load(path, weights_only=True)

    # A loader's flow: build on the meta device, quantize (shapes only), then assign real tensors.
    with torch.device("meta"):
        loaded = TinyDecoderMLP().to(torch.bfloat16)
    quantize_(loaded, Int4WeightOnlyConfig(group_size=128))
    loaded.load_state_dict(state_dict, assign=True)
    loaded.to(device)
    with torch.inference_mode():
        reloaded = loaded(x)
    same = torch.equal(reloaded, quantized)
    print(f"reloaded with weights_only=True: outputs bit-identical = {same}")
    if not same:
        raise SystemExit("reloaded model differs from the quantized one")


if __name__ == "__main__":
    main()
