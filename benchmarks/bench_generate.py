"""transformers ``generate()`` itself: bf16 vs int4 (plain, preshuffled), in one run.

    python benchmarks/bench_generate.py [--layers 32] [--batch 1 8] [--cache dynamic static]
        [--modes bf16 int4 int4-prepared preshuffled-prepared] [--user-compile] [--out DIR]

The model is a ``LlamaForCausalLM`` built from a Llama-3-8B-shaped ``LlamaConfig`` with random
weights (nothing is downloaded; ``--layers`` shortens it). Per-token time is
``(t(N new tokens) - t(8 new tokens)) / (N - 8)`` (median of 3 runs after a warm-up that also
compiles), so prefill and compilation cancel out. Each (mode, cache, batch) runs in a fresh
process, its wall time measured before the profiler runs. ``cache dynamic`` is transformers' default
DynamicCache in eager mode; ``cache static`` is ``cache_implementation="static"``, for which
transformers compiles the decode step itself (``mode="reduce-overhead"``, CUDA graphs);
``--user-compile`` adds ``model.forward = torch.compile(model.forward, mode="reduce-overhead",
fullgraph=True)`` with a StaticCache allocated before the first call (``user_compile_cache``). ``--ab`` times each int4 mode against bf16 in one
process, their runs interleaved, for host-bound cases (the dynamic cache) where the host's
speed differs between processes. The GPU time per token comes from the profiler (the
sum of the device time of a decode's kernels); when the wall time per token is larger, the
rest is the host's.

Modes: ``bf16``; ``int4``: ``quantize_(model, Int4WeightOnlyConfig(group_size=128))`` on every
``nn.Linear``; ``int4-prepared``: the same after ``int4tensor.prepare_for_compile(model)``;
``preshuffled`` / ``preshuffled-prepared``: after ``convert_model_to_packed_tensors_``.
MoE models: ``quantize_`` keeps int4 expert stacks on transformers' grouped experts forward
while decoding; bf16 decodes with ``batched_mm`` (transformers' own switch on a GPU).
``--experts grouped_mm`` sets the int4 model back to plain ``grouped_mm``, so transformers
switches it to ``batched_mm`` for decoding too (what the package did before);
``--bf16-experts grouped`` keeps bf16 on the grouped forward while decoding as well (the
stronger bf16 baseline at batch 8, not what transformers does by default). The CSV's
``experts`` column says what each row decoded with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_csv  # noqa: E402
from int4tensor import (  # noqa: E402
    Int4WeightOnlyConfig, convert_model_to_packed_tensors_, prepare_for_compile, quantize_)

PROMPT = 128


def build_model(layers: int, model: str = "llama3-8b"):
    """``llama3-8b``: a Llama-3-8B-shaped LlamaForCausalLM; ``mixtral-8x7b``: a
    Mixtral-8x7B-shaped MixtralForCausalLM (8 experts of 14336, top 2); ``qwen3-30b-a3b``: a
    Qwen3-30B-A3B-shaped Qwen3MoeForCausalLM (128 experts of 768, top 8); the MoE models run
    transformers' default ``grouped_mm`` experts; random weights, ``layers`` decoder layers."""
    import transformers

    if model == "llama3-8b":
        cls = transformers.LlamaForCausalLM
        config = transformers.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
            max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    elif model == "mixtral-8x7b":
        cls = transformers.MixtralForCausalLM
        config = transformers.MixtralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336,
            num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
            rope_theta=1e6, tie_word_embeddings=False)
    else:
        cls = transformers.Qwen3MoeForCausalLM
        config = transformers.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144,
            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            built = cls(config)
    finally:
        torch.set_default_dtype(default)
    return built.eval()


def quantize_model(model) -> None:
    """Every nn.Linear (lm_head included) and every MoE expert stack, G = 128."""
    config = Int4WeightOnlyConfig(group_size=128)
    quantize_(model, config)
    if any("experts.gate_up_proj" in name for name, _ in model.named_parameters()):
        quantize_(model, {"re:.*experts\\.(gate_up_proj|down_proj)": config})


def generate(model, batch: int, new_tokens: int, cache: str):
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    if cache == "user-compile":
        kwargs["disable_compile"] = True
        kwargs["past_key_values"] = user_compile_cache(model, batch)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


def user_compile_cache(model, batch: int, max_len: int = PROMPT + 512):
    """A StaticCache allocated before the user-compiled forward first runs, reset for each
    generate(). With ``cache_implementation="static"`` the cache is allocated lazily inside
    the first (compiled, CUDA-graphed) forward, and the next replay fails for bf16 as for int4
    ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run",
    H200, torch 2.11, transformers 5.17); transformers' own compile runs the prefill eagerly."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_bench_static_caches", {})
    if batch not in caches:
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        num_heads, head_dim = model._get_static_cache_init_shape()
        cache.early_initialization(batch_size=batch, num_heads=num_heads, head_dim=head_dim,
                                   dtype=model.dtype, device=model.device)
        caches[batch] = cache
    caches[batch].reset()
    return caches[batch]


def wall_s(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def gpu_s(fn) -> float:
    """Sum of the device time of the kernels ``fn`` launches (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) * 1e-6


def compile_counts() -> dict:
    """Dynamo's and inductor's counters so far in this process: graphs compiled (a recompile,
    when a guard fails, is one more), graph breaks, and graphs inductor did not CUDA-graph."""
    from torch._dynamo.utils import counters

    return dict(graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()),
                cudagraph_skips=counters["inductor"]["cudagraph_skips"])


def count_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def warm_up(model, batch: int, cache: str, n: int) -> dict:
    """The longest run first sizes the static cache for all later calls (transformers keeps
    the largest), then compiles and records the CUDA graphs; returns what it compiled."""
    before = compile_counts()
    for tokens in (n, 8, n):
        generate(model, batch, tokens, cache)
    return count_delta(before, compile_counts())


def per_token(model, batch: int, cache: str, n: int, profile_gpu: bool) -> tuple[float, float]:
    """(wall ms, GPU ms) per decode step, and the compile counters of the warm-up and of the
    timed runs (which should compile nothing); the wall time is measured before any profiling."""
    warm = warm_up(model, batch, cache, n)
    before = compile_counts()
    short = sorted(wall_s(lambda: generate(model, batch, 8, cache)) for _ in range(3))[1]
    long = sorted(wall_s(lambda: generate(model, batch, n, cache)) for _ in range(3))[1]
    timed = count_delta(before, compile_counts())
    wall = (long - short) / (n - 8) * 1e3
    gpu = float("nan")
    if profile_gpu:
        gpu = (gpu_s(lambda: generate(model, batch, n, cache))
               - gpu_s(lambda: generate(model, batch, 8, cache))) / (n - 8) * 1e3
    return wall, gpu, compile_columns(warm, timed)


def compile_columns(warm: dict, timed: dict) -> dict:
    """The CSV's compile columns: graphs compiled in the warm-up (int4 should need as many as
    bf16: more would be recompiles), graph breaks, CUDA-graph skips, and graphs compiled while
    timing (0 when the decode step is stable)."""
    return dict(warm_graphs=warm["graphs"],
                graph_breaks=warm["graph_breaks"] + timed["graph_breaks"],
                cudagraph_skips=warm["cudagraph_skips"] + timed["cudagraph_skips"],
                timed_graphs=timed["graphs"])


def prepared_model(args, mode: str, cache: str):
    """The model of ``mode`` (seeded: the same weights for every mode), ready for ``cache``."""
    model = build_model(args.layers, args.model)
    if mode != "bf16":
        quantize_model(model)
    if mode != "bf16" and args.experts != "default":
        model.set_experts_implementation(args.experts)
    if mode == "bf16" and args.bf16_experts == "grouped" and decode_experts(model):
        from int4tensor.integrations.transformers import EXPERTS_IMPLEMENTATION

        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)  # grouped, no decode switch
    if mode.startswith("preshuffled"):
        convert_model_to_packed_tensors_(model)
    if mode.endswith("prepared"):
        prepare_for_compile(model)
    if cache == "user-compile":  # transformers' own compile is disabled for it
        model.forward = torch.compile(type(model).forward.__get__(model),
                                      mode="reduce-overhead", fullgraph=True)
    return model


def measure_one(args, mode: str, cache: str, batch: int) -> tuple[float, float, dict, str]:
    """One (mode, cache, batch) in this process: build, quantize, time, profile; the compile
    counters and the experts implementation it decoded with."""
    model = prepared_model(args, mode, cache)
    return (*per_token(model, batch, cache, args.tokens, not args.no_profile),
            decode_experts(model))


def measure_ab(args, mode: str, cache: str, batch: int) -> tuple[float, float]:
    """bf16 and ``mode`` in one process, their timed runs interleaved (bf16, mode, bf16, ...):
    the host's speed, which differs between processes on a shared machine, changes both alike.
    Returns (bf16 ms, mode ms) per token and each one's experts implementation; no profiling."""
    models = {"bf16": prepared_model(args, "bf16", cache), mode: prepared_model(args, mode, cache)}
    n = args.tokens
    warm = {name: warm_up(model, batch, cache, n) for name, model in models.items()}
    before = compile_counts()
    times = {name: {8: [], n: []} for name in models}
    for _ in range(5):
        for tokens in (8, n):
            for name, model in models.items():
                times[name][tokens].append(wall_s(lambda: generate(model, batch, tokens, cache)))
    med = {name: {t: sorted(v)[len(v) // 2] for t, v in ts.items()} for name, ts in times.items()}
    per = {name: (m[n] - m[8]) / (n - 8) * 1e3 for name, m in med.items()}
    timed = count_delta(before, compile_counts())  # both models': 0 when neither recompiles
    return (per["bf16"], per[mode], {name: decode_experts(m) for name, m in models.items()},
            {name: compile_columns(w, timed) for name, w in warm.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--model", default="llama3-8b",
                        choices=["llama3-8b", "mixtral-8x7b", "qwen3-30b-a3b"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cache", nargs="+", default=["dynamic", "static"],
                        choices=["dynamic", "static", "user-compile"])
    parser.add_argument("--modes", nargs="+",
                        default=["bf16", "int4", "int4-prepared", "preshuffled-prepared"])
    parser.add_argument("--user-compile", action="store_true")
    parser.add_argument("--experts", default="default", choices=["default", "grouped_mm"],
                        help="MoE: the int4 model's experts implementation (default: ours)")
    parser.add_argument("--bf16-experts", default="default", choices=["default", "grouped"],
                        help="MoE: bf16 decodes with batched_mm (default) or grouped_mm")
    parser.add_argument("--tokens", type=int, default=72)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="bench_generate", help="CSV file name, no suffix")
    parser.add_argument("--one", nargs=3, metavar=("MODE", "CACHE", "BATCH"),
                        help=argparse.SUPPRESS)  # a child process's single measurement
    parser.add_argument("--ab", action="store_true",
                        help="each int4 mode against bf16 in one process, timed runs "
                             "interleaved (no GPU profile); rows say same_process")
    args = parser.parse_args()
    if args.ab:
        return _main_ab(args)
    if args.one:
        mode, cache, batch = args.one
        wall, gpu, counts, experts = measure_one(args, mode, cache, int(batch))
        print("RESULT " + json.dumps({"wall": wall, "gpu": gpu, "experts": experts,
                                      "counts": counts}), flush=True)
        return
    caches = list(dict.fromkeys(list(args.cache) + (["user-compile"] if args.user_compile else [])))
    rows, bf16 = [], {}
    for mode in args.modes:
        for cache in caches:
            if mode.endswith("prepared") and cache == "dynamic":
                continue  # eager: nothing to prepare for
            for batch in args.batch:
                # A fresh process per measurement: nothing compiled, cached or profiled before
                # (a profiler pass or an earlier model in the same process could change the
                # host cost of what is timed after it).
                wall, gpu, counts, experts = _child(args, mode, cache, batch)
                key = (cache, batch)
                if mode == "bf16":
                    bf16[key] = wall
                speedup = bf16[key] / wall if key in bf16 else float("nan")
                rows.append(dict(mode=mode, cache=cache, batch=batch, experts=experts,
                                 ms_per_token=round(wall, 3),
                                 gpu_ms_per_token=round(gpu, 3),
                                 tokens_per_s=round(batch * 1e3 / wall, 1),
                                 speedup_vs_bf16=round(speedup, 3), **counts))
                print(f"{mode:22s} {cache:12s} batch {batch:3d}: {wall:7.2f} ms/token "
                      f"(GPU {gpu:6.2f} ms) {batch * 1e3 / wall:8.1f} tok/s  "
                      f"{speedup:5.2f}x bf16", flush=True)
                _write(args, rows)  # after each row: a run cut by a time limit keeps its rows


def _main_ab(args) -> None:
    caches = list(dict.fromkeys(list(args.cache) + (["user-compile"] if args.user_compile else [])))
    rows = []
    for mode in [m for m in args.modes if m != "bf16"]:
        for cache in caches:
            if mode.endswith("prepared") and cache == "dynamic":
                continue
            for batch in args.batch:
                bf16, wall, experts, counts = measure_ab(args, mode, cache, batch)
                for name, ms in (("bf16", bf16), (mode, wall)):
                    rows.append(dict(mode=name, cache=cache, batch=batch,
                                     experts=experts[name], ms_per_token=round(ms, 3),
                                     gpu_ms_per_token=float("nan"),
                                     tokens_per_s=round(batch * 1e3 / ms, 1),
                                     speedup_vs_bf16=round(bf16 / ms, 3), same_process=True,
                                     **counts[name]))
                print(f"{mode:22s} {cache:12s} batch {batch:3d}: {wall:7.2f} ms/token against "
                      f"bf16 {bf16:7.2f} in the same process: {bf16 / wall:5.2f}x", flush=True)
                _write(args, rows)
                torch.cuda.empty_cache()


def decode_experts(model) -> str:
    """The experts implementation ``model`` decodes with on a GPU ("" without experts)."""
    if not any(name.endswith(".experts") for name, _ in model.named_modules()):
        return ""
    with model._optimize_model_for_decode():  # transformers' switch, as generate() applies it
        return model.config._experts_implementation


def _child(args, mode: str, cache: str, batch: int) -> tuple[float, float, dict, str]:
    command = [sys.executable, os.path.abspath(__file__), "--layers", str(args.layers),
               "--model", args.model, "--tokens", str(args.tokens), "--experts", args.experts,
               "--bf16-experts", args.bf16_experts,
               "--one", mode, cache, str(batch), "--name", args.name] + (["--no-profile"] if args.no_profile else [])
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            return result["wall"], result["gpu"], result["counts"], result["experts"]
    raise RuntimeError(f"{mode} {cache} batch {batch} failed (exit {done.returncode}):\n"
                       f"{done.stderr[-4000:]}")


def _write(args, rows: list[dict]) -> None:
    import transformers

    os.makedirs(args.out, exist_ok=True)
    comment = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
               f"{transformers.__version__}, {args.model} shape with {args.layers} layers, "
               f"prompt {PROMPT}, {args.tokens} new tokens, {datetime.date.today()}")
    write_csv(os.path.join(args.out, args.name + ".csv"), comment, rows)


if __name__ == "__main__":
    main()
