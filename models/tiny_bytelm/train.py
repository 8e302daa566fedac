"""Train the tiny byte-level LM once and write ``model.safetensors`` + ``config.json``.

    nohup python models/tiny_bytelm/train.py > /tmp/bytelm_train.log 2>&1 &

Recipe (fixed, so the run is reproducible up to CPU floating-point nondeterminism): seed 0,
:func:`model.stdlib_corpus` ``"train"`` split, random windows of 256 bytes, batch 32, AdamW
(lr 2e-3, betas (0.9, 0.95), weight decay 0.1 on matrices), 100 warmup steps then cosine decay
to 10%, gradient clipping at 1.0, bf16 autocast on CPU, 1000 steps (~15 minutes on 2 shared cores).
Checkpoints to ``/tmp/bytelm_ckpt.pt`` every 200 steps and resumes from it when present.
The weights are stored in bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import CONFIG, WEIGHTS, ByteLM, ByteLMConfig, config_dict, corpus_sha256, \
    perplexity, stdlib_corpus, windows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt", default="/tmp/bytelm_ckpt.pt")
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ByteLMConfig()
    train = torch.frombuffer(bytearray(stdlib_corpus("train")), dtype=torch.uint8).long()
    val_data = stdlib_corpus("val")
    model = ByteLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    start = 0
    if os.path.exists(args.ckpt):
        ck = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start = ck["step"]
        print(f"resumed at step {start}", flush=True)

    def lr_at(step: int) -> float:
        if step < 100:
            return args.lr * (step + 1) / 100
        frac = (step - 100) / max(1, args.steps - 100)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    T = cfg.max_seq_len
    t0 = time.time()
    model.train()
    for step in range(start, args.steps):
        idx = torch.randint(0, train.numel() - T - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[i:i + T + 1] for i in idx.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if (step + 1) % 200 == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "step": step + 1}, args.ckpt)

    from safetensors.torch import save_file

    model.eval()
    bf16 = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(bf16, str(WEIGHTS))
    evalset = windows(val_data, T, max_windows=256)
    model_bf16 = ByteLM(cfg).to(torch.bfloat16).eval()
    model_bf16.load_state_dict(bf16)
    ppl = perplexity(model_bf16, evalset)
    meta = {"model": config_dict(cfg), "train": vars(args) | {"seed": 0},
            "python": sys.version.split()[0], "torch": torch.__version__,
            "train_sha256": corpus_sha256(stdlib_corpus("train")),
            "val_sha256": corpus_sha256(val_data), "val_ppl_bf16_256x256": round(ppl, 4)}
    CONFIG.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"done: val ppl (bf16, 256 windows of 256) {ppl:.4f}; wrote {WEIGHTS}", flush=True)


if __name__ == "__main__":
    main()
