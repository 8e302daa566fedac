"""Peak memory and wall time of transformers' ``from_pretrained`` with quantization on load.

Builds a Llama-3-8B-shaped checkpoint (``LlamaConfig``, random bf16 weights, safetensors shards
with an index; no download) in a temporary directory, then loads it in a fresh subprocess per
mode:

* ``bf16``: ``from_pretrained(path, dtype=torch.bfloat16)``;
* ``int4``: the same with ``quantization_config=Int4TensorConfig(Int4WeightOnlyConfig(G))``;
* ``int4-prequantized``: ``from_pretrained`` of the ``save_pretrained`` output of ``int4``.

On CUDA (``device_map="cuda"``) it reports ``torch.cuda.max_memory_allocated`` over the load and
the memory held afterwards; with ``--device cpu`` the peak and final RSS of the loading process
over the load (which count the memory-mapped checkpoint pages it touched). Prints a table and writes a CSV.

    python benchmarks/bench_quantize_on_load.py --out results/quantize_on_load.csv
    python benchmarks/bench_quantize_on_load.py --device cpu --layers 2 --tiny --out /tmp/q.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=False)
GiB, MiB = 1024 ** 3, 1024 ** 2


def build_checkpoint(path: str, layers: int, tiny: bool, device: str,
                     shard_bytes: int = 4 * GiB) -> int:
    """Write a random bf16 Llama checkpoint to ``path``; returns its size in bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), num_hidden_layers=layers,
                         dtype="bfloat16")
    with torch.device("meta"):
        names = {k: (tuple(v.shape)) for k, v in LlamaForCausalLM(config).state_dict().items()}
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    gen_device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            shards.append(dict(current))
            name = f"model-{len(shards):05d}.safetensors"
            save_file(current, os.path.join(path, name), metadata={"format": "pt"})
            current, size = {}, 0

    for key, shape in names.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, device=gen_device, dtype=torch.bfloat16) * 0.02).cpu()
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        current[key] = t
        size += nbytes
        total += nbytes
    flush()
    # final names model-0000i-of-0000n, as transformers writes them
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        old = os.path.join(path, f"model-{i:05d}.safetensors")
        new = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(old, os.path.join(path, new))
        weight_map.update(dict.fromkeys(shard, new))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _proc_status(field: str) -> int:
    """Bytes of ``field`` (VmRSS, VmHWM) in /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs); returns it.
    (``ru_maxrss`` cannot be used: it survives exec, so it holds the parent's peak.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM may include the import phase's peak
    return _proc_status("VmRSS")


def _child(mode: str, path: str, device: str, group_size: int, save_to: str | None) -> dict:
    """Runs in a fresh process: one load, its time and memory."""
    from transformers import AutoModelForCausalLM

    import int4tensor  # noqa: F401  (registers the transformers quantizer)
    from int4tensor import Int4WeightOnlyConfig
    from int4tensor.integrations.transformers import Int4TensorConfig

    kwargs = {"dtype": torch.bfloat16}
    if device == "cuda":
        kwargs["device_map"] = "cuda"
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    if mode == "int4":
        kwargs["quantization_config"] = Int4TensorConfig(Int4WeightOnlyConfig(group_size))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        held = torch.cuda.memory_allocated() - base
    else:
        peak = _proc_status("VmHWM") - base
        held = _proc_status("VmRSS") - base
    result = {"mode": mode, "seconds": seconds, "peak_bytes": peak, "held_bytes": held,
              "footprint_bytes": model.get_memory_footprint()}
    if save_to:
        model.save_pretrained(save_to)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (8B: 32)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (for a CPU smoke run)")
    parser.add_argument("--workdir", default=None, help="where to build the checkpoint "
                                                        "(default: a temporary directory)")
    parser.add_argument("--modes", default="bf16,int4,int4-prequantized")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        print("RESULT " + json.dumps(_child(args._child, args._path, args.device,
                                            args.group_size, args._save)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu)")

    root = args.workdir or tempfile.mkdtemp(prefix="bench_qol_")
    src, quantized = os.path.join(root, "bf16"), os.path.join(root, "int4")
    try:
        start = time.perf_counter()
        size = build_checkpoint(src, args.layers, args.tiny, args.device)
        print(f"built {src}: {size / GiB:.2f} GiB of bf16 weights, {args.layers} layers, "
              f"{time.perf_counter() - start:.0f} s")
        rows = []
        for mode in args.modes.split(","):
            path = quantized if mode == "int4-prequantized" else src
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, "--_path", path,
                   "--device", args.device, "--group-size", str(args.group_size), "--out", "-"]
            if mode == "int4" and "int4-prequantized" in args.modes:
                cmd += ["--_save", quantized]
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [repo, *filter(None, [os.environ.get("PYTHONPATH")])])}  # this checkout's package
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                raise SystemExit(f"{mode}: the loading process failed (rc {proc.returncode})")
            rows.append(json.loads(line[len("RESULT "):]))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    peak_name = "peak CUDA alloc" if args.device == "cuda" else "peak RSS"
    header = ["mode", "load s", f"{peak_name} MiB", "held MiB", "footprint MiB"]
    table = [[r['mode'], f"{r['seconds']:.1f}", f"{r['peak_bytes'] / MiB:.0f}",
              f"{r['held_bytes'] / MiB:.0f}", f"{r['footprint_bytes'] / MiB:.0f}"]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    for row in [header, ["-" * w for w in widths], *table]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "layers", "group_size", "mode",
                                               "seconds", "peak_bytes", "held_bytes",
                                               "footprint_bytes"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": args.device, "layers": args.layers,
                             "group_size": args.group_size, **r})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
