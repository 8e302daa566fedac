"""Peak memory of ``int4tensor quantize`` on one large shard (the figure in docs/cli.md).

Writes a synthetic one-shard checkpoint (bf16 linear weights of a 7B-class layer's shapes plus
an embedding that stays dense), quantizes it on the CPU in a fresh process (once through the
command, ``int4tensor.cli.main``, once through ``quantize_checkpoint``), and samples that
process's ``/proc/self/status`` every 2 ms: ``RssAnon`` (heap: what the bound is about) and
``RssFile`` (pages of the memory-mapped source shard, which the kernel can drop at will).

    python -m scripts.measure_quantize_memory [--mib 938] [--dir /tmp/qmem]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, sys, threading, time
    from int4tensor.checkpoint import quantize_checkpoint

    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = False

    def sample():
        while not done:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    base = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in peaks:
                base[key] = int(value.split()[0]) * 1024
    thread.start()
    if sys.argv[3] == "cli":  # what `int4tensor quantize SRC DST` runs
        from int4tensor.cli import main
        assert main(["quantize", sys.argv[1], sys.argv[2], "--device", "cpu",
                     "--no-progress"]) == 0
    else:  # the library call, as from Python
        quantize_checkpoint(sys.argv[1], sys.argv[2], device="cpu", progress=False)
    done = True
    thread.join()
    print({"peaks": peaks, "baseline": base})
""")


def make_checkpoint(directory: str, mib: int) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(8192, 4096, dtype=torch.bfloat16)}
    i = 0
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    while sum(t.numel() * 2 for t in tensors.values()) < mib * 2**20:
        n, k = shapes[i % len(shapes)]
        weight = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        tensors[f"model.layers.{i // 3}.p{i % 3}.weight"] = weight
        i += 1
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=938, help="size of the source shard")
    parser.add_argument("--dir", default="/tmp/int4tensor_qmem")
    args = parser.parse_args()
    src, dst = os.path.join(args.dir, "src"), os.path.join(args.dir, "dst")
    shutil.rmtree(args.dir, ignore_errors=True)
    make_checkpoint(src, args.mib)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mib = lambda n: n / 2**20  # noqa: E731
    results = {}
    for how in ("cli", "library"):
        shutil.rmtree(dst, ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", CHILD, src, dst, how], capture_output=True,
                             text=True, cwd=repo, check=True)
        results[how] = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307  (our child's)
    shard = os.path.getsize(os.path.join(src, "model.safetensors"))
    out_shard = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)
                    if f.endswith(".safetensors"))
    from safetensors import safe_open

    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        largest = max(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 2
                      for k in f.keys())
    print(f"largest tensor {mib(largest):.0f} MiB (bf16; quantizing it works in float32)")
    print(f"source shard {mib(shard):.0f} MiB -> output shard {mib(out_shard):.0f} MiB")
    for how, result in results.items():
        print(f"{how}:")
        for key in ("VmRSS", "RssAnon", "RssFile"):
            peak, base = result["peaks"][key], result["baseline"][key]
            print(f"  peak {key:8s} {mib(peak):7.0f} MiB  (at start {mib(base):5.0f} MiB, "
                  f"growth {mib(peak - base):7.0f} MiB)")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
