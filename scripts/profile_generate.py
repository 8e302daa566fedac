"""Where the host time of transformers ``generate()`` goes with int4 weights (a diagnosis).

    python -m scripts.profile_generate [--layers 2] [--model llama3-8b|mixtral-8x7b|qwen3-30b-a3b]
        [--mode bf16|int4|int4-prepared|preshuffled|preshuffled-prepared]
        [--cache dynamic|static] [--torch-profiler] [--explain] [--preshuffle-experts]

Builds the model of benchmarks/bench_generate.py (Llama-3-8B- or Qwen3-30B-A3B-shaped) with
few layers (``--explain`` first prints the backend each int4 weight runs for a decode token), runs
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
from int4tensor import (  # noqa: E402
    Int4Tensor, convert_model_to_packed_tensors_, convert_to_packed_tensor_based_on_current_hardware,
    explain, prepare_for_compile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--model", default="llama3-8b",
                        choices=["llama3-8b", "mixtral-8x7b", "qwen3-30b-a3b"])
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--preshuffle-experts", action="store_true",
                        help="also convert 3D expert stacks (convert_model_to_packed_tensors_ "
                             "keeps them plain: their generate() was 12x slower, see "
                             "docs/performance.md)")
    parser.add_argument("--mode", default="int4-prepared")
    parser.add_argument("--cache", default="static")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="self_cpu_time_total",
                        choices=["self_cpu_time_total", "self_cuda_time_total"],
                        help="torch.profiler table order (self_cuda_time_total: the kernels)")
    parser.add_argument("--torch-profiler", action="store_true")
    args = parser.parse_args()
    model = build_model(args.layers, args.model)
    if args.mode != "bf16":
        quantize_model(model)
    if args.mode.startswith("preshuffled"):
        convert_model_to_packed_tensors_(model)
        if args.preshuffle_experts:
            for module in model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if isinstance(p, Int4Tensor) and p.qdata.ndim == 3:
                        setattr(module, name, torch.nn.Parameter(
                            convert_to_packed_tensor_based_on_current_hardware(p),
                            requires_grad=False))
    if args.explain:
        token = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
        for entry in explain(model, token):
            print(entry.name, entry.op, entry.x_shape, entry.backend, dict(entry.refused))
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
        print(prof.key_averages().table(sort_by=args.sort, row_limit=args.top))
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
