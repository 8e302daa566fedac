"""prepare_for_compile: int4 weights held as plain inner tensors; everything a user does with
the model stays the same."""

import io

import pytest
import torch
from torch import nn

from int4tensor import (Int4Tensor, Int4WeightOnlyConfig, explain, load_file,
                        prepare_for_compile, quantize_, save_file)
from int4tensor.compile_support import is_prepared_for_compile
from test.helpers import LinearStack


def model_and_input(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 128, bias=False))
    model = model.to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    return model, torch.randn(3, 256, dtype=torch.bfloat16)


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if type(x) is not type(y):
            return False
        if isinstance(x, Int4Tensor):
            if x._mismatch(y) or not all(torch.equal(t, getattr(y, n))
                                         for n, t in x._tensors().items()):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def test_outputs_and_state_dict_unchanged():
    model, x = model_and_input()
    ref, state = model(x), model.state_dict()
    assert prepare_for_compile(model) is model
    assert is_prepared_for_compile(model[0]) and is_prepared_for_compile(model[2])
    assert not any(isinstance(p, Int4Tensor) for p in model.parameters())  # plain tensors now
    assert isinstance(model[0].weight, Int4Tensor)
    assert model[0].weight is model[0].weight  # cached in eager mode
    assert torch.equal(model(x), ref)
    assert same_state(model.state_dict(), state)
    prepare_for_compile(model)  # again: nothing changes
    assert same_state(model.state_dict(), state)


def test_save_and_load_both_ways(tmp_path):
    model, x = model_and_input()
    ref = model(x)
    prepare_for_compile(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    for state in (torch.load(io.BytesIO(buf.getvalue()), weights_only=True),
                  load_file(tmp_path / "m.safetensors")):
        plain, _ = model_and_input(seed=1)  # other values, same layout
        plain.load_state_dict(state)
        assert torch.equal(plain(x), ref)
        prepared, _ = model_and_input(seed=1)
        prepare_for_compile(prepared).load_state_dict(state)
        assert torch.equal(prepared(x), ref)


def test_whole_model_deepcopy_and_pickle():
    import copy

    model, x = model_and_input()
    prepare_for_compile(model)
    ref = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    for other in (copy.deepcopy(model), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        assert type(other[0]) is type(model[0]) and is_prepared_for_compile(other[0])
        assert torch.equal(other(x), ref)
        assert same_state(other.state_dict(), model.state_dict())


def test_conversion_after_prepare_converts_the_held_weights():
    from int4tensor import Int4CPUTensor, convert_model_to_packed_tensors_

    first, x = model_and_input()
    convert_model_to_packed_tensors_(first)
    prepare_for_compile(first)
    second, _ = model_and_input()
    prepare_for_compile(second)
    convert_model_to_packed_tensors_(second)  # the other order
    kinds = {type(first[0].weight), type(second[0].weight)}
    assert len(kinds) == 1 and is_prepared_for_compile(second[0])
    if Int4CPUTensor.why_not(model_and_input()[0][0].weight) is None:  # this CPU converts
        assert kinds == {Int4CPUTensor}
    assert not any(isinstance(p, (Int4Tensor, Int4CPUTensor)) for p in second.parameters())
    assert torch.equal(first(x), second(x))
    assert same_state(first.state_dict(), second.state_dict())


def test_copy_into_the_inner_tensors_is_seen():
    model, x = model_and_input()
    other, _ = model_and_input(seed=1)
    prepare_for_compile(model)
    before = model[0].weight
    model.load_state_dict(other.state_dict())
    assert model[0].weight is not before
    assert torch.equal(model(x), other(x))


def test_assigning_another_layout_is_refused():
    model, _ = model_and_input()
    prepare_for_compile(model)
    w = Int4Tensor.from_hp(torch.randn(512, 256, dtype=torch.bfloat16), (1, 64))
    with pytest.raises(ValueError, match="prepared for compile as Int4Tensor"):
        model[0].weight = w


def test_compiled_fullgraph_matches_eager_and_explain_names_the_weights():
    model, x = model_and_input()
    ref = model(x)
    prepare_for_compile(model)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        assert torch.equal(compiled(x), ref)
        assert torch.equal(compiled(x), ref)
    report = explain(model, x)
    assert [e.name for e in report] == ["0.weight", "2.weight"]
    assert all(e.backend == "reference" for e in report)  # on this CPU


def _guards_per_call(layers: int, mode: str) -> int:
    """Guards dynamo evaluates per call of a compiled stack of ``layers`` linears."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch.manual_seed(0)
    model = LinearStack(layers).to(torch.bfloat16)
    if mode != "bf16":
        quantize_(model, Int4WeightOnlyConfig())
    if mode == "prepared":
        prepare_for_compile(model)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="eager", fullgraph=True)(x)
        (entry,) = _debug_get_cache_entry_list(LinearStack.forward.__code__)
        checked = entry.guard_manager.check_verbose({"self": model, "x": x})
        assert checked.result, checked.verbose_code_parts  # all guards ran and passed
        return checked.num_guards_executed


def test_compiled_graph_guards_a_prepared_weight_about_as_cheaply_as_a_bf16_one():
    """What a compiled call pays per weight before it runs: dynamo's guards. Held through
    torch's parametrize, an int4 weight cost ~47 guards per call (bf16: 7); here at most twice
    bf16's."""
    per_weight = {mode: (_guards_per_call(8, mode) - _guards_per_call(4, mode)) / 4
                  for mode in ("bf16", "prepared")}
    assert per_weight["prepared"] <= 2 * per_weight["bf16"], per_weight
