"""int4tensor.serialization: safetensors round trips, the generic field mechanism, bad files."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file as st_save_file

from int4tensor.serialization import (
    load_file,
    open_file,
    register_serializable,
    save_file,
)
from int4tensor.tensors import Int4BaseTensor, Int4Tensor


def assert_same(a, b):
    assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
    if isinstance(a, Int4BaseTensor):
        assert a._attributes() == b._attributes()
        assert a._tensors().keys() == b._tensors().keys()
        for name, t in a._tensors().items():
            u = b._tensors()[name]
            assert t.dtype == u.dtype and torch.equal(t, u), name
    else:
        assert torch.equal(a, b)


def quantized(shape=(64, 256), group_size=64, dtype=torch.bfloat16, **kw):
    w = torch.randn(shape, dtype=dtype)
    return Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (group_size,), **kw)


class TestRoundTrip:
    @pytest.mark.parametrize("shape", [(64, 256), (3, 32, 128)])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_bit_exact(self, tmp_path, shape, dtype):
        sd = {"a.weight": quantized(shape, 32, dtype), "a.bias": torch.randn(7, dtype=dtype),
              "steps": torch.arange(5)}
        save_file(sd, tmp_path / "m.safetensors")
        back = load_file(tmp_path / "m.safetensors")
        assert list(back) == list(sd) or set(back) == set(sd)
        for k in sd:
            assert_same(sd[k], back[k])

    def test_optional_field_and_block_size_tuple(self, tmp_path):
        t = quantized()
        t.act_pre_scale = torch.rand(256, dtype=torch.bfloat16) + 0.5
        save_file({"w": t, "v": quantized()}, tmp_path / "m.safetensors")
        back = load_file(tmp_path / "m.safetensors")
        assert_same(t, back["w"])
        assert back["v"].act_pre_scale is None
        assert back["w"].block_size == (1, 64) and isinstance(back["w"].block_size, tuple)
        assert torch.equal(back["w"].dequantize(), t.dequantize())

    def test_layout_on_disk(self, tmp_path):
        """Plain tensors named "{name}.{field}" and our JSON under the "int4tensor" key."""
        t = quantized((3, 32, 128), 32)
        save_file({"e": t}, tmp_path / "m.safetensors", metadata={"who": "me"})
        with safe_open(tmp_path / "m.safetensors", "pt") as f:
            assert sorted(f.keys()) == ["e.qdata", "e.scale", "e.zero_point"]
            assert torch.equal(f.get_tensor("e.qdata"), t.qdata)
            meta = f.metadata()
        assert meta["who"] == "me" and meta["format"] == "pt"
        ours = json.loads(meta["int4tensor"])
        assert ours["format_version"] == 1
        assert ours["tensors"]["e"] == {
            "type": "Int4Tensor", "version": 1, "fields": ["qdata", "scale", "zero_point"],
            "attributes": {"block_size": [1, 1, 32], "shape": [3, 32, 128],
                           "activation_dtype": "bf16"},
            "shape": [3, 32, 128], "dtype": "bfloat16"}

    def test_plain_file_without_our_metadata(self, tmp_path):
        st_save_file({"x": torch.ones(3)}, tmp_path / "p.safetensors")
        assert torch.equal(load_file(tmp_path / "p.safetensors")["x"], torch.ones(3))

    def test_shared_and_strided_tensors_are_saved(self, tmp_path):
        base = torch.randn(4, 8)
        sd = {"a": base, "view": base[1], "t": base.t()}
        save_file(sd, tmp_path / "m.safetensors")
        back = load_file(tmp_path / "m.safetensors")
        for k in sd:
            assert torch.equal(back[k], sd[k])

    def test_lazy_reader_reads_one_tensor(self, tmp_path):
        save_file({"a": quantized(), "b": torch.zeros(3)}, tmp_path / "m.safetensors")
        with open_file(tmp_path / "m.safetensors") as f:
            assert sorted(f.keys()) == ["a", "b"]
            assert isinstance(f.get("a"), Int4Tensor)
            with pytest.raises(KeyError, match="no tensor 'c'"):
                f.get("c")

    @settings(max_examples=25, deadline=None)
    @given(lead=st.sampled_from([(), (2,)]), n=st.integers(1, 24), groups=st.integers(1, 3),
           g=st.sampled_from([32, 64]), domain=st.sampled_from(["float", "int", "none"]),
           seed=st.integers(0, 2**16))
    def test_property_round_trip(self, tmp_path_factory, lead, n, groups, g, domain, seed):
        torch.manual_seed(seed)
        t = quantized((*lead, n, groups * g), g, zero_point_domain=domain)
        path = tmp_path_factory.mktemp("p") / "m.safetensors"
        save_file({"w": t}, path)
        assert_same(t, load_file(path)["w"])


class _Pair(Int4BaseTensor):
    """A stand-in for a future class with other field names (like Int4PreshuffledTensor)."""

    tensor_data_names = ("packed", "group_scale")
    optional_tensor_data_names = ("row_scale",)
    tensor_attribute_names = ("shape", "packing", "out_dtype")

    @staticmethod
    def __new__(cls, packed, group_scale, shape, packing, out_dtype, row_scale=None):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=group_scale.dtype)

    def __init__(self, packed, group_scale, shape, packing, out_dtype, row_scale=None):
        self.packed, self.group_scale, self.row_scale = packed, group_scale, row_scale
        self.packing, self.out_dtype = packing, out_dtype


class TestGenericMechanism:
    def test_new_class_serializes_once_registered(self, tmp_path):
        t = _Pair(torch.randint(-128, 127, (8, 4), dtype=torch.int8), torch.randn(2, 8),
                  (8, 8), "preshuffled", torch.bfloat16, row_scale=torch.randn(8))
        with pytest.raises(TypeError, match="_Pair, which is not registered"):
            save_file({"p": t}, tmp_path / "m.safetensors")
        assert not os.listdir(tmp_path)
        register_serializable(_Pair)
        save_file({"p": t}, tmp_path / "m.safetensors")
        back = load_file(tmp_path / "m.safetensors")["p"]
        assert type(back) is _Pair and back.packing == "preshuffled"
        assert back.out_dtype == torch.bfloat16 and back.shape == (8, 8)
        for f in ("packed", "group_scale", "row_scale"):
            assert torch.equal(getattr(back, f), getattr(t, f))

    def test_preshuffled_tensor_round_trip(self, tmp_path):
        """Int4PreshuffledTensor (other field names, optional fields, a str attribute) needs no
        code of its own; built directly here since preshuffling itself needs a GPU."""
        from int4tensor.tensors import Int4PreshuffledTensor

        t = Int4PreshuffledTensor(
            torch.randint(-128, 127, (64, 64), dtype=torch.int8),
            torch.randn(2, 64, dtype=torch.bfloat16), (1, 64), (64, 128), "bf16",
            group_zero=torch.randn(2, 64, dtype=torch.bfloat16))
        save_file({"p": t}, tmp_path / "m.safetensors")
        back = load_file(tmp_path / "m.safetensors")["p"]
        assert_same(t, back)
        assert back.row_scale is None and back.activation_dtype == "bf16"

    def test_register_rejects_non_subclass(self):
        with pytest.raises(TypeError, match="Int4BaseTensor subclass"):
            register_serializable(dict)


def _write_with_meta(path, tensors, meta):
    st_save_file(tensors, path, metadata={"int4tensor": json.dumps(meta)})


def _meta_for(t, **changes):
    entry = {"type": "Int4Tensor", "version": 1, "fields": ["qdata", "scale", "zero_point"],
             "attributes": {"block_size": list(t.block_size), "shape": list(t.shape)},
             "shape": list(t.shape), "dtype": "bfloat16"}
    entry.update(changes)
    return {"format_version": 1, "tensors": {"w": entry}}


def _fields(t):
    return {f"w.{k}": v for k, v in t._tensors().items()}


class TestBadFiles:
    def test_unknown_type(self, tmp_path):
        t = quantized()
        _write_with_meta(tmp_path / "m.safetensors", _fields(t), _meta_for(t, type="Int3Tensor"))
        with pytest.raises(ValueError, match=r"m\.safetensors: tensor 'w' has type 'Int3Tensor', "
                                             "unknown"):
            load_file(tmp_path / "m.safetensors")

    def test_newer_tensor_version(self, tmp_path):
        t = quantized()
        _write_with_meta(tmp_path / "m.safetensors", _fields(t), _meta_for(t, version=2))
        with pytest.raises(ValueError, match="layout version 2; this int4tensor reads up to "
                                             "version 1"):
            load_file(tmp_path / "m.safetensors")

    def test_newer_file_version(self, tmp_path):
        t = quantized()
        meta = _meta_for(t)
        meta["format_version"] = 7
        _write_with_meta(tmp_path / "m.safetensors", _fields(t), meta)
        with pytest.raises(ValueError, match="format version 7 is newer"):
            load_file(tmp_path / "m.safetensors")

    def test_invalid_json(self, tmp_path):
        st_save_file({"x": torch.ones(1)}, tmp_path / "m.safetensors",
                     metadata={"int4tensor": "{not json"})
        with pytest.raises(ValueError, match="'int4tensor' metadata is not valid"):
            load_file(tmp_path / "m.safetensors")

    def test_missing_field_tensor(self, tmp_path):
        t = quantized()
        fields = _fields(t)
        del fields["w.zero_point"]
        _write_with_meta(tmp_path / "m.safetensors", fields, _meta_for(t))
        with pytest.raises(ValueError, match=r"not in the file: \['w.zero_point'\]"):
            load_file(tmp_path / "m.safetensors")

    def test_fields_contradict_metadata(self, tmp_path):
        t = quantized((64, 256), 64)
        # metadata promises group size 32 but scale has K/64 groups
        meta = _meta_for(t, attributes={"block_size": [1, 32], "shape": [64, 256]})
        _write_with_meta(tmp_path / "m.safetensors", _fields(t), meta)
        with pytest.raises(ValueError, match=r"Int4Tensor 'w' does not match its metadata: "
                                             r"scale has shape \[4, 64\], expected \[8, 64\]"):
            load_file(tmp_path / "m.safetensors")

    def test_truncated_file(self, tmp_path):
        path = tmp_path / "m.safetensors"
        save_file({"w": quantized()}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        with pytest.raises(ValueError, match=r"m\.safetensors is not a readable safetensors "
                                             r"file \(truncated or corrupted\?\)"):
            load_file(path)

    def test_garbage_file(self, tmp_path):
        (tmp_path / "g.safetensors").write_bytes(b"\xff" * 64)
        with pytest.raises(ValueError, match="truncated or corrupted"):
            load_file(tmp_path / "g.safetensors")

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.safetensors"):
            load_file(tmp_path / "nope.safetensors")


class TestSaveErrors:
    def test_reserved_metadata_key(self, tmp_path):
        with pytest.raises(ValueError, match="'int4tensor' is reserved"):
            save_file({"x": torch.ones(1)}, tmp_path / "m.safetensors", {"int4tensor": "x"})

    def test_key_collision(self, tmp_path):
        with pytest.raises(ValueError, match="'w.qdata' is produced twice"):
            save_file({"w": quantized(), "w.qdata": torch.ones(1)}, tmp_path / "m.safetensors")

    def test_failed_save_keeps_old_file_and_leaves_no_temp(self, tmp_path):
        path = tmp_path / "m.safetensors"
        save_file({"x": torch.ones(2)}, path)
        before = path.read_bytes()
        with pytest.raises(TypeError, match="'y' is a str, not a tensor"):
            save_file({"x": torch.zeros(2), "y": "oops"}, path)
        assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


class TestMalformedMetadata:
    """Every malformed structure is a ValueError naming the file (and the tensor)."""

    @pytest.mark.parametrize("tensors, match", [
        ([1, 2], r"'tensors' must be an object \(name -> entry\), got a list"),
        ({"w": "Int4Tensor"}, r"tensor 'w': its metadata entry must be an object, got a str"),
    ])
    def test_bad_structure(self, tmp_path, tensors, match):
        t = quantized()
        _write_with_meta(tmp_path / "m.safetensors", _fields(t),
                         {"format_version": 1, "tensors": tensors})
        with pytest.raises(ValueError, match=r"m\.safetensors: .*" + match):
            load_file(tmp_path / "m.safetensors")

    @pytest.mark.parametrize("key", ["attributes", "shape", "fields", "dtype", "type"])
    def test_missing_key(self, tmp_path, key):
        t = quantized()
        meta = _meta_for(t)
        del meta["tensors"]["w"][key]
        _write_with_meta(tmp_path / "m.safetensors", _fields(t), meta)
        with pytest.raises(ValueError, match=rf"m\.safetensors: tensor 'w': its metadata entry "
                                             rf"lacks \['{key}'\]"):
            load_file(tmp_path / "m.safetensors")

    def test_missing_block_size(self, tmp_path):
        t = quantized()
        _write_with_meta(tmp_path / "m.safetensors", _fields(t),
                         _meta_for(t, attributes={"shape": list(t.shape)}))
        with pytest.raises(ValueError,
                           match=r"tensor 'w': 'attributes' .*missing \['block_size'\]"):
            load_file(tmp_path / "m.safetensors")

    @pytest.mark.parametrize("where", ["entry", "attributes", "file"])
    def test_unknown_keys_are_refused(self, tmp_path, where):
        """A claim we do not understand (a nibble order, say) must not be ignored."""
        t = quantized()
        meta = _meta_for(t)
        target = {"entry": meta["tensors"]["w"], "attributes": meta["tensors"]["w"]["attributes"],
                  "file": meta}[where]
        target["nibble_order"] = "high_first"
        _write_with_meta(tmp_path / "m.safetensors", _fields(t), meta)
        with pytest.raises(ValueError, match=r"unknown .*nibble_order"):
            load_file(tmp_path / "m.safetensors")

    def test_bad_shape_value(self, tmp_path):
        t = quantized()
        _write_with_meta(tmp_path / "m.safetensors", _fields(t), _meta_for(t, shape="64x256"))
        with pytest.raises(ValueError, match=r"tensor 'w': 'shape' must be a list of sizes"):
            load_file(tmp_path / "m.safetensors")

    def test_our_own_files_load(self, tmp_path):
        """act_pre_scale given as one factor ([1]) is stored as [K] and loads back."""
        base = quantized()
        t = Int4Tensor(base.qdata, base.scale, base.zero_point, base.block_size, base.shape,
                       act_pre_scale=torch.tensor([0.5], dtype=torch.bfloat16))
        save_file({"w": t}, tmp_path / "m.safetensors")
        back = load_file(tmp_path / "m.safetensors")["w"]
        assert_same(t, back)
        assert back.act_pre_scale.shape == (256,)


class TestWriter:
    def test_files_read_back_with_safetensors_itself(self, tmp_path):
        """save_file writes safetensors one tensor at a time; safetensors' own reader gets the
        same tensors back (every dtype, 0-d, empty, strided and storage-sharing tensors)."""
        from safetensors.torch import load_file as st_load_file

        base = torch.randn(8, 16)
        tensors = {
            "f32": base, "bf16": base.to(torch.bfloat16), "f16": base.half(),
            "i8": torch.randint(-128, 127, (5, 3), dtype=torch.int8),
            "i64": torch.arange(7), "bool": base > 0, "u8": torch.arange(9, dtype=torch.uint8),
            "fp8": base.to(torch.float8_e4m3fn), "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4), "strided": base.t(), "shared_a": base[:4],
            "shared_b": base[4:],
        }
        save_file(tensors, tmp_path / "m.safetensors", metadata={"k": "v"})
        back = st_load_file(tmp_path / "m.safetensors")
        assert back.keys() == tensors.keys()
        for name, t in tensors.items():
            assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
            assert torch.equal(back[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                               else back[name], t.contiguous().view(torch.uint8)
                               if t.dtype == torch.float8_e4m3fn else t), name
        with safe_open(tmp_path / "m.safetensors", "pt") as f:
            assert f.metadata() == {"k": "v", "format": "pt"}


def test_numpy_is_a_declared_dependency():
    """save_file writes through numpy buffers, and torch warns "Failed to initialize NumPy" on
    a fresh install without it: setup.py must install it."""
    import ast
    import pathlib

    setup = pathlib.Path(__file__).resolve().parent.parent / "setup.py"
    call = next(node for node in ast.walk(ast.parse(setup.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    requires = next(k.value for k in call.keywords if k.arg == "install_requires")
    names = [ast.literal_eval(e).split(">")[0].split("=")[0] for e in requires.elts]
    assert "numpy" in names
