"""The op surface of Int4Tensor, specified against the dense tensor it stands for.

Data movement ops must agree *exactly* with the same op on ``t.dequantize()`` and return views
of the original storage; compute ops agree with the float reference (SQNR) and with the
reference path.
"""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4Tensor
from test.helpers import sqnr

G = 128


def quantized(shape, dtype=torch.bfloat16):
    w = torch.randn(shape, dtype=dtype)
    return Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (G,))


def assert_same(t, dense):
    assert isinstance(t, Int4Tensor)
    assert t.shape == dense.shape
    assert torch.equal(t.dequantize(), dense)


def assert_aliases(view, base):
    for name, x in view._tensors().items():
        inner = getattr(base, name)
        start = inner.untyped_storage().data_ptr()
        assert start <= x.data_ptr() < start + inner.untyped_storage().nbytes(), name


SHAPES = [(256, 512), (3, 256, 512)]


@pytest.fixture(params=SHAPES, ids=["2d", "3d"])
def t(request):
    return quantized(request.param)


class TestSlicing:
    def test_slice_along_n(self, t):
        d = t.dequantize()
        view = t[..., 64:192, :]
        assert_same(view, d[..., 64:192, :])
        assert_aliases(view, t)

    def test_slice_along_n_with_step(self, t):
        assert_same(t[..., ::3, :], t.dequantize()[..., ::3, :])

    def test_slice_along_k_on_group_boundaries(self, t):
        view = t[..., 128:384]
        assert_same(view, t.dequantize()[..., 128:384])
        assert_aliases(view, t)

    @pytest.mark.parametrize("bounds", [(64, 256), (0, 200), (1, 129)])
    def test_slice_along_k_off_group_boundaries_raises(self, t, bounds):
        with pytest.raises(ValueError, match="group boundaries"):
            t[..., bounds[0]:bounds[1]]

    def test_slice_along_k_with_step_raises(self, t):
        with pytest.raises(ValueError, match="step 2 along K"):
            t[..., ::2]

    def test_narrow_split_chunk(self, t):
        d = t.dequantize()
        n_dim, k_dim = t.ndim - 2, t.ndim - 1
        assert_same(t.narrow(n_dim, 10, 20), d.narrow(n_dim, 10, 20))
        assert_same(t.narrow(k_dim, 256, 256), d.narrow(k_dim, 256, 256))
        for part, ref in zip(t.split(100, dim=n_dim), d.split(100, dim=n_dim)):
            assert_same(part, ref)
        for part, ref in zip(t.split([128, 384], dim=k_dim), d.split([128, 384], dim=k_dim)):
            assert_same(part, ref)
        for part, ref in zip(torch.chunk(t, 4, dim=k_dim), torch.chunk(d, 4, dim=k_dim)):
            assert_same(part, ref)

    def test_narrow_then_copy_writes_into_the_parameter(self, t):
        src = quantized(tuple(t.shape))
        dst = t.clone()
        dst.narrow(-2, 0, 128).copy_(src.narrow(-2, 0, 128))
        expected = torch.cat([src.dequantize()[..., :128, :], t.dequantize()[..., 128:, :]], -2)
        assert torch.equal(dst.dequantize(), expected)


class TestExperts:
    def test_select_and_int_index(self):
        t = quantized((4, 128, 256))
        d = t.dequantize()
        assert_same(t[2], d[2])
        assert t[2].block_size == (1, G)
        assert_aliases(t[2], t)
        assert_same(t[-1], d[-1])

    def test_tensor_index(self):
        t = quantized((4, 128, 256))
        d = t.dequantize()
        idx = torch.tensor([3, 0, 3])
        assert_same(t[idx], d[idx])
        mask = torch.tensor([True, False, True, False])
        assert_same(t[mask], d[mask])

    def test_unbind(self):
        t = quantized((3, 128, 256))
        for part, ref in zip(t.unbind(0), t.dequantize().unbind(0)):
            assert_same(part, ref)

    def test_select_along_n_or_k_is_not_supported(self):
        t = quantized((128, 256))
        with pytest.raises(NotImplementedError, match="only along the expert dim"):
            t[0]


class TestCatStack:
    @pytest.mark.parametrize("dim", [-2, -1])
    def test_cat_along_n_and_k(self, t, dim):
        a, b = quantized(tuple(t.shape)), t
        out = torch.cat([a, b], dim=dim)
        assert_same(out, torch.cat([a.dequantize(), b.dequantize()], dim=dim))

    def test_cat_along_k_keeps_every_tensors_scales(self):
        a, b = quantized((64, 256)), quantized((64, 256))
        out = torch.cat([a, b], dim=1)
        assert torch.equal(out.scale, torch.cat([a.scale, b.scale], dim=0))
        assert torch.equal(out.dequantize()[:, 256:], b.dequantize())

    def test_cat_experts_and_stack(self):
        a, b = quantized((2, 64, 256)), quantized((3, 64, 256))
        assert_same(torch.cat([a, b]), torch.cat([a.dequantize(), b.dequantize()]))
        x, y = quantized((64, 256)), quantized((64, 256))
        assert_same(torch.stack([x, y]), torch.stack([x.dequantize(), y.dequantize()]))

    def test_cat_mismatch(self):
        a = quantized((64, 256))
        b = Int4Tensor.from_hp(torch.randn(64, 256), (1, 64))
        with pytest.raises(ValueError, match="block_size"):
            torch.cat([a, b.to(torch.bfloat16)], dim=0)
        with pytest.raises(ValueError, match="differ outside dim 0"):
            torch.cat([a, quantized((64, 512))], dim=0)
        with pytest.raises(NotImplementedError, match="dense tensor"):
            torch.cat([a, torch.randn(64, 256, dtype=torch.bfloat16)])


class TestTranspose:
    def test_transpose_is_a_view_of_the_dense_transpose(self, t):
        for view in (t.transpose(-1, -2), t.mT, t.permute(*range(t.ndim - 2), -1, -2)):
            assert_same(view, t.dequantize().transpose(-1, -2))
            assert view.qdata is t.qdata  # no data movement
        assert_same(t.mT.mT, t.dequantize())

    def test_t_2d(self):
        t = quantized((128, 256))
        assert_same(t.t(), t.dequantize().t())

    def test_slicing_a_transposed_tensor(self, t):
        tt, dt = t.mT, t.dequantize().mT
        assert_same(tt[..., 64:128], dt[..., 64:128])  # N is now last
        assert_same(tt[..., 128:256, :], dt[..., 128:256, :])  # K is now second to last
        with pytest.raises(ValueError, match="group boundaries"):
            tt[..., 10:20, :]

    def test_the_eager_transposed_view_is_made_once_and_follows_the_weight(self, t):
        # every MoE forward transposes its stacks: one view, kept on the weight
        view = t.transpose(-2, -1)
        assert t.mT is view and t.transpose(-1, -2) is view
        other = quantized(tuple(t.shape))
        with torch.no_grad():
            t.copy_(other)  # in place: the view's fields are the weight's
        assert_same(t.transpose(-2, -1), other.dequantize().transpose(-2, -1))
        param = torch.nn.Parameter(t, requires_grad=False)
        param.data = quantized(tuple(t.shape))  # new fields: a new view
        assert_same(param.transpose(-2, -1), param.dequantize().transpose(-2, -1))

    def test_a_weight_with_its_kept_view_is_freed(self, t):
        import gc
        import weakref

        w = quantized(tuple(t.shape))
        alive = weakref.ref(w.qdata)
        w.transpose(-2, -1), w.mT  # kept on w (an autograd view's _base would be a C++ cycle)
        x = torch.randn(2, *w.shape[:-2], w.shape[-1], dtype=torch.bfloat16).movedim(0, -2)
        x @ w.mT  # dispatch plans kept too
        del w
        gc.collect()
        assert alive() is None

    def test_transposing_the_expert_dim_is_not_supported(self):
        with pytest.raises(NotImplementedError, match="last two dims"):
            quantized((2, 128, 256)).transpose(0, 1)


class TestViews:
    def test_experts_flat_and_back(self):
        t = quantized((4, 64, 256))
        d = t.dequantize()
        flat = t.view(256, 256)
        assert_same(flat, d.view(256, 256))
        assert_same(flat.view(4, 64, 256), d)
        assert_same(flat.unflatten(0, (2, 128)), d.view(2, 128, 256))
        assert_same(t.reshape(-1, 256), d.reshape(-1, 256))
        assert_same(t.flatten(0, 1), d.flatten(0, 1))

    def test_flat_to_experts_is_a_view(self):
        t = quantized((256, 256))
        experts = t.view(4, 64, 256)
        assert_aliases(experts, t)

    def test_unsqueeze_squeeze(self):
        t = quantized((64, 256))
        assert_same(t.unsqueeze(0), t.dequantize().unsqueeze(0))
        assert_same(t.unsqueeze(0).squeeze(0), t.dequantize())
        assert_same(t.mT.unsqueeze(0), t.dequantize().mT.unsqueeze(0))

    def test_views_that_touch_k_raise(self):
        t = quantized((64, 256))
        with pytest.raises(NotImplementedError, match="packed last dim"):
            t.view(128, 128)
        with pytest.raises(NotImplementedError, match="packed last dim"):
            t.view(64, 2, 128)


class TestMatmul:
    def test_linear_mm_matmul_against_the_dense_weight(self):
        t = quantized((256, 512))
        w = t.dequantize()
        x = torch.randn(2, 3, 512, dtype=torch.bfloat16)
        ref = x.float() @ w.float().t()
        for out in (F.linear(x, t), x @ t.t(), torch.matmul(x, t.mT), x.matmul(t.t())):
            assert out.shape == (2, 3, 256)
            assert sqnr(ref, out) > 30
        assert sqnr(ref[0], torch.mm(x[0], t.t())) > 30
        bias = torch.randn(256, dtype=torch.bfloat16)
        assert sqnr(ref[0] + bias.float(), torch.addmm(bias, x[0], t.t())) > 30

    def test_bmm_with_dense_semantics(self):
        t = quantized((4, 256, 512))  # stored [E, N, K]
        w = t.mT  # logical [E, K, N], as MoE code multiplies it
        x = torch.randn(4, 5, 512, dtype=torch.bfloat16)
        ref = torch.bmm(x.float(), t.dequantize().float().mT)
        for out in (torch.bmm(x, w), torch.matmul(x, w), x @ w):
            assert out.shape == (4, 5, 256)
            assert sqnr(ref, out) > 30

    def test_weight_first_bmm_runs_the_kernels_on_the_transposed_activations(self, monkeypatch):
        """transformers' batched_mm experts (its GPU decode default) call
        ``torch.bmm(W[expert_ids], x.unsqueeze(-1))``: W @ x is (x^T @ W^T)^T, the kernels'
        form, not a dequantized stack."""
        from int4tensor import kernels

        t = quantized((8, 256, 512))
        ids = torch.tensor([3, 5, 3])
        picked = t[ids]
        assert isinstance(picked, Int4Tensor) and picked.shape == (3, 256, 512)
        calls = []
        real = kernels.int4_bmm
        monkeypatch.setattr(kernels, "int4_bmm",
                            lambda x, w: calls.append((tuple(x.shape), w)) or real(x, w))
        d = t.dequantize().float()[ids]
        for m in (1, 4):
            x = torch.randn(3, 512, m, dtype=torch.bfloat16)
            out = torch.bmm(picked, x)
            assert out.shape == (3, 256, m) and out.dtype == torch.bfloat16
            assert sqnr(torch.bmm(d, x.float()), out) > 30
            assert calls[-1][0] == (3, m, 512) and calls[-1][1] is picked
        # compiled (transformers compiles its static-cache decode step): the same route
        calls.clear()
        torch._dynamo.reset()
        step = torch.compile(lambda w, ids, x: torch.bmm(w[ids], x.unsqueeze(-1)).squeeze(-1),
                             backend="aot_eager", fullgraph=True)
        x1 = torch.randn(3, 512, dtype=torch.bfloat16)
        out = step(t, ids, x1)
        assert calls and calls[-1][0] == (3, 1, 512)
        assert sqnr(torch.bmm(d, x1.float().unsqueeze(-1)).squeeze(-1), out) > 30
        # the rows the kernels get: what our GEMV takes on an H100 (row stride K, not 1)
        from int4tensor.kernels.dispatch import decide, describe
        from int4tensor.tensors.int4_tensor import weight_first_activation

        rows = weight_first_activation(torch.randn(3, 512, dtype=torch.bfloat16).unsqueeze(-1))
        assert rows.shape == (3, 1, 512) and rows.stride() == (512, 512, 1)
        h100 = dict(device_type="cuda", capability=(9, 0), features=frozenset({"nvrtc"}))
        assert decide(describe("bmm", rows, picked, **h100), "plain").backend == "cuda"
        w2 = quantized((256, 512))
        y = torch.randn(512, 3, dtype=torch.bfloat16)
        assert sqnr(w2.dequantize().float() @ y.float(), torch.mm(w2, y)) > 30
        # an act_pre_scale [E, K] goes along with the gather and multiplies the rows
        pre = torch.rand(8, 512, dtype=torch.bfloat16) + 0.5
        scaled = Int4Tensor(t.qdata, t.scale, t.zero_point, t.block_size, t.shape,
                            act_pre_scale=pre)
        y3 = torch.randn(3, 512, 2, dtype=torch.bfloat16)
        assert sqnr(torch.bmm(scaled.dequantize().float()[ids], y3.float()),
                    torch.bmm(scaled[ids], y3)) > 30

    def test_products_without_a_kernel_use_the_dense_value(self):
        t = quantized((256, 512))
        d = t.dequantize()
        y = torch.randn(256, 3, dtype=torch.bfloat16)
        assert torch.equal(t.t() @ y, d.t() @ y)  # a transposed int4 view on the left
        z = torch.randn(3, 256, dtype=torch.bfloat16)
        assert torch.equal(z @ t, z @ d)  # contracting over N
        assert torch.equal(F.linear(z, t.t()), F.linear(z, d.t()))

    def test_float_reference_sqnr(self):
        w = torch.randn(4, 256, 512, dtype=torch.bfloat16) * 0.02
        t = Int4Tensor.from_hp(w, (1, 1, G))
        x = torch.randn(4, 8, 512, dtype=torch.bfloat16)
        assert sqnr(torch.bmm(x.double(), w.double().mT), torch.bmm(x, t.mT)) > 18

    def test_shape_errors(self):
        t = quantized((4, 256, 512))
        with pytest.raises(ValueError, match="batch sizes differ"):
            torch.bmm(torch.randn(3, 5, 512, dtype=torch.bfloat16), t.mT)
        with pytest.raises(ValueError, match="cannot be multiplied"):
            torch.bmm(torch.randn(4, 5, 256, dtype=torch.bfloat16), t.mT)


class TestLoaderFlow:
    """A tensor-parallel loader: allocate, narrow a rank's shard, copy_ the checkpoint shard."""

    @pytest.mark.parametrize("dim", [0, 1], ids=["column_parallel_N", "row_parallel_K"])
    def test_four_ranks_fill_the_parameter_exactly(self, dim):
        full = quantized((512, 1024))
        param = torch.nn.Parameter(torch.empty_like(full), requires_grad=False)
        assert isinstance(param, Int4Tensor)
        ranks, size = 4, full.shape[dim] // 4
        for r in range(ranks):
            param.narrow(dim, r * size, size).copy_(full.narrow(dim, r * size, size))
        for name in ("qdata", "scale", "zero_point"):
            assert torch.equal(getattr(param, name), getattr(full, name)), name
        x = torch.randn(3, 1024, dtype=torch.bfloat16)
        y = F.linear(x, full)
        shards = [full.narrow(dim, r * size, size) for r in range(ranks)]
        if dim == 0:  # column parallel: each rank computes its slice of the outputs, exactly
            for r, shard in enumerate(shards):
                assert torch.equal(F.linear(x, shard), y[:, r * size:(r + 1) * size])
        else:  # row parallel: each rank's partial sum over its slice of K adds up to the output
            partial = [F.linear(x[:, r * size:(r + 1) * size].float(), shard.dequantize(torch.float32))
                       for r, shard in enumerate(shards)]
            reference = F.linear(x.float(), full.dequantize(torch.float32))
            assert torch.allclose(sum(partial), reference, rtol=1e-4, atol=1e-3)

    def test_copy_dense_into_a_shard_quantizes_it(self):
        param = quantized((256, 256))
        w = torch.randn(128, 256, dtype=torch.bfloat16)
        param.narrow(0, 128, 128).copy_(w)
        assert torch.equal(param[128:].dequantize(), Int4Tensor.from_hp(w, (1, G)).dequantize())


def test_unsupported_ops_name_op_and_type():
    t = quantized((128, 256))
    with pytest.raises(NotImplementedError, match=r"Int4Tensor does not support the op aten\.add"):
        t + 1
    with pytest.raises(NotImplementedError, match=r"Int4Tensor does not support the op aten\.mul"):
        t * 2


class TestCatKeepsEveryAttribute:
    @pytest.mark.parametrize("op", [lambda ts: torch.cat(ts, 0), lambda ts: torch.stack(ts)])
    def test_activation_dtype_mismatch(self, op):
        w = torch.randn(64, 256, dtype=torch.bfloat16)
        bf16 = Int4Tensor.from_hp(w, (1, G))
        fp8 = Int4Tensor.from_hp(w, (1, G), activation_dtype="fp8")
        with pytest.raises(ValueError, match="activation_dtype 'bf16' != 'fp8'"):
            op([bf16, fp8])
        assert op([fp8, fp8]).activation_dtype == "fp8"
