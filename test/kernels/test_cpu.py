"""CPU kernels (int4tensor.kernels.cpu): torch's CPU int4 layout, both compute paths against
the reference path, and the dispatch by M."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4Tensor
from int4tensor.kernels import cpu
from int4tensor.kernels.dispatch import describe, tables
from int4tensor.quant_primitives import _dequantize_int4_formula, pack_int4
from test.helpers import rel_error

needs_cpu_int4 = pytest.mark.skipif(cpu.why_not_available() is not None,
                                    reason=f"{cpu.why_not_available()}")

#: (N, K, G): N a multiple of 64, odd N (padded), K a multiple of G only
SHAPES = [(128, 256, 128), (200, 256, 64), (77, 96, 32), (64, 512, 256)]
#: relative error of a product against the float64 product of the same dequantized weight
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class Weight:
    """The fields ``cpu`` kernels read, from a plain Int4Tensor."""

    def __init__(self, t: Int4Tensor):
        self.plain = t
        self.qdata, self.scale_and_zero = cpu.pack(t.qdata, t.scale, t.zero_point)
        self.group_size = t.group_size
        self.stored_n = t.shape[-2]
        self.shape = t.shape
        self.activation_dtype = "bf16"


def weight(shape, group_size, dtype=torch.bfloat16) -> Weight:
    w = torch.randn(shape, dtype=dtype) * 0.02
    return Weight(Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (group_size,)))


@needs_cpu_int4
def test_pack_is_torchs_cpu_layout():
    """Our packing is byte for byte what torch's own op writes on this CPU (blocks of 64 on
    AVX512, 32 on AVX2)."""
    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu.block_n() == (64 if "AVX512" in capability else 32)
    u = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    ours, _ = cpu.pack(pack_int4((u - 8).to(torch.int8)), torch.ones(3, 192), torch.ones(3, 192))
    assert torch.equal(theirs.view(torch.uint8).reshape(-1), ours.reshape(-1))


@pytest.mark.parametrize("block", cpu.BLOCK_SIZES)
def test_both_block_layouts_round_trip_and_dequantize(block):
    """Either CPU layout (whichever torch uses here) unpacks and dequantizes exactly."""
    w = Int4Tensor.from_hp(torch.randn(100, 256, dtype=torch.bfloat16), (1, 64))
    packed, sz = cpu.pack(w.qdata, w.scale, w.zero_point, block)
    assert packed.shape == (-(-100 // block) * block, 128)
    assert torch.equal(pack_int4(cpu.unpack(packed, block)[:100].contiguous()), w.qdata)
    ref = _dequantize_int4_formula(w.qdata, w.scale, w.zero_point, 64, torch.bfloat16)
    assert torch.equal(cpu.dequantize_t(packed, sz, 64, torch.bfloat16, block)[:, :100], ref.T)


@pytest.mark.parametrize("n,k,g", SHAPES)
def test_pack_pads_n_and_unpack_inverts_it(n, k, g):
    w = weight((n, k), g)
    np_ = -(-n // cpu.block_n()) * cpu.block_n()
    assert w.qdata.shape == (np_, k // 2) and w.qdata.dtype == torch.uint8
    assert w.scale_and_zero.shape == (k // g, np_, 2)
    assert torch.equal(w.scale_and_zero[:, :n, 0], w.plain.scale)
    assert torch.equal(w.scale_and_zero[:, :n, 1], w.plain.zero_point)
    assert not w.scale_and_zero[:, n:].any()
    q = cpu.unpack(w.qdata)
    assert torch.equal(pack_int4(q[:n].contiguous()), w.plain.qdata)
    assert (q[n:] == -8).all()  # padded rows hold u = 0


def test_pack_3d_packs_each_expert_like_2d():
    w = weight((3, 70, 128), 32)
    for e in range(3):
        expert = Weight(w.plain[e])
        assert torch.equal(w.qdata[e], expert.qdata)
        assert torch.equal(w.scale_and_zero[e], expert.scale_and_zero)


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_t_is_the_reference_dequantize(n, k, g, weight_dtype, dtype):
    w = weight((n, k), g, weight_dtype)
    reference = _dequantize_int4_formula(w.plain.qdata, w.plain.scale, w.plain.zero_point, g,
                                         dtype)
    w_t = cpu.dequantize_t(w.qdata, w.scale_and_zero, g, dtype)
    assert w_t.dtype == dtype and w_t.is_contiguous()
    assert torch.equal(w_t[:, :n].t(), reference)


def test_dequantize_t_3d():
    w = weight((2, 130, 256), 128)
    reference = _dequantize_int4_formula(w.plain.qdata, w.plain.scale, w.plain.zero_point, 128,
                                         torch.bfloat16)
    assert torch.equal(cpu.dequantize_t(w.qdata, w.scale_and_zero, 128,
                                        torch.bfloat16)[..., :130].mT, reference)


def _reference_linear(x, w: Weight):
    return x.double() @ w.plain.dequantize(x.dtype).double().t()


@needs_cpu_int4
@pytest.mark.parametrize("run", [cpu.linear_int4mm, cpu.linear_dense], ids=["int4mm", "dense"])
@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_linear_paths_match_the_reference(run, n, k, g, dtype, m):
    w = weight((n, k), g, torch.bfloat16)
    x = torch.randn(m, k, dtype=dtype)
    out = run(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(_reference_linear(x, w), out) < TOLERANCE[dtype]


@needs_cpu_int4
def test_linear_on_a_non_contiguous_activation():
    w = weight((128, 256), 128)
    x = torch.randn(256, 5, dtype=torch.bfloat16).t()
    assert rel_error(_reference_linear(x, w), cpu.linear_int4mm(x, w)) < 1e-2


@needs_cpu_int4
@pytest.mark.parametrize("run", [cpu.bmm_int4mm, cpu.bmm_dense], ids=["int4mm", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bmm_paths_match_the_reference(run, dtype):
    w = weight((3, 100, 256), 64)
    x = torch.randn(3, 5, 256, dtype=dtype)
    out = run(x, w)
    ref = torch.bmm(x.double(), w.plain.dequantize(dtype).double().mT)
    assert out.shape == (3, 5, 100) and out.dtype == dtype
    assert rel_error(ref, out) < TOLERANCE[dtype]


@pytest.fixture
def avx512_row_limit(monkeypatch):
    """The AVX512 layout's row limit on any machine, so both CPU paths are dispatched to."""
    monkeypatch.setattr(cpu, "int4mm_max_m", lambda: cpu.INT4MM_MAX_M)


@pytest.mark.parametrize("block,limit", [(64, cpu.INT4MM_MAX_M), (32, None)])
def test_int4mm_row_limit_follows_the_layout(block, limit, monkeypatch):
    """AVX512 (blocks of 64): dequantize + dense GEMM from 513 rows; AVX2 (blocks of 32):
    torch's int4 GEMM at every M (it stayed the faster one there up to 2048 rows)."""
    monkeypatch.setattr(cpu, "_probe", lambda: (block, None))
    assert cpu.int4mm_max_m() == limit
    w = weight((128, 256), 128)
    big = cpu.choose("linear", torch.randn(2048, 256), w).name
    assert big == ("cpu_dense" if limit else "cpu_int4mm")


@pytest.mark.usefixtures("avx512_row_limit")
class TestDispatch:
    def test_small_m_runs_int4mm_large_m_dense(self):
        w = weight((128, 256), 128)
        for m in (1, cpu.INT4MM_MAX_M):
            assert cpu.choose("linear", torch.randn(m, 256), w).name == (
                "cpu_int4mm" if cpu.why_not_available() is None else "cpu_dense")
        assert cpu.choose("linear", torch.randn(cpu.INT4MM_MAX_M + 1, 256), w).name == \
            "cpu_dense"

    def test_explain_says_why(self):
        w = weight((128, 256), 128)
        m = cpu.INT4MM_MAX_M + 1
        verdicts = cpu.explain("linear", torch.randn(m, 256, dtype=torch.bfloat16), w)
        assert verdicts == [("cpu_int4mm", f"M = {m} > {cpu.INT4MM_MAX_M}: dequantize + dense "
                                           "GEMM is faster on CPU"), ("cpu_dense", None)]
        verdicts = cpu.explain("bmm", torch.randn(2, m, 256), weight((2, 64, 256), 128))
        assert f"M = {m} rows per expert" in verdicts[0][1]
        assert cpu.explain("linear", torch.randn(0, 256), w)[0][1] == "no activation rows"
        call = describe("linear", torch.randn(1, 256), w, device_type="cuda", capability=(9, 0))
        assert "CPU only" in cpu.why_not_int4mm(call)

    def test_registered_as_the_cpu_layouts_tables(self):
        assert tables()[("linear", "cpu", "bf16")] == ["cpu_int4mm", "cpu_dense"]
        assert tables()[("bmm", "cpu", "bf16")] == ["cpu_int4mm", "cpu_dense"]

    def test_zero_rows(self):
        w = weight((128, 256), 128)
        x = torch.randn(0, 256, dtype=torch.bfloat16)
        assert cpu.choose("linear", x, w).run(x, w).shape == (0, 128)


@needs_cpu_int4
def test_int4mm_matches_f_linear_of_the_plain_tensor():
    """The fast path and the plain layout's reference path give the same product to bf16
    precision on a Llama-shaped block (the dequantization conventions agree)."""
    w = weight((512, 1024), 128)
    x = torch.randn(2, 1024, dtype=torch.bfloat16)
    assert rel_error(F.linear(x, w.plain), cpu.linear_int4mm(x, w)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_dequantize_t_formula_is_the_eager_one(dtype):
    """The expression torch.compile traces computes the same bits as the in-place passes."""
    w = weight((2, 130, 256), 64)
    b = w.qdata.view(2, -1, 256, cpu.block_n() // 2)
    assert torch.equal(cpu._dequantize_t_formula(b, w.scale_and_zero, 64, dtype),
                       cpu.dequantize_t(w.qdata, w.scale_and_zero, 64, dtype))
