"""Where the host time of transformers ``generate()`` goes with int4 weights (a diagnosis).

    python -m scripts.profile_generate [--layers 2] [--mode int4|int4-prepared|bf16]
        [--cache dynamic|static] [--torch-profiler]

Builds the Llama-3-8B-shaped model of benchmarks/bench_generate.py with few layers, runs
warm-up generates (compiling the static-cache step), then profiles the Python of one more
``generate(24 new tokens)`` with cProfile and prints the functions with the most own time;
with ``--torch-profiler`` it records the same call with torch.profiler (CPU and CUDA
activities) instead and prints the ops and runtime calls (``cudaLaunchKernel``,
``cuLaunchKernel``, allocations, synchronizations) by their own CPU time, which cProfile does
not see. Run it with ``TORCH_LOGS=graph_breaks,recompiles,cudagraphs``
to see graph breaks, recompiles and CUDA-graph skips too.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from benchmarks.bench_generate import build_model, generate, quantize_model  # noqa: E402
from int4tensor import prepare_for_compile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mode", default="int4-prepared")
    parser.add_argument("--cache", default="static")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--torch-profiler", action="store_true")
    args = parser.parse_args()
    model = build_model(args.layers)
    if args.mode != "bf16":
        quantize_model(model)
    if args.mode.endswith("prepared"):
        prepare_for_compile(model)
    for _ in range(3):  # the longest run first sizes the static cache; compile, record graphs
        generate(model, 1, 24, args.cache)
    torch.cuda.synchronize()
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(model, 1, 24, args.cache)
            torch.cuda.synchronize()
        print(f"== {args.mode} {args.cache} cache, 24 new tokens (torch.profiler)", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        return
    profiler = cProfile.Profile()
    profiler.enable()
    generate(model, 1, 24, args.cache)
    torch.cuda.synchronize()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    print(f"== {args.mode} {args.cache} cache, 24 new tokens: {stats.total_tt * 1e3:.1f} ms of "
          "Python (under cProfile)", flush=True)
    stats.sort_stats("tottime").print_stats(args.top)
    print("\n".join(stream.getvalue().splitlines()[:args.top + 12]))


if __name__ == "__main__":
    main()
