"""int4tensor.checkpoint: file-to-file quantization of HF-style directories, import of other
formats, verify, inspect, and bad input."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from int4tensor import Int4Tensor
from int4tensor.checkpoint import (
    Checkpoint,
    convert_checkpoint,
    inspect_checkpoint,
    load_checkpoint,
    quantize_checkpoint,
    verify_checkpoint,
)
from int4tensor.formats.common import AWQ_ORDER, pack_nibbles

H, I, E = 64, 128, 4


def dense_tensors():
    torch.manual_seed(0)
    bf = torch.bfloat16
    shard1 = {
        "model.embed_tokens.weight": torch.randn(100, H, dtype=bf),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(H, H, dtype=bf),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(H, dtype=bf),
        "model.layers.0.mlp.down_proj.weight": torch.randn(H, I, dtype=bf),
        "model.layers.0.input_layernorm.weight": torch.ones(H, dtype=bf),
    }
    shard2 = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, H, dtype=bf),
        "model.layers.0.mlp.odd_proj.weight": torch.randn(H, 48, dtype=bf),  # K % 32 != 0
        "model.norm.weight": torch.ones(H, dtype=bf),
        "lm_head.weight": torch.randn(100, H, dtype=bf),
        "model.rotary.inv_freq": torch.rand(8),
    }
    return shard1, shard2


@pytest.fixture
def src(tmp_path):
    """A tiny HF-style checkpoint: config.json, 2 shards + index, tokenizer files."""
    d = tmp_path / "src"
    d.mkdir()
    weight_map = {}
    for i, shard in enumerate(dense_tensors(), 1):
        name = f"model-0000{i}-of-00002.safetensors"
        st_save_file(shard, d / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": H}))
    (d / "tokenizer.json").write_text('{"tok": 1}')
    (d / "generation_config.json").write_text("{}")
    return d


def all_dense(src_dir):
    out = {}
    for shard in dense_tensors():
        out.update(shard)
    return out


QUANTIZED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.0.mlp.experts.gate_up_proj"]


class TestQuantizeNative:
    def test_output_directory(self, src, tmp_path):
        dst = tmp_path / "dst"
        report = quantize_checkpoint(src, dst, group_size=32, progress=False)
        assert sorted(report.quantized) == sorted(QUANTIZED)
        assert report.kept["lm_head.weight"] == "matches ignore pattern 'lm_head'"
        assert report.kept["model.embed_tokens.weight"] == "embedding"
        assert "not a multiple of group size 32" in report.kept["model.layers.0.mlp.odd_proj.weight"]
        assert sorted(os.listdir(dst)) == [
            "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
        assert (dst / "tokenizer.json").read_text() == '{"tok": 1}'
        config = json.loads((dst / "config.json").read_text())
        assert config["model_type"] == "llama"
        assert config["quantization_config"]["quant_method"] == "int4tensor"
        assert config["quantization_config"]["format_version"] == 2
        assert config["quantization_config"]["config"]["group_size"] == 32
        assert "model.layers.0.mlp.odd_proj" in config["quantization_config"]["not_converted"]
        # the index lists exactly what each shard holds
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        for shard in set(index["weight_map"].values()):
            with safe_open(dst / shard, "pt") as f:
                assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items()
                                                  if v == shard)
        assert index["metadata"]["total_size"] == report.dst_bytes
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp left

    def test_tensors_bit_exact(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        sd = load_checkpoint(tmp_path / "dst")
        dense = all_dense(src)
        assert sd.keys() == dense.keys()
        for name, w in dense.items():
            if name in QUANTIZED:  # 2D and 3D by the same path
                ref = Int4Tensor.from_hp(w, (1,) * (w.ndim - 1) + (32,))
                assert isinstance(sd[name], Int4Tensor)
                for f in ("qdata", "scale", "zero_point"):
                    assert torch.equal(getattr(sd[name], f), getattr(ref, f)), name
            else:
                assert torch.equal(sd[name], w) and sd[name].dtype == w.dtype, name

    def test_symmetric_and_ignore(self, src, tmp_path):
        report = quantize_checkpoint(src, tmp_path / "dst", group_size=32, symmetric=True,
                                     ignore=[r"mlp\."], progress=False)
        assert report.quantized == ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
        sd = load_checkpoint(tmp_path / "dst")
        assert (sd["lm_head.weight"].zero_point == 0).all()

    def test_expert_k_dim(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, expert_k_dim=-2,
                            progress=False)
        t = load_checkpoint(tmp_path / "dst")["model.layers.0.mlp.experts.gate_up_proj"]
        assert t.shape == (E, 2 * I, H) and t.is_transposed
        w = all_dense(src)["model.layers.0.mlp.experts.gate_up_proj"]
        ref = Int4Tensor.from_hp(w.transpose(-1, -2), (1, 1, 32))
        assert torch.equal(t.qdata, ref.qdata)

    def test_verify_passes(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        rows, summary = verify_checkpoint(src, tmp_path / "dst", progress=False)
        assert sorted(r.name for r in rows) == sorted(QUANTIZED)
        assert all(r.ok and 15 < r.sqnr_db < 30 for r in rows)
        assert summary["failed"] == 0 and summary["kept_identical"] == 7


class TestQuantizeCompressedTensors:
    def test_layout_and_config(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, format="compressed-tensors",
                            progress=False)
        tensors = {}
        for f in sorted(os.listdir(tmp_path / "dst")):
            if f.endswith(".safetensors"):
                tensors.update(st_load_file(tmp_path / "dst" / f))
        p = "model.layers.0.self_attn.q_proj"
        assert tensors[f"{p}.weight_packed"].shape == (H, H // 8)
        assert tensors[f"{p}.weight_zero_point"].shape == (H // 8, H // 32)
        assert tensors[f"{p}.weight_shape"].tolist() == [H, H]
        assert f"{p}.weight" not in tensors
        # 3D experts without a .weight name stay dense in compressed-tensors
        assert tensors["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
        qcfg = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
        assert qcfg["format"] == "pack-quantized" and qcfg["quant_method"] == "compressed-tensors"
        assert qcfg["ignore"] == ["lm_head", "model.layers.0.mlp.odd_proj"]
        assert qcfg["config_groups"]["group_0"]["weights"]["symmetric"] is False

    def test_exact_integer_zero_quantization(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, format="compressed-tensors",
                            progress=False)
        sd = load_checkpoint(tmp_path / "dst")
        w = all_dense(src)["model.layers.0.mlp.down_proj.weight"]
        ref = Int4Tensor.from_hp(w, (1, 32), zero_point_domain="int")
        t = sd["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(t.qdata, ref.qdata) and torch.equal(t.scale, ref.scale.float())
        rows, summary = verify_checkpoint(src, tmp_path / "dst", progress=False)
        assert summary["failed"] == 0 and summary["quantized"] == 2

    def test_symmetric(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=64, format="compressed-tensors",
                            symmetric=True, progress=False)
        with safe_open(tmp_path / "dst" / "model-00001-of-00002.safetensors", "pt") as f:
            assert not [k for k in f.keys() if k.endswith("weight_zero_point")]
        assert verify_checkpoint(src, tmp_path / "dst", progress=False)[1]["failed"] == 0


class TestVerifyCatchesBadFiles:
    def test_scrambled_nibble_order(self, src, tmp_path):
        dst = tmp_path / "dst"
        quantize_checkpoint(src, dst, group_size=32, format="compressed-tensors", progress=False)
        shard = dst / "model-00001-of-00002.safetensors"
        tensors = st_load_file(shard)
        key = "model.layers.0.mlp.down_proj.weight_packed"
        # re-pack the same nibbles in AWQ order while the config still says linear
        from int4tensor.formats.common import unpack_nibbles

        u = unpack_nibbles(tensors[key], I)
        tensors[key] = pack_nibbles(u, order=AWQ_ORDER)
        st_save_file(tensors, shard, metadata={"format": "pt"})
        rows, summary = verify_checkpoint(src, dst, progress=False)
        bad = {r.name: r for r in rows}["model.layers.0.mlp.down_proj.weight"]
        assert not bad.ok and bad.sqnr_db < 3
        assert summary["failed"] == 1

    def test_kept_tensor_changed(self, src, tmp_path):
        dst = tmp_path / "dst"
        quantize_checkpoint(src, dst, group_size=32, progress=False)
        shard = dst / "model-00002-of-00002.safetensors"
        from int4tensor.serialization import load_file, save_file

        sd = load_file(shard)
        sd["model.norm.weight"] = sd["model.norm.weight"] * 2
        save_file(sd, shard, field_separator="__")  # as the checkpoint writes (its index says)
        rows, summary = verify_checkpoint(src, dst, progress=False)
        assert [r.note for r in rows if not r.ok] == ["kept tensor differs from SRC"]

    def test_missing_in_src(self, src, tmp_path):
        dst = tmp_path / "dst"
        quantize_checkpoint(src, dst, group_size=32, progress=False)
        other = tmp_path / "other"
        other.mkdir()
        st_save_file({"x": torch.ones(2)}, other / "model.safetensors")
        rows, summary = verify_checkpoint(other, dst, progress=False)
        assert summary["failed"] == len(rows) and rows[0].note == "missing in SRC"
        assert math.isnan(summary["min_sqnr_db"])


class TestBadInput:
    def test_missing_shard(self, src, tmp_path):
        os.remove(src / "model-00002-of-00002.safetensors")
        with pytest.raises(FileNotFoundError, match="shard 'model-00002-of-00002.safetensors' "
                                                    "listed in model.safetensors.index.json"):
            quantize_checkpoint(src, tmp_path / "dst", progress=False)
        assert not (tmp_path / "dst").exists()

    def test_corrupted_second_shard_leaves_no_dst(self, src, tmp_path):
        shard = src / "model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-64])
        with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is not a readable "
                                             "safetensors file"):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        assert sorted(os.listdir(tmp_path)) == ["src"]  # neither dst nor a temp dir

    def test_failure_midway_keeps_old_dst(self, src, tmp_path, monkeypatch):
        dst = tmp_path / "dst"
        quantize_checkpoint(src, dst, group_size=32, progress=False)
        before = sorted(os.listdir(dst))
        import int4tensor.checkpoint as ck

        def boom(*a, **k):
            raise RuntimeError("disk full")

        monkeypatch.setattr(ck, "_write_dir_metadata", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            quantize_checkpoint(src, dst, group_size=64, overwrite=True, progress=False)
        assert sorted(os.listdir(dst)) == before
        assert json.loads((dst / "config.json").read_text())["quantization_config"][
            "config"]["group_size"] == 32
        assert sorted(os.listdir(tmp_path)) == ["dst", "src"]

    def test_existing_dst(self, src, tmp_path):
        (tmp_path / "dst").mkdir()
        (tmp_path / "dst" / "x").write_text("keep me")
        with pytest.raises(FileExistsError, match="exists and is not empty"):
            quantize_checkpoint(src, tmp_path / "dst", progress=False)
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, overwrite=True, progress=False)
        assert not (tmp_path / "dst" / "x").exists()

    def test_already_quantized(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "q", group_size=32, progress=False)
        with pytest.raises(ValueError, match="is already quantized"):
            quantize_checkpoint(tmp_path / "q", tmp_path / "q2", progress=False)

    def test_config_promises_other_layout(self, src, tmp_path):
        dst = tmp_path / "dst"
        quantize_checkpoint(src, dst, group_size=32, format="compressed-tensors", progress=False)
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
        (dst / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"dst/model-00001-of-00002.safetensors: "
                                             r"model.layers.0.mlp.down_proj.weight_scale is "
                                             r".* \(config and tensors disagree\)"):
            load_checkpoint(dst)
        rows, summary = inspect_checkpoint(dst)
        assert summary["problems"] == 2
        assert all(r.check.startswith("ERROR") for r in rows if r.format != "dense")

    def test_unsupported_quant_method(self, src, tmp_path):
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes"}
        (src / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="unsupported quant_method 'bitsandbytes'"):
            Checkpoint(src)

    def test_no_shards(self, tmp_path):
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError, match="holds no \\*.safetensors file"):
            Checkpoint(tmp_path / "empty")


def write_awq_checkpoint(d, dense, g=32):
    """An AutoAWQ GEMM checkpoint of ``dense`` (integer-zero quantized), 2 shards."""
    from int4tensor.formats.common import to_integer_qparams

    d.mkdir()
    shards = [{}, {}]
    for i, (name, w) in enumerate(dense.items()):
        t = Int4Tensor.from_hp(w, (1, g), zero_point_domain="int")
        u, s, z = to_integer_qparams(t)
        p = name[: -len(".weight")]
        shards[i % 2].update({f"{p}.qweight": pack_nibbles(u.t(), order=AWQ_ORDER),
                              f"{p}.qzeros": pack_nibbles(z, order=AWQ_ORDER),
                              f"{p}.scales": s.to(torch.float16)})
    shards[0]["model.norm.weight"] = torch.ones(8)
    weight_map = {}
    for i, shard in enumerate(shards):
        st_save_file(shard, d / f"s{i}.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, f"s{i}.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": g,
        "zero_point": True}}))


class TestImportCheckpoints:
    def test_awq_directory(self, tmp_path):
        dense = {f"l{i}.proj.weight": torch.randn(16, 64) for i in range(3)}
        write_awq_checkpoint(tmp_path / "awq", dense)
        ckpt = Checkpoint(tmp_path / "awq")
        assert sorted(ckpt.names()) == ["l0.proj.weight", "l1.proj.weight", "l2.proj.weight",
                                        "model.norm.weight"]
        report = convert_checkpoint(tmp_path / "awq", tmp_path / "native", progress=False)
        assert len(report.quantized) == 3
        sd = load_checkpoint(tmp_path / "native")
        for name, w in dense.items():
            ref = Int4Tensor.from_hp(w, (1, 32), zero_point_domain="int")
            assert torch.equal(sd[name].qdata, ref.qdata)
            # fp16 scales, float32 zero: the dequantized values are the AWQ ones exactly
            assert torch.equal(sd[name].dequantize(), ckpt.get(name).dequantize())
        rows, summary = inspect_checkpoint(tmp_path / "awq")
        assert summary["quantized"] == 3 and summary["problems"] == 0
        assert {r.dtype for r in rows if r.format == "awq"} == {"float16"}

    def test_convert_needs_a_foreign_format(self, src, tmp_path):
        with pytest.raises(ValueError, match="not an AWQ/GPTQ/compressed-tensors checkpoint"):
            convert_checkpoint(src, tmp_path / "x", progress=False)

    def test_compressed_tensors_round_trip(self, src, tmp_path):
        """ours -> compressed-tensors -> ours -> same integer codes and scales."""
        quantize_checkpoint(src, tmp_path / "ct", group_size=32, format="compressed-tensors",
                            progress=False)
        convert_checkpoint(tmp_path / "ct", tmp_path / "native", dtype=torch.bfloat16,
                           progress=False)
        a, b = load_checkpoint(tmp_path / "ct"), load_checkpoint(tmp_path / "native")
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(a[name].qdata, b[name].qdata)
        assert torch.equal(a[name].scale.to(torch.bfloat16), b[name].scale)


class TestInspect:
    def test_native(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        rows, summary = inspect_checkpoint(tmp_path / "dst")
        by_name = {r.name: r for r in rows}
        q = by_name["model.layers.0.mlp.down_proj.weight"]
        assert (q.format, q.shape, q.group_size, q.check) == ("Int4Tensor", (H, I), 32, "ok")
        assert q.nbytes == H * I // 2 + 2 * 2 * (I // 32) * H
        assert by_name["lm_head.weight"].format == "dense"
        assert summary["quantized"] == 3 and summary["problems"] == 0

    def test_single_file_with_bad_metadata(self, tmp_path):
        from int4tensor.serialization import save_file

        t = Int4Tensor.from_hp(torch.randn(16, 64), (1, 32))
        save_file({"w": t}, tmp_path / "m.safetensors")
        # rewrite the file with a scale of the wrong shape under the same metadata
        with safe_open(tmp_path / "m.safetensors", "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["w.scale"] = tensors["w.scale"][:1]
        st_save_file(tensors, tmp_path / "m.safetensors", metadata=meta)
        rows, summary = inspect_checkpoint(tmp_path / "m.safetensors")
        assert summary["problems"] == 1
        assert "scale has shape [1, 16], expected [2, 16]" in rows[0].check


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A small transformers Llama (random weights) saved with save_pretrained in 3 shards."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    d = tmp_path_factory.mktemp("llama") / "src"
    model.save_pretrained(d, max_shard_size="300KB")
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) >= 2
    return d, model


def _sqnr(a, b):
    return 20 * math.log10(a.norm() / (a - b).norm())


class TestTransformersLlama:
    def test_native_quantize_load_and_run(self, llama_dir, tmp_path):
        import transformers

        src, ref_model = llama_dir
        report = quantize_checkpoint(src, tmp_path / "q", group_size=32, progress=False)
        assert len(report.quantized) == 14  # 7 linears x 2 layers; lm_head kept
        config = transformers.AutoConfig.from_pretrained(tmp_path / "q")
        del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(load_checkpoint(tmp_path / "q"), assign=True, strict=True)
        assert isinstance(model.model.layers[1].mlp.down_proj.weight, Int4Tensor)
        x = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            ref, out = ref_model(x).logits.float(), model.eval()(x).logits.float()
        assert _sqnr(ref, out) > 10

    def test_compressed_tensors_export_loads_in_transformers(self, llama_dir, tmp_path):
        pytest.importorskip("compressed_tensors")
        import transformers

        src, _ = llama_dir
        quantize_checkpoint(src, tmp_path / "ct", group_size=32, format="compressed-tensors",
                            progress=False)
        # transformers hands the checkpoint to compressed-tensors' ModelCompressor, which
        # decompresses every weight_packed/weight_scale/weight_zero_point back to a dense weight
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "ct", dtype=torch.bfloat16,
            quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
        theirs = model.state_dict()
        ours = load_checkpoint(tmp_path / "ct")
        checked = 0
        for name, t in ours.items():
            if isinstance(t, Int4Tensor):
                assert torch.equal(theirs[name], t.dequantize(torch.bfloat16)), name
                checked += 1
        assert checked == 14


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d, index):
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _files_under(d):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


class TestPathSafety:
    """Names that come from file contents (an index's shard names) never lead outside SRC for
    reading or outside DST for writing."""

    @pytest.mark.parametrize("shard", ["../victim/model-00001-of-00002.safetensors",
                                       "/tmp/abs.safetensors", "sub/../x.safetensors", ".."])
    def test_index_shard_names_outside_src_refused(self, src, tmp_path, shard):
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "model-00001-of-00002.safetensors").write_bytes(
            (src / "model-00001-of-00002.safetensors").read_bytes())
        index = _index(src)
        index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = shard
        _write_index(src, index)
        before = {**_files_under(victim), **{("src",) + p.parts: b
                                             for p, b in _files_under(src).items()}}
        with pytest.raises(ValueError, match="refusing shard name .*plain file name"):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        after = {**_files_under(victim), **{("src",) + p.parts: b
                                            for p, b in _files_under(src).items()}}
        assert before == after and not (tmp_path / "dst").exists()
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    def test_shard_symlink_outside_src_refused(self, src, tmp_path):
        outside = tmp_path / "outside.safetensors"
        os.replace(src / "model-00002-of-00002.safetensors", outside)
        os.symlink(outside, src / "model-00002-of-00002.safetensors")
        with pytest.raises(ValueError, match="resolves to .*outside the checkpoint directory"):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)

    def test_side_file_symlink_outside_src_refused(self, src, tmp_path):
        secret = tmp_path / "secret.txt"
        secret.write_text("do not copy")
        os.symlink(secret, src / "tokenizer_extra.json")
        with pytest.raises(ValueError, match="outside the checkpoint directory"):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        assert not (tmp_path / "dst").exists()

    def test_hub_cache_snapshot_symlinks_allowed(self, src, tmp_path):
        """Hugging Face's cache keeps files in ``blobs/`` and symlinks them from
        ``snapshots/<rev>/``: that layout reads."""
        repo = tmp_path / "models--x"
        (repo / "blobs").mkdir(parents=True)
        snap = repo / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        for i, entry in enumerate(sorted(os.listdir(src))):
            os.replace(src / entry, repo / "blobs" / f"h{i}")
            os.symlink(os.path.join("..", "..", "blobs", f"h{i}"), snap / entry)
        report = quantize_checkpoint(snap, tmp_path / "dst", group_size=32, progress=False)
        assert sorted(report.quantized) == sorted(QUANTIZED)

    def test_src_and_dst_must_be_apart(self, src, tmp_path):
        before = _files_under(src)
        with pytest.raises(ValueError, match="is SRC"):
            quantize_checkpoint(src, src, group_size=32, overwrite=True, progress=False)
        with pytest.raises(ValueError, match="inside SRC"):
            quantize_checkpoint(src, src / "q", group_size=32, progress=False)
        with pytest.raises(ValueError, match="SRC .* is inside DST"):
            quantize_checkpoint(src, tmp_path, group_size=32, overwrite=True, progress=False)
        assert _files_under(src) == before

    def test_dst_parent_is_a_file(self, src, tmp_path):
        (tmp_path / "f").write_text("x")
        with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
            quantize_checkpoint(src, tmp_path / "f" / "dst", group_size=32, progress=False)

    def test_stale_temporaries_removed(self, src, tmp_path):
        """A SIGKILLed run leaves its temporary directory; the next run to that DST removes
        it (and reports it), but never a live run's."""
        dead = tmp_path / ".dst.abcd1234.tmp"  # int4tensor 0.1.0: no marker
        dead.mkdir()
        (dead / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        killed = tmp_path / ".dst.efgh5678.tmp"
        killed.mkdir()
        import socket
        import subprocess
        import sys
        proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)
        (killed / ".int4tensor-partial").write_text(f"{socket.gethostname()} "
                                                    f"{proc.stdout.strip()}\n")
        live = tmp_path / ".dst.ijkl9012.tmp"
        live.mkdir()
        (live / ".int4tensor-partial").write_text(f"{socket.gethostname()} {os.getpid()}\n")
        other = tmp_path / ".other.abcd1234.tmp"  # another DST's: not ours to remove
        other.mkdir()
        report = quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        assert sorted(report.removed_temporaries) == sorted([str(dead), str(killed)])
        assert not dead.exists() and not killed.exists() and live.exists() and other.exists()


class TestNothingSilentlyLost:
    def test_index_names_a_tensor_its_shard_lacks(self, src, tmp_path):
        index = _index(src)
        index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
        _write_index(src, index)
        match = ("lists tensor 'model.layers.0.extra.weight' in "
                 "model-00001-of-00002.safetensors, which does not contain it")
        with pytest.raises(ValueError, match=match):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        with pytest.raises(ValueError, match=match):
            inspect_checkpoint(src)

    @pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
    def test_scales_without_packed_weight(self, src, tmp_path, fmt):
        if fmt == "awq":
            d = tmp_path / "q"
            write_awq_checkpoint(d, {f"l{i}.proj.weight": torch.randn(16, 64) for i in range(2)})
            marker, prefix = "qweight", "l1.proj"
        else:
            d = tmp_path / "q"
            quantize_checkpoint(src, d, group_size=32, format="compressed-tensors",
                                progress=False)
            marker, prefix = "weight_packed", "model.layers.0.self_attn.q_proj"
        key = f"{prefix}.{marker}"
        file = _index(d)["weight_map"].pop(key)
        shard = st_load_file(d / file)
        del shard[key]
        st_save_file(shard, d / file, metadata={"format": "pt"})
        _write_index(d, {"weight_map": {k: v for k, v in _index(d)["weight_map"].items()
                                        if k != key}})
        with pytest.raises(ValueError, match=f"{prefix!r} has .* but no {marker!r}: its "
                                             "quantized weight is missing"):
            convert_checkpoint(d, tmp_path / "native", progress=False)
        assert not (tmp_path / "native").exists()

    def test_verify_fails_when_dst_lost_a_layer(self, src, tmp_path):
        dst = tmp_path / "dst"
        quantize_checkpoint(src, dst, group_size=32, progress=False)
        lost = "model.layers.0.self_attn.q_proj.weight"
        index = _index(dst)
        file = index["weight_map"][f"{lost}__qdata"]
        from int4tensor.serialization import load_file, save_file
        sd = load_file(dst / file)
        del sd[lost]
        save_file(sd, dst / file, field_separator="__")
        index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                               if not k.startswith(lost + "__")}
        _write_index(dst, index)
        rows, summary = verify_checkpoint(src, dst, progress=False)
        assert summary["failed"] == 1
        (row,) = [r for r in rows if not r.ok]
        assert row.name == lost and row.note == ("missing in DST (in SRC "
                                                 "model-00001-of-00002.safetensors)")

    def test_nan_weight_names_tensor_and_shard(self, src, tmp_path):
        shard = st_load_file(src / "model-00001-of-00002.safetensors")
        shard["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
        st_save_file(shard, src / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors: cannot quantize "
                                             r"'model.layers.0.mlp.down_proj.weight': weight has "
                                             r"1 NaN/Inf"):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)


class TestConfigErrors:
    def test_src_without_config_json(self, src, tmp_path):
        os.remove(src / "config.json")
        with pytest.raises(FileNotFoundError, match="has no config.json"):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        assert not (tmp_path / "dst").exists()

    @pytest.mark.parametrize("content, match", [
        ("[1, 2]", "must hold a JSON object, not a list"),
        ('{"quantization_config": "int4"}', "quantization_config must be a JSON object"),
        ("{not json", "is not valid JSON"),
    ])
    def test_malformed_config(self, src, tmp_path, content, match):
        (src / "config.json").write_text(content)
        with pytest.raises(ValueError, match=match):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)

    def test_config_json_is_a_directory(self, src, tmp_path):
        os.remove(src / "config.json")
        (src / "config.json").mkdir()
        with pytest.raises(ValueError, match="config.json is not a file"):
            quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)

    def test_bad_ignore_regex_and_device(self, src, tmp_path):
        with pytest.raises(ValueError, match=r"ignore pattern '\[unclosed' is not a valid"):
            quantize_checkpoint(src, tmp_path / "dst", ignore=["[unclosed"], progress=False)
        with pytest.raises(ValueError, match="unknown device 'foo'"):
            quantize_checkpoint(src, tmp_path / "dst", device="foo", progress=False)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
    def test_cuda_device_without_cuda(self, src, tmp_path):
        with pytest.raises(ValueError, match="device 'cuda' is not available"):
            quantize_checkpoint(src, tmp_path / "dst", device="cuda", progress=False)

    def test_inspect_single_native_shard(self, src, tmp_path):
        quantize_checkpoint(src, tmp_path / "dst", group_size=32, progress=False)
        rows, summary = inspect_checkpoint(tmp_path / "dst" / "model-00001-of-00002.safetensors")
        assert summary["quant_method"] == "int4tensor" and summary["quantized"] == 2
        (tmp_path / "dst" / "config.json").unlink()  # the shard's own metadata says it too
        rows, summary = inspect_checkpoint(tmp_path / "dst" / "model-00001-of-00002.safetensors")
        assert summary["quant_method"] == "int4tensor"


class TestBoundedMemory:
    def test_row_chunks_give_the_same_bits(self, src, tmp_path, monkeypatch):
        """quantize works a few rows at a time (docs/cli.md's memory bound); forcing chunks of
        one or a few rows changes no bit, for 2D, 3D and [E, K, N] experts."""
        import int4tensor.checkpoint as checkpoint

        quantize_checkpoint(src, tmp_path / "whole", group_size=32, expert_k_dim=-2,
                            progress=False)
        monkeypatch.setattr(checkpoint, "_CHUNK_ELEMENTS", 3 * 128)
        quantize_checkpoint(src, tmp_path / "chunked", group_size=32, expert_k_dim=-2,
                            progress=False)
        a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "chunked")
        assert a.keys() == b.keys()
        for name in QUANTIZED:
            assert a[name]._mismatch(b[name]) is None, name
            for field, x in a[name]._tensors().items():
                assert torch.equal(x, getattr(b[name], field)), (name, field)
