"""Time to quantize one weight with each data-free qparams algorithm.

    python benchmarks/bench_quantize_speed.py              # 8192 x 8192 bf16, CUDA if present
    python benchmarks/bench_quantize_speed.py --device cpu --algorithms minmax

Times ``Int4Tensor.from_hp`` (choose qparams + quantize + pack) end to end, after one warm-up
call, synchronising the device around each call; reports the median of ``--repeats``.
Goals (issue 7): ``minmax`` under 1 s on an H100/H200 and under 10 s on a 2-core CPU;
``mse``/``hqq`` under 1 s on the GPU. Appends to
``benchmarks/results/accuracy_quantize_speed.csv``.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int4tensor import Int4Tensor  # noqa: E402

#: (device type, algorithm) -> goal in seconds; None: any algorithm.
GOAL_S = {("cuda", None): 1.0, ("cpu", "minmax"): 10.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(w: torch.Tensor, group_size: int, algorithm: str, domain: str) -> float:
    sync(w.device)
    t0 = time.perf_counter()
    t = Int4Tensor.from_hp(w, (1, group_size), algorithm=algorithm, zero_point_domain=domain)
    sync(w.device)
    del t
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[8192, 8192], metavar=("N", "K"))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--algorithms", nargs="+", default=["minmax", "mse", "hqq"])
    p.add_argument("--zero-point-domain", default="float", choices=["float", "int", "none"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None, help="default: 5 on CUDA, 2 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--csv", default=str(ROOT / "benchmarks/results/accuracy_quantize_speed.csv"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    torch.manual_seed(0)
    w = torch.randn(*args.shape, device=device, dtype=torch.bfloat16)
    rows = []
    print(f"{args.shape[0]}x{args.shape[1]} bf16, G={args.group_size}, "
          f"zero_point_domain={args.zero_point_domain}, on {name}")
    for algorithm in args.algorithms:
        time_one(w, args.group_size, algorithm, args.zero_point_domain)  # warm-up
        times = [time_one(w, args.group_size, algorithm, args.zero_point_domain)
                 for _ in range(repeats)]
        med = statistics.median(times)
        goal = GOAL_S.get((device.type, None), GOAL_S.get((device.type, algorithm)))
        verdict = "" if goal is None else ("  (< %g s goal: %s)" % (goal, "met" if med < goal
                                                                    else "NOT met"))
        print(f"{algorithm:7s} {med:8.3f} s  (min {min(times):.3f}, {repeats} runs){verdict}")
        rows.append({"device": name, "shape": f"{args.shape[0]}x{args.shape[1]}",
                     "group_size": args.group_size, "domain": args.zero_point_domain,
                     "algorithm": algorithm, "median_s": round(med, 4),
                     "min_s": round(min(times), 4), "repeats": repeats})
    out = pathlib.Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
