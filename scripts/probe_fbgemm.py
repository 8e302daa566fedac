"""Print the schemas of fbgemm's int4 ops (device exploration)."""
import torch
import fbgemm_gpu.experimental.gen_ai  # noqa: F401

names = ["bf16i4bf16_rowwise", "bf16i4bf16_rowwise_batched", "bf16i4bf16_shuffled",
         "bf16i4bf16_shuffled_batched", "bf16i4bf16_shuffled_grouped", "f8i4bf16_shuffled",
         "f8i4bf16_shuffled_grouped", "f8i4bf16_rowwise", "preshuffle_i4", "quantize_fp8_row",
         "bf16i4bf16_rowwise_grouped", "f8i4bf16_shuffled_batched"]
for n in names:
    try:
        print(getattr(torch.ops.fbgemm, n).default._schema)
    except Exception as e:
        print(n, "MISSING", type(e).__name__)
