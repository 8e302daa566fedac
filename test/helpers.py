"""Shared test utilities."""

import pytest
import torch


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(|ref| / |ref - out|)``."""
    ref, out = ref.detach().double(), out.detach().double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).norm() / ref.norm())


def quantized_cuda(n: int, k: int, g: int = 128, domain: str = "float"):
    """A bf16 weight ``[n, k]`` of a trained model's scale on CUDA and its Int4Tensor."""
    from int4tensor import Int4Tensor

    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    return w, Int4Tensor.from_hp(w, (1, g), zero_point_domain=domain)


def check_compiled_decode_mlp(custom_op, rows: int = 1, preshuffled: bool = False) -> None:
    """A quantized two-layer MLP at M = ``rows`` under ``torch.compile(fullgraph=True,
    mode="reduce-overhead")`` (CUDA graphs, whose warm-up fails if a kernel leaves a tensor
    alive in their memory pool) matches eager, and ``custom_op`` (called as
    ``op(x, qdata, scale, zero_point, group_size)``, on ``Int4PreshuffledTensor``'s fields with
    ``preshuffled``) passes ``torch.library.opcheck`` on the first layer's weight. CUDA only."""
    from int4tensor import Int4WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048, bias=True), torch.nn.SiLU(),
                                torch.nn.Linear(2048, 512)).to("cuda", torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    if preshuffled:
        from int4tensor import convert_model_to_packed_tensors_

        convert_model_to_packed_tensors_(model)
    x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            out = compiled(x)
    assert rel_error(eager, out) < 1e-2
    w = model[0].weight
    fields = (w.qdata, w.group_scale, w.group_zero) if preshuffled else \
        (w.qdata, w.scale, w.zero_point)
    assert torch.library.opcheck(custom_op, (x, *fields, 128)) is not None


@pytest.fixture
def one_thread():
    """One OpenMP thread for tests of many small elementwise ops: on a shared 2-core CPU, two
    threads contend with other processes and make each op ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LinearStack(torch.nn.Module):
    """``layers`` bias-free 256x256 linears applied in turn: the smallest model whose compiled
    graph holds one weight per layer (guard counts, host cost per weight)."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(256, 256, bias=False) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
