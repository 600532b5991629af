"""Bit packing: the package's one packer of small unsigned codes into bytes or 32-bit words, at the bottom layer.

    packed = pack(codes, bits=4)                         # (..., n) codes -> (..., n / 2) uint8, two per byte
    words = pack(codes, bits=4, dim=0, word=torch.int32) # (n, cols) -> (n / 8, cols) int32: GPTQ's qweight rows
    codes = unpack(packed, bits=4)                       # the inverse, uint8 codes (int32 for int32 words)

Code i of a byte or word sits at bit offset i * bits, lowest bits first (int4 in bytes: element 2k in the low nibble;
GPTQ's int32 words: 8 consecutive codes, the first in bits 0-3). bits must divide the word (2, 4, 8; 32-bit words also
take 1 and 16). Used by quant (lab 01's packed storage), kvformat (KIVI's packed KV groups), checkpoint (the GPTQ
export) and kernels.w4a16 (QuantLinear's buffers and the reference dequantizer). The checkpoint *readers* deliberately
do not use it: a reader that shares the writer's packer cannot catch the writer's mistakes.
"""

from __future__ import annotations

import torch

WORDS = {torch.uint8: 8, torch.int32: 32}  # the word dtypes and their widths


def _check(bits: int, word: torch.dtype) -> int:
    if word not in WORDS:
        raise ValueError(f"word must be torch.uint8 (bytes) or torch.int32 (GPTQ words), got {word}")
    width = WORDS[word]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1 or width % bits:
        raise ValueError(f"bits must divide the {width}-bit word (e.g. 2, 4, 8), got {bits!r}; "
                         "3-bit codes are stored one per byte, or in compressed-tensors' bit stream")
    return width // bits


def pack(codes: torch.Tensor, bits: int, dim: int = -1, word: torch.dtype = torch.uint8) -> torch.Tensor:
    """Unsigned codes in [0, 2^bits) -> words along dim, width / bits consecutive codes per word."""
    per = _check(bits, word)
    dim = dim % codes.ndim
    if codes.shape[dim] % per:
        raise ValueError(f"dim {dim} has {codes.shape[dim]} codes, not a multiple of {per} ({bits}-bit codes per "
                         f"{WORDS[word]}-bit word)")
    if codes.is_floating_point():
        raise TypeError(f"codes must be integers, got {codes.dtype}: quantize first")
    if codes.numel() and codes.device.type != "meta" and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must be unsigned {bits}-bit values in [0, {2**bits - 1}]; "
                         f"shift symmetric codes by 2^(bits-1) first")
    c = codes.movedim(dim, -1).to(torch.int64)
    c = c.reshape(*c.shape[:-1], -1, per)  # (..., words, per)
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = (c << shifts).sum(-1)  # (..., words) in [0, 2^width)
    if word == torch.int32:
        words = words - (words >= 2**31).to(torch.int64) * 2**32  # reinterpret the top bit as the sign
    return words.to(word).movedim(-1, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Inverse of pack: words (uint8 or int32) -> codes along dim (uint8 from bytes, int32 from int32 words)."""
    per = _check(bits, words.dtype)
    dim = dim % words.ndim
    w = words.movedim(dim, -1).to(torch.int64) & (2 ** WORDS[words.dtype] - 1)  # the sign bit read as a value bit
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., words, per)
    return codes.flatten(-2).to(words.dtype).movedim(-1, dim)
