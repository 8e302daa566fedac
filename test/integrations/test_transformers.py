"""The transformers integration, as a transformers user drives it: tiny models built from
configs, saved and loaded through the real ``from_pretrained`` / ``save_pretrained``."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, quantize_  # noqa: E402
from int4tensor.checkpoint import load_checkpoint, quantize_checkpoint  # noqa: E402
from int4tensor.integrations.transformers import Int4TensorConfig  # noqa: E402
from test.helpers import sqnr  # noqa: E402

aten = torch.ops.aten
CFG = Int4WeightOnlyConfig(group_size=64)
LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


def _save(model_cls, config, path):
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save(LlamaForCausalLM, LlamaConfig(**LLAMA, tie_word_embeddings=False),
                 tmp_path_factory.mktemp("llama") / "src")


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    return _save(LlamaForCausalLM, LlamaConfig(**LLAMA, tie_word_embeddings=True),
                 tmp_path_factory.mktemp("tied") / "src")


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)


def _quantized_on_load(path, config=CFG, **kwargs):
    return _load(path, quantization_config=Int4TensorConfig(config, **kwargs))


def assert_same_state(a: nn.Module, b: nn.Module):
    """Same keys, types, dtypes and bits (inner tensors and layout of every int4 tensor)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    for key, x in sa.items():
        y = sb[key]
        assert type(x) is type(y), key
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if isinstance(x, Int4Tensor):
            assert x.block_size == y.block_size, key
            assert x._tensors().keys() == y._tensors().keys(), key
            for field, t in x._tensors().items():
                assert torch.equal(t, getattr(y, field)), f"{key}.{field}"
        else:
            assert torch.equal(x, y), key


def dequantized_copy(path, quantized: nn.Module) -> nn.Module:
    """The bf16 model of ``path`` with each int4 weight replaced by its dequantized value."""
    dense = _load(path)
    for name, p in quantized.named_parameters():
        if isinstance(p, Int4Tensor):
            module, _, attr = name.rpartition(".")
            setattr(dense.get_submodule(module), attr, nn.Parameter(p.dequantize()))
    return dense


def int4_names(model):
    return sorted(n for n, p in model.named_parameters() if isinstance(p, Int4Tensor))


# ---- registration ---------------------------------------------------------------------------
def test_import_int4tensor_alone_does_not_import_transformers():
    code = "import sys, int4tensor; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("order", ["int4tensor, transformers", "transformers, int4tensor"])
def test_import_int4tensor_registers_the_quantizer_in_either_order(llama_dir, tmp_path, order):
    # Without our quantizer, transformers would load a checkpoint of ours with random weights
    # and a warning; `import int4tensor` (before or after transformers) is enough.
    _quantized_on_load(llama_dir).save_pretrained(tmp_path / "q")
    code = (f"import {order}\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})\n"
            "print(type(m.model.layers[0].mlp.up_proj.weight).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "Int4Tensor", out.stderr[-2000:]


def test_config_is_registered_and_round_trips_as_json():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["int4tensor"] is Int4TensorConfig
    cfg = Int4TensorConfig(Int4WeightOnlyConfig(group_size=32, zero_point_domain="int"),
                           modules_to_not_convert=["lm_head", "re:.*gate"])
    back = Int4TensorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.config == cfg.config
    assert back.modules_to_not_convert == ["lm_head", "re:.*gate"]


def test_config_rejects_what_is_not_ours():
    class TorchAoLike:  # e.g. torchao's Int4WeightOnlyConfig
        group_size = 128

    with pytest.raises(TypeError, match="takes an int4tensor Int4WeightOnlyConfig"):
        Int4TensorConfig(TorchAoLike())
    with pytest.raises(TypeError, match="modules_to_not_convert must be a list"):
        Int4TensorConfig(CFG, modules_to_not_convert="lm_head")
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4TensorConfig({"type": "Int4WeightOnlyConfig", "group_size": 100})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_preshuffled_on_load_without_a_gpu_is_a_clear_error(llama_dir):
    from int4tensor import Float8DynamicActivationInt4WeightConfig

    with pytest.raises(ValueError, match="quantizes on a CUDA GPU.*int4_packing_format='plain'"):
        _quantized_on_load(llama_dir, Float8DynamicActivationInt4WeightConfig())


def test_fp8_activation_plain_config_loads_saves_and_reloads(llama_dir, tmp_path):
    from int4tensor import Float8DynamicActivationInt4WeightConfig

    model = _quantized_on_load(llama_dir, Float8DynamicActivationInt4WeightConfig(
        int4_packing_format="plain"))
    assert model.model.layers[0].mlp.up_proj.weight.activation_dtype == "fp8"
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert_same_state(model, loaded)
    assert loaded.model.layers[0].mlp.up_proj.weight.activation_dtype == "fp8"


# ---- quantize on load -----------------------------------------------------------------------
def test_quantize_on_load_equals_quantize_(llama_dir):
    model = _quantized_on_load(llama_dir)
    ref = _load(llama_dir)
    quantize_(ref, CFG, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    assert_same_state(model, ref)
    assert not isinstance(model.lm_head.weight, Int4Tensor)
    assert len(int4_names(model)) == 2 * 7  # q, k, v, o, gate, up, down per layer


def test_device_preallocation_counts_int4_bytes(llama_dir):
    # transformers sizes its allocator warm-up (the peak of a GPU load) with these figures
    model = _quantized_on_load(llama_dir)
    with torch.device("meta"):
        meta = type(model)(model.config).to(torch.bfloat16)
    q = model.hf_quantizer
    sizes = {n: q.param_element_size(meta, n, p) for n, p in meta.named_parameters()}
    assert sizes["model.layers.0.mlp.up_proj.weight"] == 0.5 + 4 / 64
    assert sizes["lm_head.weight"] == 2 and sizes["model.norm.weight"] == 2
    total = sum(p.numel() * sizes[n] for n, p in meta.named_parameters())
    loaded = sum(t.numel() * t.element_size() for p in model.parameters()
                 for t in (p._tensors().values() if isinstance(p, Int4Tensor) else [p]))
    assert abs(total - loaded) / loaded < 0.01, (total, loaded)


def test_modules_to_not_convert_replaces_the_default(llama_dir):
    model = _quantized_on_load(llama_dir, modules_to_not_convert=["q_proj", "re:.*layers\\.1\\..*"])
    names = int4_names(model)
    assert "lm_head.weight" in names  # no longer skipped by default
    assert not any("q_proj" in n or "layers.1." in n for n in names)
    assert "model.layers.0.self_attn.k_proj.weight" in names


def test_weight_whose_k_is_not_a_multiple_of_the_group_stays_dense_with_a_warning(tmp_path):
    src = _save(LlamaForCausalLM, LlamaConfig(**{**LLAMA, "intermediate_size": 96}), tmp_path / "s")
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*K = 96"):
        model = _quantized_on_load(src)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, Int4Tensor)


def test_print_and_memory_footprint_show_the_quantization(llama_dir):
    model, dense = _quantized_on_load(llama_dir), _load(llama_dir)
    assert "weight=Int4Tensor(int4, group_size=64, bfloat16)" in repr(model.model.layers[0].mlp)
    int4_bytes = sum(t.numel() * t.element_size() for n, p in model.named_parameters()
                     if isinstance(p, Int4Tensor) for t in p._tensors().values())
    dense_rest = sum(p.numel() * p.element_size() for p in model.parameters()
                     if not isinstance(p, Int4Tensor))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_memory_footprint() == int4_bytes + dense_rest + buffers
    assert model.get_memory_footprint() < 0.6 * dense.get_memory_footprint()


# ---- save / load ----------------------------------------------------------------------------
def test_save_pretrained_then_from_pretrained_is_exact_and_sharded(llama_dir, tmp_path):
    model = _quantized_on_load(llama_dir)
    dst = tmp_path / "q"
    model.save_pretrained(dst, max_shard_size="100KB")
    files = sorted(os.listdir(dst))
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "int4tensor" and qc["format_version"] == 2
    assert qc["config"]["group_size"] == 64 and qc["config"]["zero_point_domain"] == "float"
    assert qc["not_converted"] == ["lm_head"]
    with mock.patch.object(Int4Tensor, "from_hp", side_effect=AssertionError("re-quantized")):
        loaded = AutoModelForCausalLM.from_pretrained(dst)
    assert_same_state(model, loaded)
    assert loaded.dtype == torch.bfloat16


def test_sharded_save_pretrained_output_reads_with_load_checkpoint_and_cli(llama_dir, tmp_path):
    from int4tensor.cli import main

    model = _quantized_on_load(llama_dir)
    model.save_pretrained(tmp_path / "q", max_shard_size="100KB")  # splits some fields
    loaded = load_checkpoint(tmp_path / "q")
    state = model.state_dict()
    assert int4_names(model) == sorted(k for k, v in loaded.items() if isinstance(v, Int4Tensor))
    for name in int4_names(model):
        assert torch.equal(loaded[name].qdata, state[name].qdata), name
        assert torch.equal(loaded[name].zero_point, state[name].zero_point), name
    assert main(["inspect", str(tmp_path / "q")]) == 0


def test_reload_reads_every_tensor_and_never_dequantizes(llama_dir, tmp_path):
    model = _quantized_on_load(llama_dir)
    model.save_pretrained(tmp_path / "q")
    with mock.patch.object(Int4Tensor, "dequantize", side_effect=AssertionError("dequantized")):
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q",
                                                            output_loading_info=True)
    # nothing missing (no weight left to be initialized in bf16) and nothing unread
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert int4_names(loaded) == int4_names(model)
    assert not [n for n, b in loaded.named_buffers() if "__" in n]  # fields became tensors


def test_tied_embeddings_are_kept_and_stay_tied_after_reload(tied_llama_dir, tmp_path):
    model = _quantized_on_load(tied_llama_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_state(model, loaded)


def test_quantizing_a_tied_lm_head_is_refused(tied_llama_dir):
    with pytest.raises(ValueError, match="lm_head shares its weight with the input embedding"):
        _quantized_on_load(tied_llama_dir, modules_to_not_convert=[])


def test_cli_native_output_loads_with_from_pretrained(llama_dir, tmp_path):
    quantize_checkpoint(llama_dir, tmp_path / "cli", group_size=64, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    expected = load_checkpoint(tmp_path / "cli")
    state = model.state_dict()
    assert int4_names(model) == sorted(k for k, v in expected.items()
                                       if isinstance(v, Int4Tensor))
    for key, value in expected.items():
        if isinstance(value, Int4Tensor):
            for field, t in value._tensors().items():
                assert torch.equal(t, getattr(state[key], field)), key
        else:
            assert torch.equal(value, state[key]), key


def test_cli_output_of_an_older_bert_checkpoint_loads_with_from_pretrained(tmp_path):
    # BERT checkpoints of transformers 4 carry embeddings.position_ids, which transformers 5's
    # BertModel no longer has: a strict load_state_dict fails, from_pretrained skips it.
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=300)).eval()
    bert.save_pretrained(tmp_path / "src")
    shard = tmp_path / "src" / "model.safetensors"
    sd = load_file(shard)
    sd["embeddings.position_ids"] = torch.arange(512)[None]
    save_file(sd, shard, metadata={"format": "pt"})
    quantize_checkpoint(tmp_path / "src", tmp_path / "q", group_size=64, progress=False)
    model = AutoModel.from_pretrained(tmp_path / "q")
    assert isinstance(model.encoder.layer[0].attention.self.query.weight, Int4Tensor)
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref, out = bert(x).last_hidden_state, model(x).last_hidden_state
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999


def _legacy_checkpoint(src, dst):
    """A checkpoint as int4tensor 0.1's CLI wrote it (fields 'NAME.qdata', old config)."""
    from int4tensor import save_file

    sd = load_checkpoint(src)
    os.makedirs(dst)
    save_file(sd, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "int4tensor", "format": "native",
                                     "group_size": 64, "zero_point_domain": "float",
                                     "ignore": ["lm_head"], "expert_k_dim": -1,
                                     "tensor_type": "Int4Tensor"}
    (dst / "config.json").write_text(json.dumps(config))
    return sd


def test_old_native_checkpoint_gets_a_clear_error_and_converts(llama_dir, tmp_path):
    from int4tensor.checkpoint import convert_checkpoint

    quantize_checkpoint(llama_dir, tmp_path / "new", group_size=64, progress=False)
    sd = _legacy_checkpoint(tmp_path / "new", tmp_path / "old")
    with pytest.raises(ValueError, match=r"int4tensor 0\.1.*int4tensor convert"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert load_checkpoint(tmp_path / "old").keys() == sd.keys()  # still loads our way
    convert_checkpoint(tmp_path / "old", tmp_path / "conv", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "conv")
    for key, value in sd.items():
        got = model.state_dict()[key]
        assert (torch.equal(value.qdata, got.qdata) and torch.equal(value.scale, got.scale)
                if isinstance(value, Int4Tensor) else torch.equal(value, got)), key


def test_model_quantized_by_hand_saves_with_save_pretrained(llama_dir, tmp_path):
    # was: "Attempted to access the data pointer on an invalid python storage", and a DST
    # holding only config.json
    model = _load(llama_dir)
    quantize_(model, CFG, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    quantize_(model, {"re:.*layers\\.1\\.mlp\\.up_proj\\.weight": CFG})  # a second call is fine
    assert "Int4Tensor(int4, group_size=64" in repr(model.model.layers[0].self_attn)
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert_same_state(model, loaded)
    assert json.loads((tmp_path / "q" / "config.json").read_text())[
        "quantization_config"]["not_converted"] == ["lm_head"]


# ---- bad checkpoints ------------------------------------------------------------------------
@pytest.fixture
def saved(llama_dir, tmp_path):
    model = _quantized_on_load(llama_dir)
    model.save_pretrained(tmp_path / "q", max_shard_size="100KB")
    return tmp_path / "q"


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def test_config_group_size_contradicting_the_tensors_is_an_error(saved):
    _edit_config(saved, lambda q: q["config"].update(group_size=128))
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors: tensor '.*' has group "
                                         r"size 64, but config\.json's quantization_config says 128"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_config_layout_contradicting_the_tensors_is_an_error(saved):
    _edit_config(saved, lambda q: q["config"].update(int4_packing_format="preshuffled"))
    with pytest.raises(ValueError, match="is a Int4Tensor, but config.json's quantization_config "
                                         "describes Int4PreshuffledTensor"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_newer_format_version_is_an_error(saved):
    _edit_config(saved, lambda q: q.update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_newer_tensor_layout_version_is_an_error(tmp_path, llama_dir):
    quantize_checkpoint(llama_dir, tmp_path / "cli", group_size=64, progress=False)
    from safetensors import safe_open
    from safetensors.torch import save_file as st_save

    path = tmp_path / "cli" / "model.safetensors"
    if not path.exists():
        path = next(p for p in (tmp_path / "cli").iterdir() if p.suffix == ".safetensors")
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["int4tensor"])
    next(iter(info["tensors"].values()))["version"] = 9
    meta["int4tensor"] = json.dumps(info)
    st_save(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="of layout version 9"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "cli")


def test_missing_shard_is_an_error(saved):
    shard = sorted(p for p in os.listdir(saved) if p.endswith(".safetensors"))[1]
    os.remove(saved / shard)
    with pytest.raises((OSError, ValueError), match=shard.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(saved)


# ---- what a user does next ------------------------------------------------------------------
@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_agrees_with_the_dequantized_model(llama_dir, cache):
    model = _quantized_on_load(llama_dir)
    dense = dequantized_copy(llama_dir, model)
    prompt = torch.randint(0, LLAMA["vocab_size"], (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation=cache)
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
        ref = dense.generate(prompt, **kwargs)
        logits, ref_logits = model(out).logits, dense(out).logits
    assert torch.equal(out, ref)
    assert sqnr(ref_logits, logits) > 40


def test_dequantize_and_to(llama_dir):
    model = _quantized_on_load(llama_dir)
    expected = {n: p.dequantize() for n, p in model.named_parameters() if isinstance(p, Int4Tensor)}
    model = model.to("cpu")
    assert int4_names(model) == sorted(expected)
    model.dequantize()
    assert not int4_names(model)
    for name, value in expected.items():
        assert torch.equal(model.get_parameter(name), value), name
    assert getattr(model, "hf_quantizer", None) is None
    model(torch.randint(0, 256, (1, 4)))


# ---- MoE ------------------------------------------------------------------------------------
MOE = [
    (MixtralForCausalLM, MixtralConfig(**LLAMA, num_local_experts=4, num_experts_per_tok=2)),
    (Qwen3MoeForCausalLM, Qwen3MoeConfig(**LLAMA, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64, head_dim=32)),
]


@pytest.fixture(scope="module", params=MOE, ids=["mixtral", "qwen3_moe"])
def moe_dir(request, tmp_path_factory):
    cls, config = request.param
    return _save(cls, config, tmp_path_factory.mktemp("moe") / "src")


def test_moe_quantize_on_load_quantizes_expert_stacks(moe_dir):
    model = _quantized_on_load(moe_dir)
    ref = _load(moe_dir)
    quantize_(ref, CFG, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    quantize_(ref, {"re:.*experts\\.(gate_up_proj|down_proj)": CFG})
    assert_same_state(model, ref)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, Int4Tensor) and experts.gate_up_proj.ndim == 3
    assert isinstance(experts.down_proj, Int4Tensor)


def test_moe_save_and_reload_is_exact(moe_dir, tmp_path):
    from int4tensor.integrations.transformers import EXPERTS_IMPLEMENTATION

    model = _quantized_on_load(moe_dir)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert_same_state(model, reloaded)
    # the grouped experts are chosen again on load, never written to the config
    assert reloaded.config._experts_implementation == EXPERTS_IMPLEMENTATION
    assert EXPERTS_IMPLEMENTATION not in (tmp_path / "q" / "config.json").read_text()


def test_moe_prepared_for_compile_keeps_outputs_state_and_compiles_without_breaks(moe_dir,
                                                                                   tmp_path):
    """prepare_for_compile on a model whose experts hold 3D int4 stacks (not ``weight``): the
    experts read them through the generated properties; outputs, state dict and saved files
    stay the same, and a compiled step has no graph break (fullgraph) or recompile."""
    from int4tensor import prepare_for_compile
    from int4tensor.compile_support import is_prepared_for_compile

    model = _quantized_on_load(moe_dir)
    x = torch.randint(0, LLAMA["vocab_size"], (1, 6))
    with torch.no_grad():
        ref = model(x).logits
    prepare_for_compile(model)
    experts = model.model.layers[0].mlp.experts
    assert is_prepared_for_compile(experts, "gate_up_proj")
    assert is_prepared_for_compile(experts, "down_proj")
    assert not any(isinstance(p, Int4Tensor) for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    assert_same_state(model, _quantized_on_load(moe_dir))  # quantize-on-load is deterministic
    model.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(x).logits, ref)
    torch._dynamo.reset()
    with torch.no_grad(), mock.patch.object(torch._dynamo.config, "error_on_recompile", True):
        step = torch.compile(model, fullgraph=True, backend="aot_eager")
        for _ in range(2):
            assert sqnr(ref, step(x).logits) > 40


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_moe_runs_with_each_experts_implementation(moe_dir, implementation):
    model = _quantized_on_load(moe_dir)
    dense = dequantized_copy(moe_dir, model)
    model.set_experts_implementation(implementation)
    dense.set_experts_implementation(implementation)
    from int4tensor.kernels import reference

    x = torch.randint(0, LLAMA["vocab_size"], (2, 7))
    real = reference.grouped_mm_by_expert  # what our aten._grouped_mm runs eagerly on a CPU
    with torch.no_grad(), mock.patch.object(reference, "grouped_mm_by_expert",
                                            side_effect=real) as grouped:
        out = model(x).logits
    ref = dense(x).logits
    assert sqnr(ref, out) > 40
    assert grouped.called == (implementation == "grouped_mm")


def _decode_implementation(model) -> str:
    """The experts implementation generate() would decode with on a GPU (transformers swaps
    ``grouped_mm`` for ``batched_mm`` on any non-CPU device; the device is faked here)."""
    with mock.patch.object(type(model), "device", torch.device("cuda")), \
            model._optimize_model_for_decode():
        return model.config._experts_implementation


def test_moe_int4_stacks_keep_the_grouped_experts_while_decoding(moe_dir):
    """batched_mm would copy each selected expert (W[expert_ids]) every decode step; the grouped
    kernels read only the active experts, so int4 stacks stay on transformers' grouped forward."""
    from int4tensor.integrations.transformers import EXPERTS_IMPLEMENTATION

    dense = _load(moe_dir)
    assert _decode_implementation(dense) == "batched_mm"  # what transformers does to bf16
    model = _quantized_on_load(moe_dir)
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    assert _decode_implementation(model) == EXPERTS_IMPLEMENTATION
    x = torch.randint(0, LLAMA["vocab_size"], (1, 5))
    with torch.no_grad():
        assert sqnr(dequantized_copy(moe_dir, model)(x).logits, model(x).logits) > 40
    model.dequantize()
    assert model.config._experts_implementation == "grouped_mm"


def test_moe_quantized_with_quantize_keeps_grouped_experts_but_not_an_explicit_choice(moe_dir):
    from int4tensor.integrations.transformers import EXPERTS_IMPLEMENTATION

    stacks = {"re:.*experts\\.(gate_up_proj|down_proj)": CFG}
    model = _load(moe_dir)
    quantize_(model, CFG, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    assert model.config._experts_implementation == "grouped_mm"  # no int4 stacks yet
    quantize_(model, stacks)
    assert _decode_implementation(model) == EXPERTS_IMPLEMENTATION
    chosen = _load(moe_dir, experts_implementation="batched_mm")
    quantize_(chosen, stacks)
    assert chosen.config._experts_implementation == "batched_mm"


# ---- compressed-tensors exports as transformers loads them ------------------------------------
def _dense_with(path, weights):
    dense = _load(path)
    for name, t in weights.items():
        if isinstance(t, Int4Tensor):
            module, _, attr = name.rpartition(".")
            setattr(dense.get_submodule(module), attr, nn.Parameter(t.dequantize(torch.bfloat16)))
    return dense


def test_symmetric_compressed_tensors_export_loads_compressed(llama_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    quantize_checkpoint(llama_dir, tmp_path / "ct", group_size=64, format="compressed-tensors",
                        symmetric=True, progress=False)
    model = _load(tmp_path / "ct")  # no dequantize=True: int4 weights stay packed
    up = model.model.layers[0].mlp.up_proj
    assert "weight_packed" in dict(up.named_parameters())
    dense = _dense_with(llama_dir, load_checkpoint(tmp_path / "ct"))
    x = torch.randint(0, LLAMA["vocab_size"], (2, 6))
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense(x).logits)


def test_asymmetric_compressed_tensors_export_loads_dequantized_or_fails_loudly(llama_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    quantize_checkpoint(llama_dir, tmp_path / "ct", group_size=64, format="compressed-tensors",
                        progress=False)
    ours = load_checkpoint(tmp_path / "ct")
    # compressed-tensors 0.20.1 builds weight_zero_point unpacked [N, K/G] on the empty model,
    # while the checkpoint (its own compressor's, ours, vLLM's) packs it along N. transformers
    # 5.24 refuses the size mismatch, loudly; 5.17 loads the stored tensors and runs them right.
    try:
        compressed = _load(tmp_path / "ct")
    except RuntimeError as e:
        assert "ignore_mismatched_sizes" in str(e)
    else:
        x = torch.randint(0, LLAMA["vocab_size"], (2, 6))
        with torch.no_grad():
            assert torch.equal(compressed(x).logits, _dense_with(llama_dir, ours)(x).logits)
    model = _load(tmp_path / "ct",
                  quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    for name, t in ours.items():
        if isinstance(t, Int4Tensor):
            assert torch.equal(model.get_parameter(name), t.dequantize(torch.bfloat16)), name


# ---- GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("device_map", ["cuda", "auto"])
def test_cuda_quantize_on_load_save_reload_generate(llama_dir, tmp_path, device_map):
    if device_map == "auto":
        pytest.importorskip("accelerate")
    model = _load(llama_dir, device_map=device_map,
                  quantization_config=Int4TensorConfig(Int4WeightOnlyConfig(group_size=128)))
    weight = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(weight, Int4Tensor) and weight.qdata.is_cuda
    # Bit for bit what quantize_ gives on the same device (the CUDA and CPU roundings of
    # w / scale may differ at exact ties, so the CPU result is compared by value below).
    ref = _load(llama_dir, device_map=device_map)
    quantize_(ref, Int4WeightOnlyConfig(group_size=128),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    assert_same_state(model, ref)
    cpu = _load(llama_dir, quantization_config=Int4TensorConfig(Int4WeightOnlyConfig(group_size=128)))
    on_cpu = cpu.model.layers[0].mlp.up_proj.weight
    assert sqnr(on_cpu.dequantize(), weight.dequantize().cpu()) > 40
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=device_map)
    assert loaded.model.layers[0].mlp.up_proj.weight.qdata.is_cuda
    dense = dequantized_copy(llama_dir, cpu).cuda()
    prompt = torch.randint(0, LLAMA["vocab_size"], (1, 5), device="cuda")
    with torch.no_grad():
        out = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
        ref = dense.generate(prompt, max_new_tokens=6, do_sample=False)
        assert sqnr(dense(out).logits, loaded(out).logits) > 30
    assert (out == ref).float().mean() > 0.8


def test_cpu_moe_after_conversion_generates_through_each_active_expert(moe_dir):
    """On a CPU, transformers decodes with grouped_mm experts; after
    convert_model_to_packed_tensors_ each routed expert runs torch's int4 GEMM once (the
    whole-stack dequantize took ~300x bf16's time on Qwen3-30B-A3B's stacks)."""
    from int4tensor import Int4CPUTensor, convert_model_to_packed_tensors_
    from int4tensor.kernels import cpu, reference

    model = _quantized_on_load(moe_dir)
    dense = dequantized_copy(moe_dir, model)
    prompt = torch.randint(0, LLAMA["vocab_size"], (1, 5))
    convert_model_to_packed_tensors_(model)
    stack = model.model.layers[0].mlp.experts.gate_up_proj
    converted = cpu.why_not_available() is None
    assert isinstance(stack, Int4CPUTensor) == converted
    spy = (cpu, "grouped_mm_experts") if converted else (reference, "grouped_mm_by_expert")
    real = getattr(*spy)
    with torch.no_grad(), mock.patch.object(*spy, side_effect=real) as per_expert:
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert sqnr(dense(out).logits, model(out).logits) > 30
    assert per_expert.call_count >= 2 * LLAMA["num_hidden_layers"] * 6  # both stacks, each step
    with torch.no_grad():
        ref = dense.generate(prompt, max_new_tokens=6, do_sample=False)
    assert (out == ref).float().mean() > 0.8


@pytest.mark.gpu
def test_cuda_moe_grouped_mm_and_packed_conversion(moe_dir):
    from int4tensor import convert_model_to_packed_tensors_

    model = _load(moe_dir, device_map="cuda",
                  quantization_config=Int4TensorConfig(Int4WeightOnlyConfig(group_size=64)))
    dense = dequantized_copy(moe_dir, model).cuda()
    x = torch.randint(0, LLAMA["vocab_size"], (2, 7), device="cuda")
    for implementation in ("grouped_mm", "batched_mm", "eager"):
        model.set_experts_implementation(implementation)
        dense.set_experts_implementation(implementation)
        with torch.no_grad():
            assert sqnr(dense(x).logits, model(x).logits) > 30, implementation
    convert_model_to_packed_tensors_(model)
    with torch.no_grad():
        assert sqnr(dense(x).logits, model(x).logits) > 30


@pytest.mark.gpu
def test_cuda_generate_decodes_int4_experts_with_the_grouped_kernels(moe_dir):
    """On a GPU transformers decodes grouped_mm experts with batched_mm (a copy of each selected
    expert per token); int4 stacks stay on the grouped kernels for every step."""
    from int4tensor import kernels

    model = _load(moe_dir, device_map="cuda", quantization_config=Int4TensorConfig(CFG))
    dense = dequantized_copy(moe_dir, model).cuda()
    prompt = torch.randint(0, LLAMA["vocab_size"], (1, 5), device="cuda")
    new_tokens = 6
    with torch.no_grad(), \
            mock.patch.object(kernels, "int4_grouped_mm", side_effect=kernels.int4_grouped_mm) \
            as grouped, mock.patch.object(kernels, "int4_bmm", side_effect=kernels.int4_bmm) as bmm:
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    assert grouped.call_count == 2 * LLAMA["num_hidden_layers"] * new_tokens  # both stacks
    assert not bmm.called
    with torch.no_grad():
        assert sqnr(dense(out).logits, model(out).logits) > 30


# ---- prepare_for_compile on a transformers model ---------------------------------------------
def test_prepared_model_generates_saves_and_reloads_the_same(llama_dir, tmp_path):
    from int4tensor import explain, prepare_for_compile

    model = _quantized_on_load(llama_dir)
    prompt = torch.randint(0, LLAMA["vocab_size"], (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref = model.generate(prompt, **kwargs)
        ref_logits = model(ref).logits
    state = {k: v for k, v in model.state_dict().items()}
    prepare_for_compile(model)
    assert not any(isinstance(p, Int4Tensor) for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), ref)
        assert torch.equal(model(ref).logits, ref_logits)
    prepared_state = model.state_dict()
    assert prepared_state.keys() == state.keys()
    assert all(type(prepared_state[k]) is type(v) for k, v in state.items())
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ref).logits, ref_logits)
    names = [e.name for e in explain(model, prompt)]
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names


@pytest.mark.parametrize("prepared", [False, True])
def test_compiled_static_cache_decode_step_has_no_graph_break_or_recompile(prepared):
    """A transformers decode step over a static cache compiled with fullgraph=True (a graph
    break raises) runs four steps without a recompile (error_on_recompile), our weights plain
    or prepared for compile; aot_eager: dynamo and AOTAutograd as in inductor, no codegen."""
    from transformers import StaticCache

    from int4tensor import prepare_for_compile

    config = LlamaConfig(**LLAMA, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    quantize_(model, CFG)
    if prepared:
        prepare_for_compile(model)
    cache = StaticCache(config=config, max_cache_len=32)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 4))
    torch._dynamo.reset()
    with torch.no_grad(), mock.patch.object(torch._dynamo.config, "error_on_recompile", True):
        out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(4))
        step = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        for pos in range(4, 8):
            token = out.logits[:, -1:].argmax(-1)
            out = step(token, past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([pos]))
    assert torch.isfinite(out.logits).all()
