"""Markdown tables (one per shape) from benchmarks/results/bench_linear.csv, for docs/performance.md.

    python benchmarks/make_tables.py [path/to/bench_linear.csv] [--plot out.png]

``--plot`` redraws the speedup plot from the CSV (needs matplotlib).
"""

from __future__ import annotations

import csv
import sys

#: the paths a user picks between (the CSV also has the kernels called directly: our CUDA GEMV
#: and Triton kernels, fbgemm's shuffled kernel)
PATHS = ["bf16", "int4 (dispatch)", "int4 preshuffled", "int4 plain, fp8 activations",
         "int4 preshuffled, fp8 activations", "fbgemm rowwise", "tinygemm",
         "fbgemm f8i4 shuffled (+x fp8)"]


def plot(rows, path):
    """Speedup vs bf16 against M, one panel per shape, for PATHS but bf16 (rows as written to the
    CSV; strings are fine)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shapes = list(dict.fromkeys((int(r["N"]), int(r["K"])) for r in rows))
    fig, axes = plt.subplots(2, -(-len(shapes) // 2), figsize=(5 * -(-len(shapes) // 2), 8),
                             squeeze=False)
    for ax, (n, k) in zip(axes.flat, shapes):
        for i, name in enumerate(PATHS[1:]):
            pts = [(int(r["M"]), float(r["speedup"])) for r in rows
                   if (int(r["N"]), int(r["K"])) == (n, k) and r["path"] == name]
            if pts:
                ax.plot(*zip(*pts), marker="osD^vx+"[i % 7], color=f"C{i}", label=name)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8, label="bf16")
        ax.set_title(f"N={n} K={k}")
        ax.set_xlabel("M (activation rows)")
        ax.set_ylabel("speedup vs bf16")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(path: str = "benchmarks/results/bench_linear.csv") -> None:
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    for n, k in shapes:
        print(f"**N={n}, K={k}** (µs; speedup vs bf16; for M ≤ 16 also % of copy bandwidth)\n")
        print("| M | " + " | ".join(PATHS) + " |")
        print("|---" * (len(PATHS) + 1) + "|")
        for m in dict.fromkeys(r["M"] for r in rows if (r["N"], r["K"]) == (n, k)):
            cells = []
            for p in PATHS:
                hit = [r for r in rows if (r["N"], r["K"], r["M"], r["path"]) == (n, k, m, p)]
                if not hit:
                    cells.append("—")
                    continue
                r = hit[0]
                extra = f", {float(r['pct_copy']):.1f}%" if int(m) <= 16 else ""
                cells.append(f"{float(r['us']):.1f} ({float(r['speedup']):.2f}x{extra})")
            print(f"| {m} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--plot" in args:
        i = args.index("--plot")
        png, args = args[i + 1], args[:i] + args[i + 2:]
        with open(args[0] if args else "benchmarks/results/bench_linear.csv") as f:
            plot(list(csv.DictReader(line for line in f if not line.startswith("#"))), png)
    else:
        main(*args)
