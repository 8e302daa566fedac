"""A small mixture-of-experts block quantized to int4, run, saved and loaded.

Two common layouts of expert weights:
* Llama4-style: one module holds 3D parameters used with ``torch.bmm``
  (``gate_up [E, K, 2H]``, ``down [E, H, K]``: the reduced dim is -2, so ``k_dim=-2``);
* Mixtral-style: a ``ModuleList`` of per-expert ``nn.Linear`` (plain ``quantize_``).

    python examples/moe.py
"""

import io

import torch
from torch import nn

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, quantize_


class BmmExperts(nn.Module):
    """Experts as 3D parameters; tokens are already grouped per expert: ``x [E, T, K]``."""

    def __init__(self, num_experts=8, dim=512, hidden=1024):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(num_experts, dim, 2 * hidden) * dim**-0.5)
        self.down = nn.Parameter(torch.randn(num_experts, hidden, dim) * hidden**-0.5)

    def forward(self, x):
        gate, up = torch.bmm(x, self.gate_up).chunk(2, dim=-1)
        return torch.bmm(nn.functional.silu(gate) * up, self.down)


class MoEBlock(nn.Module):
    """Top-1 routing over BmmExperts, with a fixed number of token slots per expert."""

    def __init__(self, num_experts=8, dim=512, hidden=1024):
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = BmmExperts(num_experts, dim, hidden)

    def forward(self, x):  # x [T, K]
        choice = self.router(x).argmax(-1)
        num_experts = self.experts.gate_up.shape[0]
        slots = torch.zeros(num_experts, x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        slots[choice, torch.arange(x.shape[0])] = x
        out = self.experts(slots)
        return out[choice, torch.arange(x.shape[0])]


def sqnr_db(ref, out):
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def main():
    torch.manual_seed(0)
    model = MoEBlock().to(torch.bfloat16)
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)

    # Quantize the expert weights by name (reduced dim -2, as bmm uses them); keep the router.
    quantize_(model, {"re:experts\\.(gate_up|down)": Int4WeightOnlyConfig(k_dim=-2)})
    print("experts.gate_up:", model.experts.gate_up)
    with torch.no_grad():
        out = model(x)
    print(f"MoE output SQNR vs bf16: {sqnr_db(ref, out):.1f} dB")

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state_dict = torch.load(buf, weights_only=True)
    with torch.device("meta"):
        loaded = MoEBlock().to(torch.bfloat16)
    quantize_(loaded, {"re:experts\\.(gate_up|down)": Int4WeightOnlyConfig(k_dim=-2)})
    loaded.load_state_dict(state_dict, assign=True)
    with torch.no_grad():
        same = torch.equal(loaded(x), out)
    print(f"saved {buf.getbuffer().nbytes / 2**20:.1f} MiB, reloaded with weights_only=True: "
          f"outputs bit-identical = {same}")

    # Mixtral-style experts are plain nn.Linear modules: the default quantize_ covers them.
    experts = nn.ModuleList(nn.Linear(512, 1024, bias=False) for _ in range(4)).to(torch.bfloat16)
    quantize_(experts, Int4WeightOnlyConfig())
    stacked = torch.stack([e.weight for e in experts])  # [E, N, K], still int4
    print("stacked Mixtral-style experts:", type(stacked).__name__, list(stacked.shape))
    assert isinstance(stacked, Int4Tensor) and same


if __name__ == "__main__":
    main()
