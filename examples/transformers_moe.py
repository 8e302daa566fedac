"""A transformers MoE model (Qwen3-MoE, built from a small config) quantized on load, run with
transformers' default ``grouped_mm`` experts, saved and reloaded.

    python examples/transformers_moe.py            # CPU or CUDA (the grouped int4 kernel runs there)

Nothing is downloaded: the model is built from ``Qwen3MoeConfig`` with random weights and
saved to a temporary directory first, as a bf16 checkpoint would come from the Hub.
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import int4tensor
from int4tensor import Int4Tensor, Int4WeightOnlyConfig
from int4tensor.integrations.transformers import Int4TensorConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: on a GPU each weight is quantized there as it loads (CPU loads need no device map)
PLACE = {"device_map": "cuda"} if DEVICE == "cuda" else {}


def main():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                            moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                            head_dim=64, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(f"{tmp}/bf16")
        bf16 = AutoModelForCausalLM.from_pretrained(f"{tmp}/bf16", dtype=torch.bfloat16, **PLACE)
        # every nn.Linear but lm_head, and the 3D expert stacks, quantized as they load
        model = AutoModelForCausalLM.from_pretrained(
            f"{tmp}/bf16", dtype=torch.bfloat16, **PLACE,
            quantization_config=Int4TensorConfig(Int4WeightOnlyConfig(group_size=128)))
        experts = model.model.layers[0].mlp.experts
        print("experts.gate_up_proj:", type(experts.gate_up_proj).__name__,
              list(experts.gate_up_proj.shape))
        assert isinstance(experts.gate_up_proj, Int4Tensor)
        print(f"memory: bf16 {bf16.get_memory_footprint() / 2**20:.1f} MiB, "
              f"int4 {model.get_memory_footprint() / 2**20:.1f} MiB")

        prompt = torch.randint(0, config.vocab_size, (1, 8), device=DEVICE)
        with torch.no_grad():
            ref, out = bf16(prompt).logits.double(), model(prompt).logits.double()
            ours = model.generate(prompt, max_new_tokens=12, do_sample=False)
        # (against bf16 it includes experts chosen differently by the router, whose input moved)
        print(f"logits SQNR vs bf16: {sqnr_db(ref, out):.1f} dB; generated "
              f"{ours.shape[1] - 8} tokens")

        # which kernel each expert matmul runs, and why the faster ones were refused
        report = int4tensor.explain(model, prompt[:, :1])
        print("\n".join(str(e) for e in report if e.op == "grouped_mm"))

        model.save_pretrained(f"{tmp}/int4")
        reloaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/int4", **PLACE)
        with torch.no_grad():
            same = torch.equal(reloaded.generate(prompt, max_new_tokens=12, do_sample=False),
                               ours)
        print(f"save_pretrained -> from_pretrained: same tokens = {same}")
        assert same
        # the int4 model against the same int4 weights dequantized to bf16: the kernels' error
        dense = AutoModelForCausalLM.from_pretrained(f"{tmp}/int4", **PLACE).dequantize()
        with torch.no_grad():
            exact = dense(prompt).logits.double()
        print(f"logits SQNR vs the dequantized weights: {sqnr_db(exact, out):.1f} dB")


def sqnr_db(ref, out):
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


if __name__ == "__main__":
    main()
