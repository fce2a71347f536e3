"""Low-bit storage of tensors: blockwise dynamic (absmax) codes and grouped min-max codes.

Two schemes, written once for every method that keeps state in few bits.

**Blockwise dynamic quantisation** (8-bit optimizer moments; Dettmers, Lewis, Shleifer,
Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861). The
flattened tensor is cut into blocks of ``block_size`` (256) numbers; each block keeps its
absolute maximum ``a_b`` (float32) and every number ``x`` a uint8 index ``c`` into a
256-entry codebook ``Q`` on ``[-1, 1]``::

    c = argmin_k |x / a_b - Q[k]|          (round to the nearest code)
    x ~ a_b * Q[c]

The codebook is the *dynamic tree* map of the paper: after the sign bit, a run of ``E``
zero bits says the decade (the number lies in ``(10^-(E+1), 10^-E]``), an indicator bit
ends the run, and the remaining ``F`` bits split the decade linearly::

    Q = { +-10^-E * (0.1 + 0.9 (k + 1) / 2^F) : E = 0..B-1, F = B-1-E, k < 2^F } U {0}

with ``B = 7`` bits after the sign for signed tensors (first moments; 255 distinct values,
smallest magnitude 1e-6) and ``B = 8`` for non-negative ones (second moments; 256 values,
smallest 1e-7). Unlike a linear map, it keeps ~2 significant digits over 6-7 decades, which
Adam's second moment needs. Each value's error is at most half the gap between the two
codes around it: ``0.45 * 10^-E / 2^F * a_b`` in decade ``E`` (0.7 % of ``a_b`` at the top).
The codebooks are constants of the scheme (built once per device, 1 KiB each), not state.

**Grouped min-max quantisation** (Q-GaLore's INT4 projectors and INT8 weights; Zhang et al.,
arXiv 2407.08296). The flattened tensor is cut into groups of ``group_size``; each group
keeps its minimum ``lo`` and step ``s = (hi - lo) / (2^bits - 1)`` (float32) and each number
an integer code::

    c = clamp(round((x - lo) / s), 0, 2^bits - 1)     x ~ lo + s * c

so ``|x - (lo + s c)| <= s / 2`` and both ends of each group are exact. 4-bit codes are
packed two per byte. With a ``generator``, rounding is *stochastic*: ``c = floor(t) + 1``
with probability ``t - floor(t)`` (``t = (x - lo) / s``), so ``E[lo + s c] = x``: small
updates survive on average instead of being rounded away (Gupta et al., arXiv 1502.02551).

A partial last block / group is allowed (the tensor need not be a multiple of its size).
Deviation from Q-GaLore's code: the group offset is stored as the float minimum ``lo``
instead of an integer zero point, so constant groups and the extremes are exact.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

SIGNED_DYNAMIC_BITS = 7  # bits after the sign in the signed dynamic codebook
UNSIGNED_DYNAMIC_BITS = 8


def _dynamic_magnitudes(bits: int) -> list[float]:
    values = [0.0]
    for zeros in range(bits):
        fraction_bits = bits - 1 - zeros
        levels = 2**fraction_bits
        values += [10.0**-zeros * (0.1 + 0.9 * (k + 1) / levels) for k in range(levels)]
    return values


def _bits(signed: bool) -> int:
    return SIGNED_DYNAMIC_BITS if signed else UNSIGNED_DYNAMIC_BITS


@lru_cache(maxsize=None)
def _dynamic_codebook(signed: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codebook, midpoints between neighbouring codes)`` on ``device``."""
    magnitudes = _dynamic_magnitudes(_bits(signed))
    values = sorted({-v for v in magnitudes} | set(magnitudes)) if signed else sorted(magnitudes)
    codebook = torch.tensor(values, dtype=torch.float32, device=device)
    return codebook, (codebook[1:] + codebook[:-1]) / 2


def dynamic_codebook(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sorted dynamic-tree codebook on ``[-1, 1]`` (signed, 255 values) or ``[0, 1]`` (256 values)."""
    return _dynamic_codebook(signed, str(torch.device(device)))[0]


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    """``flat`` as rows of ``size``, the last row padded with copies of the last value
    (padding never changes a row's min, max or absmax)."""
    count = math.ceil(flat.numel() / size)
    pad = count * size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(count, size)


def _unpadded(rows: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` entries of ``rows`` in their own storage (padding is not kept)."""
    flat = rows.reshape(-1)
    return flat if flat.numel() == numel else flat[:numel].clone()


def blockwise_quantize(
    tensor: torch.Tensor, *, signed: bool, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)``: uint8 codes of ``tensor``'s shape and float32 ``absmax`` per block."""
    flat = tensor.detach().reshape(-1).float()
    if not signed and not flat.is_meta and (flat < 0).any():  # meta: shapes only (the memory bench)
        raise ValueError("unsigned blockwise quantisation needs a non-negative tensor")
    rows = _blocks(flat, block_size)
    absmax = rows.abs().amax(dim=1)
    normalised = rows / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    _, midpoints = _dynamic_codebook(signed, str(flat.device))
    codes = _unpadded(torch.bucketize(normalised, midpoints).to(torch.uint8), flat.numel())
    return codes.view(tensor.shape), absmax


def blockwise_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    signed: bool,
    block_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`blockwise_quantize`: ``absmax[block] * Q[code]`` in ``dtype``."""
    codebook = dynamic_codebook(signed, codes.device)
    values = codebook[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(block_size)[: values.numel()]
    return (values * scale).view(codes.shape).to(dtype)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of the codes of ``numel`` numbers at ``bits`` (4: two per byte; 8: one)."""
    return math.ceil(numel / 2) if bits == 4 else numel


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"min-max quantisation supports 4 or 8 bits, got {bits!r}")


def minmax_quantize(
    tensor: torch.Tensor, *, bits: int, group_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, minimum, step)`` of ``tensor`` by groups of ``group_size``.

    ``codes`` is a flat uint8 tensor (4-bit codes packed two per byte); ``minimum`` and
    ``step`` are float32 per group. Rounds to nearest, or stochastically from ``generator``.
    """
    _check_bits(bits)
    flat = tensor.detach().reshape(-1).float()
    rows = _blocks(flat, group_size)
    low = rows.amin(dim=1)
    step = (rows.amax(dim=1) - low) / (2**bits - 1)
    scaled = (rows - low.unsqueeze(1)) / torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(1)
    if generator is None:
        rounded = scaled.round()
    else:
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device, dtype=scaled.dtype)
        rounded = scaled.floor() + (noise < scaled - scaled.floor()).to(scaled.dtype)
    codes = _unpadded(rounded.clamp_(0, 2**bits - 1).to(torch.uint8), flat.numel())
    return (_pack_nibbles(codes) if bits == 4 else codes), low, step


def minmax_dequantize(
    codes: torch.Tensor,
    minimum: torch.Tensor,
    step: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`minmax_quantize`: ``minimum[group] + step[group] * code`` in ``dtype``."""
    _check_bits(bits)
    numel = math.prod(shape)
    values = (_unpack_nibbles(codes, numel) if bits == 4 else codes).float()
    low = minimum.repeat_interleave(group_size)[:numel]
    scale = step.repeat_interleave(group_size)[:numel]
    return (low + scale * values).view(tuple(shape)).to(dtype)
