"""Reference packers for tests, written element by element from the layouts in
shared/formats/README.md (independent of int4tensor.formats' vectorized code)."""

import torch

LINEAR = [0, 1, 2, 3, 4, 5, 6, 7]
AWQ = [0, 2, 4, 6, 1, 3, 5, 7]  # slot -> element


def to_i32(word: int) -> int:
    return word - (1 << 32) if word & 0x80000000 else word


def pack_row(values, order=LINEAR):
    """Python ints in [0, 15] -> list of int32 words, nibble i holding element order[i]."""
    values = list(values) + [0] * (-len(values) % 8)
    words = []
    for m in range(0, len(values), 8):
        w = 0
        for i in range(8):
            w |= (values[m + order[i]] & 0xF) << (4 * i)
        words.append(to_i32(w))
    return words


def pack_along_last(u: torch.Tensor, order=LINEAR) -> torch.Tensor:
    """``[R, C]`` -> int32 ``[R, ceil(C/8)]``."""
    return torch.tensor([pack_row(row, order) for row in u.tolist()], dtype=torch.int32)


def pack_along_first(u: torch.Tensor, order=LINEAR) -> torch.Tensor:
    """``[R, C]`` -> int32 ``[ceil(R/8), C]``."""
    return pack_along_last(u.t(), order).t().contiguous()


def random_integer_qparams(n, k, g, symmetric=False, scale_dtype=torch.float16, lead=()):
    """Random ``u [*lead, N, K]``, ``z [*lead, K/G, N]`` (8 if symmetric), ``s [*lead, K/G, N]``."""
    u = torch.randint(0, 16, (*lead, n, k))
    z = torch.full((*lead, k // g, n), 8) if symmetric else torch.randint(0, 16, (*lead, k // g, n))
    s = (torch.rand(*lead, k // g, n) * 0.02 + 0.001).to(scale_dtype)
    return u, z, s


def dequant_reference(u, z, s):
    """``w[n, k] = (u[n, k] - z[k // G, n]) * s[k // G, n]`` in float64."""
    g = u.shape[-1] // s.shape[-2]
    zz = z.transpose(-1, -2).repeat_interleave(g, dim=-1).double()
    ss = s.transpose(-1, -2).repeat_interleave(g, dim=-1).double()
    return (u.double() - zz) * ss
