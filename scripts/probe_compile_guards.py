"""What a compiled call pays on the host per int4 weight: dynamo's guards and the rest of the
wrapper around the graph (CPU or GPU; no CUDA needed).

    python -m scripts.probe_compile_guards [--layers 225] [--device cpu]

Compiles a stack of ``--layers`` 256x256 linears (inductor, ``fullgraph=True``) as bf16, as
int4 tensor-subclass weights and after :func:`int4tensor.prepare_for_compile`, then prints per
call: the guard evaluation time (the compiled frame's guard manager, timed alone), the
wrapper's time (cProfile's total minus the inductor graph's ``call``) and the guard count.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from int4tensor import Int4WeightOnlyConfig, prepare_for_compile, quantize_
from test.helpers import LinearStack  # the test suite's model, so the probe measures the same


def measure(mode: str, layers: int, device: str) -> dict:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch.manual_seed(0)
    model = LinearStack(layers).to(device=device, dtype=torch.bfloat16)
    if mode != "bf16":
        quantize_(model, Int4WeightOnlyConfig())
    if mode == "prepared":
        prepare_for_compile(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, 256, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            compiled(x)
        profiler.disable()
        (entry,) = _debug_get_cache_entry_list(LinearStack.forward.__code__)
        frame = {"self": model, "x": x}
        checked = entry.guard_manager.check_verbose(frame)
        start = time.perf_counter()
        for _ in range(200):
            entry.guard_manager.check(frame)
        guards_ms = (time.perf_counter() - start) / 200 * 1e3
    stats = pstats.Stats(profiler)
    graph = sum(v[3] for k, v in stats.stats.items()
                if k[2] == "call" and "torchinductor" in k[0])
    return dict(guards_ms=guards_ms, wrapper_ms=(stats.total_tt - graph) / 50 * 1e3,
                guards=checked.num_guards_executed, passed=checked.result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=225)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{args.layers} linears on {args.device}, torch {torch.__version__}")
    for mode in ("bf16", "int4", "prepared"):
        r = measure(mode, args.layers, args.device)
        print(f"{mode:9s} guards {r['guards']:6d} ({r['guards_ms']:.3f} ms, passed "
              f"{r['passed']}), wrapper {r['wrapper_ms']:.2f} ms per call", flush=True)


if __name__ == "__main__":
    main()
