"""Markdown tables (one per shape) from benchmarks/results/bench_linear.csv, for docs/performance.md.

    python benchmarks/make_tables.py [path/to/bench_linear.csv]
"""

from __future__ import annotations

import csv
import sys

#: the paths a user picks between (the CSV also has the kernels called directly: our CUDA GEMV
#: and Triton kernels, fbgemm's shuffled kernel)
PATHS = ["bf16", "int4 (dispatch)", "int4 preshuffled", "int4 plain, fp8 activations",
         "int4 preshuffled, fp8 activations", "fbgemm rowwise", "tinygemm",
         "fbgemm f8i4 shuffled (+x fp8)"]


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
    main(*sys.argv[1:])
