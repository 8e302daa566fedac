"""Timing helpers shared by the benchmarks (GPU only)."""

from __future__ import annotations

import torch


def copy_bandwidth_gbs(nbytes: int = 2 * 1024**3) -> float:
    """Device-to-device copy bandwidth (bytes read + written), GB/s, measured now."""
    import triton.testing

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e9


def graph_time_us(fns, iters: int = 20) -> float:
    """Median µs per call of ``fns`` (one zero-arg callable per weight copy), replayed inside a
    CUDA graph: no launch overhead, and rotating copies make every call read HBM, not L2."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    times.sort()
    return times[len(times) // 2]


def do_bench_us(fn) -> float:
    """Median µs of ``fn`` with L2 flushed between runs (large-M calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def write_csv(path: str, comment: str, rows: list[dict]) -> None:
    """``rows`` as CSV under a ``# comment`` line (device, date, versions)."""
    import csv

    with open(path, "w", newline="") as f:
        f.write(f"# {comment}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm())
