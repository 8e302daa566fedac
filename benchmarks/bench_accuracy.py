"""Accuracy of each int4 quantization algorithm on the committed tiny byte-level LM.

    python benchmarks/bench_accuracy.py                 # G = 32, 64, 128; all methods
    python benchmarks/bench_accuracy.py --group-sizes 128 --methods minmax gptq

Model: ``models/tiny_bytelm`` (3.4M parameters, 4 blocks, d_model 256, trained on Python's
standard-library sources; see its ``train.py``). Every Linear inside the blocks is quantized
(16 layers, K = 256 or 1024); the embeddings and ``lm_head`` stay in bf16.

Reported per (method, G):
* ``ppl``: per-byte perplexity on held-out stdlib files (``stdlib_corpus("val")``),
  ``--eval-windows`` windows of 256 bytes;
* ``d_ppl``: ``ppl - ppl(bf16)``, and ``d_ppl / d_ppl(minmax)`` at the same G;
* ``kl``: mean per-byte ``KL(p_bf16 || p_int4)`` of the next-byte distributions on the same
  text, in millinats. Unlike ``d_ppl`` it has no first-order term (the bf16 model is not at a
  minimum of the held-out loss, so a small weight perturbation can move ppl either way), so it
  ranks methods more reliably when the ppl differences are tiny;
* per-layer SQNR (dB) of each layer's output ``x @ W_q.T`` against ``x @ W.T``, with ``x`` the
  bf16 model's inputs to that layer on held-out text (table: mean over layers; CSV: each layer).

Calibration (AWQ, GPTQ): ``--calib-windows`` windows of the training split (never the held-out
text). Writes ``benchmarks/results/accuracy.{md,csv}`` and ``accuracy_layers.csv``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int4tensor import Int4WeightOnlyConfig, quantize_  # noqa: E402
from int4tensor.calibration import awq_quantize_  # noqa: E402
from int4tensor.calibration import gptq_quantize_  # noqa: E402

#: "awq+mse"/"gptq+mse": the calibration method with the "mse" clip search for each group.
METHODS = ("minmax", "mse", "hqq", "awq", "awq+mse", "gptq", "gptq-act", "gptq+mse")
RESULTS = ROOT / "benchmarks" / "results"


def load_bytelm():
    """The ``models/tiny_bytelm/model.py`` module (not a package, so load it by path)."""
    spec = importlib.util.spec_from_file_location(
        "tiny_bytelm", ROOT / "models" / "tiny_bytelm" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def quantized_model(bytelm, method: str, group_size: int, calib: list, device, domain: str):
    model = bytelm.load_model(torch.bfloat16, device)
    if method == "bf16":
        return model
    filt = bytelm.is_block_linear
    if method in ("minmax", "mse", "hqq"):
        quantize_(model, Int4WeightOnlyConfig(group_size=group_size,
                                              int4_choose_qparams_algorithm=method,
                                              zero_point_domain=domain), filt)
        return model
    base, _, inner = method.partition("+")
    config = Int4WeightOnlyConfig(group_size=group_size, zero_point_domain=domain,
                                  int4_choose_qparams_algorithm=inner or "minmax")
    if base == "awq":
        return awq_quantize_(model, calib, config, filter_fn=filt, progress_bar=False)
    if base in ("gptq", "gptq-act"):
        return gptq_quantize_(model, calib, config, act_order=base == "gptq-act",
                              filter_fn=filt, progress_bar=False)
    raise ValueError(f"unknown method {method!r}; choose from bf16, {', '.join(METHODS)}")


@torch.no_grad()
def layer_inputs(model, tokens: torch.Tensor, filt) -> dict[str, torch.Tensor]:
    """``fqn -> [rows, K]`` bf16 inputs of each selected Linear on ``tokens [B, T]``."""
    out, hooks = {}, []
    for fqn, mod in model.named_modules():
        if filt(mod, fqn):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, fqn=fqn: out.__setitem__(fqn, args[0].flatten(0, -2))))
    model(tokens)
    for h in hooks:
        h.remove()
    return out


@torch.no_grad()
def reference_logprobs(model, evalset: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """bf16 model's float32 log-probabilities ``[B, T, 256]`` per eval chunk."""
    device = next(model.parameters()).device
    return [F.log_softmax(model(chunk[:, :-1].to(device)).float(), -1)
            for chunk in evalset.split(batch_size)]


@torch.no_grad()
def ppl_and_kl(model, evalset: torch.Tensor, ref_logprobs: list, batch_size: int = 16):
    """``(perplexity, mean KL(ref || model) per byte in nats)`` on ``evalset [W, T + 1]``."""
    device = next(model.parameters()).device
    nll, kl, count = 0.0, 0.0, 0
    for chunk, ref in zip(evalset.split(batch_size), ref_logprobs):
        chunk = chunk.to(device)
        logp = F.log_softmax(model(chunk[:, :-1]).float(), -1)
        nll -= logp.gather(-1, chunk[:, 1:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        count += chunk[:, 1:].numel()
    return math.exp(nll / count), kl / count


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


@torch.no_grad()
def per_layer_sqnr(model, ref_model, inputs: dict, filt) -> dict[str, float]:
    ref_mods = dict(ref_model.named_modules())
    res = {}
    for fqn, mod in model.named_modules():
        if fqn in inputs:
            x = inputs[fqn]
            ref = F.linear(x.float(), ref_mods[fqn].weight.float())
            res[fqn] = sqnr_db(ref, F.linear(x, mod.weight).float())
    return res


def synthetic_sqnr(out_prefix: str, group_sizes, shape=(2048, 4096)) -> str:
    """Weight SQNR of minmax/mse/hqq (each zero-point domain) on Gaussian weights with 1% of
    the entries multiplied by 10; writes ``<prefix>_synthetic.{csv,md}``, returns the table."""
    from int4tensor import Int4Tensor

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen)
    w[torch.rand(*shape, generator=gen) < 0.01] *= 10
    rows = []
    for domain in ("float", "int", "none"):
        for G in group_sizes:
            base = None
            for algo in ("minmax", "mse", "hqq"):
                t = Int4Tensor.from_hp(w, (1, G), algorithm=algo, zero_point_domain=domain)
                db = sqnr_db(w, t.dequantize(torch.float32))
                base = db if algo == "minmax" else base
                rows.append({"domain": domain, "group_size": G, "algorithm": algo,
                             "sqnr_db": round(db, 3), "gain_db": round(db - base, 3)})
    with open(f"{out_prefix}_synthetic.csv", "w", newline="") as f:
        w_ = csv.DictWriter(f, fieldnames=list(rows[0]))
        w_.writeheader()
        w_.writerows(rows)
    lines = [f"Gaussian {shape[0]}x{shape[1]} fp32 weight, 1% of entries x10 (seed 0): weight "
             "SQNR (dB) and gain over minmax.", "",
             "| domain | G | minmax | mse (gain) | hqq (gain) |", "|---|---:|---:|---:|---:|"]
    for i in range(0, len(rows), 3):
        mm, ms, hq = rows[i:i + 3]
        lines.append(f"| {mm['domain']} | {mm['group_size']} | {mm['sqnr_db']:.2f} | "
                     f"{ms['sqnr_db']:.2f} ({ms['gain_db']:+.2f}) | "
                     f"{hq['sqnr_db']:.2f} ({hq['gain_db']:+.2f}) |")
    md = "\n".join(lines) + "\n"
    pathlib.Path(f"{out_prefix}_synthetic.md").write_text(md)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--zero-point-domain", default="float", choices=["float", "int", "none"])
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(RESULTS / "accuracy"),
                   help="output prefix (.md, .csv, _layers.csv are appended)")
    p.add_argument("--synthetic-only", action="store_true",
                   help="only the Gaussian-with-outliers weight SQNR table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(synthetic_sqnr(args.out, args.group_sizes), flush=True)
    if args.synthetic_only:
        return

    bytelm = load_bytelm()
    seq = bytelm.ByteLMConfig().max_seq_len
    val = bytelm.stdlib_corpus("val")
    meta = json.loads(bytelm.CONFIG.read_text())
    if bytelm.corpus_sha256(val) != meta["val_sha256"]:
        print(f"warning: this Python's stdlib differs from the one the model was trained on "
              f"(Python {meta['python']}); perplexities are not comparable with the committed "
              f"table", file=sys.stderr)
    evalset = bytelm.windows(val, seq, args.eval_windows)
    calib_w = bytelm.windows(bytelm.stdlib_corpus("train"), seq, args.calib_windows)
    calib = [b[:, :-1].to(args.device) for b in calib_w.split(8)]
    ref_model = bytelm.load_model(torch.bfloat16, args.device)
    inputs = layer_inputs(ref_model, evalset[:16, :-1].to(args.device), bytelm.is_block_linear)
    ref_logprobs = reference_logprobs(ref_model, evalset)
    ppl_bf16, _ = ppl_and_kl(ref_model, evalset, ref_logprobs)
    print(f"bf16 ppl {ppl_bf16:.4f} on {evalset.shape[0]} x {seq} held-out bytes "
          f"({args.device}, zero_point_domain={args.zero_point_domain})", flush=True)

    rows = [{"method": "bf16", "group_size": "-", "ppl": ppl_bf16, "d_ppl": 0.0,
             "rel_minmax": float("nan"), "kl_mnats": 0.0, "sqnr_mean": float("inf"),
             "sqnr_min": float("inf"), "seconds": 0.0}]
    layer_rows = []
    for G in args.group_sizes:
        minmax_delta = None
        for method in args.methods:
            t0 = time.perf_counter()
            model = quantized_model(bytelm, method, G, calib, args.device, args.zero_point_domain)
            secs = time.perf_counter() - t0
            ppl, kl = ppl_and_kl(model, evalset, ref_logprobs)
            sq = per_layer_sqnr(model, ref_model, inputs, bytelm.is_block_linear)
            delta = ppl - ppl_bf16
            if method == "minmax":
                minmax_delta = delta
            rel = delta / minmax_delta if minmax_delta else float("nan")
            rows.append({"method": method, "group_size": G, "ppl": ppl, "d_ppl": delta,
                         "rel_minmax": rel, "kl_mnats": 1000 * kl,
                         "sqnr_mean": sum(sq.values()) / len(sq), "sqnr_min": min(sq.values()),
                         "seconds": secs})
            layer_rows += [{"method": method, "group_size": G, "layer": k, "sqnr_db": v}
                           for k, v in sq.items()]
            print(f"G={G:3d} {method:9s} ppl {ppl:.4f}  d_ppl {delta:+.4f}  "
                  f"x minmax {rel:.2f}  KL {1000 * kl:.3f} mnats  "
                  f"layer SQNR mean {rows[-1]['sqnr_mean']:.2f} dB "
                  f"min {rows[-1]['sqnr_min']:.2f} dB  ({secs:.1f} s)", flush=True)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(f"{out}_layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(layer_rows[0]) if layer_rows else ["method"])
        w.writeheader()
        w.writerows(layer_rows)
    md = markdown_table(rows, ppl_bf16, evalset.shape[0] * seq, args)
    pathlib.Path(f"{out}.md").write_text(md)
    print("\n" + md)


def _fmt(v, spec):
    return "—" if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else format(v, spec)


def markdown_table(rows, ppl_bf16, n_bytes, args) -> str:
    lines = [
        f"Tiny byte-level LM (models/tiny_bytelm), held-out perplexity over {n_bytes} bytes, "
        f"bf16 = {ppl_bf16:.4f}; zero_point_domain = {args.zero_point_domain}; "
        f"device = {args.device}; calibration = {args.calib_windows} x 256 training bytes.",
        "",
        "| method | G | ppl | Δppl vs bf16 | Δppl / Δppl(minmax) | KL (mnats/byte) "
        "| layer SQNR mean (dB) | layer SQNR min (dB) | quantize time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['group_size']} | {r['ppl']:.4f} | "
                     f"{r['d_ppl']:+.4f} | {_fmt(r['rel_minmax'], '.2f')} | {r['kl_mnats']:.3f} | "
                     f"{_fmt(r['sqnr_mean'], '.2f')} | {_fmt(r['sqnr_min'], '.2f')} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
