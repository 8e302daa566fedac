"""A tiny byte-level causal transformer, the model ``benchmarks/bench_accuracy.py`` measures on.

Trained once by ``train.py`` (next to this file) on Python's own standard-library sources, so the
benchmark needs no download. Every Linear has ``K`` in {256, 1024}, so group sizes 32..256 apply.

Data recipe (:func:`stdlib_corpus`): all ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``
outside ``site-packages`` and the ``test``/``tests``/``idlelib``/``lib2to3`` folders, sorted by
relative path; every 20th file (index % 20 == 0) is held out for evaluation, the rest is the
training split. Files are joined with a ``\\n\\n`` separator and read as UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import sysconfig
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
WEIGHTS = HERE / "model.safetensors"
CONFIG = HERE / "config.json"

_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3"}


@dataclass
class ByteLMConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 256


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: ByteLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """``forward(tokens int64 [B, T]) -> logits [B, T, 256]`` (T <= max_seq_len)."""

    def __init__(self, cfg: ByteLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    """``filter_fn`` for ``quantize_``: the Linears inside the blocks (lm_head stays in bf16,
    as usual for weight-only int4)."""
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def stdlib_corpus(split: str) -> bytes:
    """The ``"train"`` or ``"val"`` split of the standard-library corpus (see module docstring)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (f for f in root.rglob("*.py") if not _EXCLUDED_DIRS & set(f.relative_to(root).parts)),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    keep = [f for i, f in enumerate(files) if (i % 20 == 0) == (split == "val")]
    return b"\n\n".join(f.read_bytes() for f in keep)


def corpus_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_model(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> ByteLM:
    """The committed model (``model.safetensors`` + ``config.json``), in eval mode."""
    from safetensors.torch import load_file

    meta = json.loads(CONFIG.read_text())
    model = ByteLM(ByteLMConfig(**meta["model"]))
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.to(device=device, dtype=dtype).eval()


def windows(data: bytes, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` bytes (input + shifted target), int64
    ``[num_windows, seq_len + 1]``, evenly spread over ``data`` when ``max_windows`` caps them."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = (t.numel() - 1) // seq_len
    starts = torch.arange(n) * seq_len
    if max_windows is not None and n > max_windows:
        starts = starts[torch.linspace(0, n - 1, max_windows).long()]
    return torch.stack([t[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: nn.Module, batches: torch.Tensor, batch_size: int = 16) -> float:
    """Per-byte perplexity ``exp(mean cross-entropy)`` over windows ``[W, T + 1]``."""
    total, count = 0.0, 0
    for i in range(0, batches.shape[0], batch_size):
        chunk = batches[i:i + batch_size].to(next(model.parameters()).device)
        logits = model(chunk[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def config_dict(cfg: ByteLMConfig) -> dict:
    return asdict(cfg)
