"""Why does fbgemm's quantize_ops (the fake impls torch.compile needs) not import here?"""
import traceback

import torch

import fbgemm_gpu.experimental.gen_ai  # noqa: F401

try:
    import fbgemm_gpu.experimental.gen_ai.quantize_ops  # noqa: F401
    print("quantize_ops imported")
except Exception:
    traceback.print_exc()
import pkgutil
import fbgemm_gpu.experimental.gen_ai as g
print([m.name for m in pkgutil.iter_modules(g.__path__)])
