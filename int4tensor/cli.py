"""The ``int4tensor`` command line: quantize, convert, verify, inspect checkpoints.

Every subcommand prints a clear one-line ``error: ...`` and exits 2 on bad input (missing
files, corrupted shards, configs that contradict the tensors), and never leaves a half-written
DST behind (see :mod:`int4tensor.checkpoint`).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys

import torch

from int4tensor.quant_primitives import SUPPORTED_GROUP_SIZES
from int4tensor.version import __version__

__all__ = ["main", "build_parser"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="int4tensor", description="Int4 weight-only quantization of safetensors checkpoints.",
        formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"int4tensor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a Hugging Face-style checkpoint directory",
                       formatter_class=fmt)
    q.add_argument("src", help="directory with config.json and *.safetensors shards")
    q.add_argument("dst", help="output directory (must not exist or be empty, see --overwrite)")
    q.add_argument("--group-size", type=int, default=128, choices=SUPPORTED_GROUP_SIZES,
                   help="values per quantization group along K")
    q.add_argument("--format", default="native", choices=("native", "compressed-tensors"),
                   help="native: int4tensor safetensors; compressed-tensors: pack-quantized "
                        "W4A16 (vLLM/SGLang)")
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=False,
                   help="zero point 0 (off: asymmetric)")
    q.add_argument("--ignore", nargs="*", default=["lm_head"], metavar="REGEX",
                   help="keep tensors whose name matches any REGEX in high precision; the list "
                        "replaces the default (give --ignore alone to quantize lm_head too)")
    q.add_argument("--device", default=None,
                   help="where to quantize, e.g. cpu, cuda, cuda:1; None: cuda if available, "
                        "else cpu")
    q.add_argument("--expert-k-dim", type=int, default=-1, choices=(-1, -2),
                   help="K of 3D expert weights: -1 for [E, N, K] (Mixtral), -2 for [E, K, N] "
                        "(Llama4, gpt-oss; native format only)")
    _output_flags(q, progress=True)

    c = sub.add_parser("convert", help="import an AWQ / GPTQ / compressed-tensors checkpoint "
                                       "(or an int4tensor 0.1 native one) into int4tensor's "
                                       "native format", formatter_class=fmt)
    c.add_argument("src", help="an AWQ / GPTQ / compressed-tensors (or int4tensor 0.1 native) "
                               "checkpoint directory")
    c.add_argument("dst", help="output directory (must not exist or be empty, see --overwrite)")
    c.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                   help="scale/zero dtype (float32 is exact; bfloat16 runs fbgemm's kernel)")
    _output_flags(c, progress=True)

    v = sub.add_parser("verify", help="compare DST's dequantized weights with SRC's",
                       formatter_class=fmt)
    v.add_argument("src", help="the high-precision checkpoint")
    v.add_argument("dst", help="a quantized checkpoint (any supported format)")
    v.add_argument("--threshold", type=float, default=15.0, metavar="DB",
                   help="fail when a tensor's SQNR is below this many dB")
    v.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                   help="show progress bars on stderr")

    i = sub.add_parser("inspect", help="list a checkpoint's tensors and check their layout",
                       formatter_class=fmt)
    i.add_argument("path", help="checkpoint directory or .safetensors file")
    return parser


def _output_flags(p: argparse.ArgumentParser, progress: bool) -> None:
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a non-empty DST (the old one stays until the new one is "
                        "complete)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=progress,
                   help="show progress bars on stderr")


def _say_removed(report) -> None:
    for path in report.removed_temporaries:
        print(f"removed {path}, left by an interrupted earlier run", file=sys.stderr)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _return_large_frees_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free, so the next temporaries of a
    tensor come from the heap and their memory stays with the process (measured: ~200 MiB more
    resident on a 1 GB shard). A fixed threshold keeps every large buffer mmap-backed and
    returned when freed. Process-wide, hence here, in the command, not in the library."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _quantize(args) -> int:
    from int4tensor.checkpoint import quantize_checkpoint

    _return_large_frees_to_the_os()

    report = quantize_checkpoint(args.src, args.dst, args.group_size, args.format,
                                 args.symmetric, args.ignore, args.device, args.overwrite,
                                 args.progress, args.expert_k_dim)
    _say_removed(report)
    print(f"quantized {len(report.quantized)} tensors, kept {len(report.kept)} in high "
          f"precision; {_fmt_bytes(report.src_bytes)} -> {_fmt_bytes(report.dst_bytes)}")
    for name, reason in report.kept.items():
        if reason not in ("1D", "embedding"):
            print(f"  kept {name}: {reason}")
    print(f"wrote {args.dst}")
    return 0


def _convert(args) -> int:
    from int4tensor.checkpoint import convert_checkpoint

    _return_large_frees_to_the_os()

    report = convert_checkpoint(args.src, args.dst, _DTYPES[args.dtype], args.overwrite,
                                args.progress)
    _say_removed(report)
    print(f"imported {len(report.quantized)} quantized tensors, {len(report.kept)} others; "
          f"wrote {args.dst}")
    return 0


def _verify(args) -> int:
    from int4tensor.checkpoint import verify_checkpoint

    rows, summary = verify_checkpoint(args.src, args.dst, args.threshold, args.progress)
    table = [[r.name, "x".join(map(str, r.shape)), f"{r.sqnr_db:.2f}",
              f"{r.max_abs_err:.3g}", "ok" if r.ok else f"FAIL {r.note}".rstrip()]
             for r in rows]
    print(_table(["tensor", "shape", "SQNR dB", "max abs err", "status"], table))
    print(f"\n{summary['quantized']} quantized tensors, min SQNR "
          f"{summary['min_sqnr_db']:.2f} dB (threshold {args.threshold:g} dB); "
          f"{summary['kept_identical']} kept tensors identical; {summary['failed']} failed")
    if summary["quantized"] == 0:
        print(f"FAIL: {args.dst} holds no quantized tensor to verify (is it the quantized "
              "checkpoint?)")
        return 1
    return 1 if summary["failed"] or math.isnan(summary["min_sqnr_db"]) else 0


def _inspect(args) -> int:
    from int4tensor.checkpoint import inspect_checkpoint

    rows, summary = inspect_checkpoint(args.path)
    table = [[r.name, r.format, "x".join(map(str, r.shape)), r.dtype,
              "" if r.group_size is None else r.group_size, _fmt_bytes(r.nbytes), r.check]
             for r in rows]
    print(_table(["tensor", "format", "shape", "dtype", "group", "bytes", "check"], table))
    print(f"\n{summary['path']}: quant_method {summary['quant_method']}, {summary['files']} "
          f"file(s), {summary['tensors']} tensors ({summary['quantized']} quantized), "
          f"{_fmt_bytes(summary['bytes'])}, {summary['problems']} problem(s)")
    return 1 if summary["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"quantize": _quantize, "convert": _convert, "verify": _verify,
               "inspect": _inspect}[args.command]
    try:
        return command(args)
    except BrokenPipeError:  # `int4tensor inspect ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # an unfinished DST's temporary directory is already removed
        print("error: interrupted (DST was not written)" if args.command in
              ("quantize", "convert") else "error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError) as e:  # OSError: FileNotFoundError, ...
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
