"""KV-cache compression: the maths (compresslab.kvcompress, `kv` here, as in lab 06) — memory arithmetic, code packing
(kvformat), KIVI group quantization (keys per channel, values per token), GEAR's outliers (S) and low-rank part (L) by
power iteration, the byte accounting — and the cache that stores it (compresslab.kvcache): the CompressedLayer cache
on its own and inside transformers' generate, kv_perplexity, and bad input.

The maths runs on small seeded tensors against bounds written out here (fp16 storage of scales and minima gives the
slack) and against torch.linalg.svdvals. The cache is checked layer by layer on synthetic states, then a few short
integration tests run the real SmolLM2-135M (`smollm`: 30 layers, 3 KV heads, head_dim 64, float32 on CPU).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config)
from transformers.cache_utils import Cache, DynamicCache

from layer_testing import gen

from compresslab import kvcache, kvformat
from compresslab import kvcompress as kv
from compresslab.data import test_windows as wikitext_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors; the model tests are short sequences

FP16_EPS = 2.0**-11  # fp16 relative rounding (half an ulp) of a normal number


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed)) * scale


def keylike(b=1, h=2, t=128, d=64, seed=0):
    """Key-like states: Gaussian + a shared rank-1 component, one channel x20, and a few +-30 spikes."""
    g = gen(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x = x + 0.5 * torch.randn(b, h, t, 1, generator=g) @ torch.randn(b, h, 1, d, generator=g)
    x[..., 5] *= 20
    spikes = torch.randint(0, x.numel(), (20,), generator=g)
    x.view(-1)[spikes] += 30 * torch.sign(torch.randn(20, generator=g))
    return x


def per_element(q: kvformat.QuantizedGroups, t: torch.Tensor) -> torch.Tensor:
    """A per-group tensor (..., n_groups, 1) of q broadcast back onto the elements of the original shape."""
    group = q.codes.shape[-1] * 8 // q.bits
    moved = list(q.shape)
    moved.append(moved.pop(q.dim))
    return t.float().expand(*t.shape[:-1], group).reshape(moved).movedim(-1, q.dim)


def quant_bound(q: kvformat.QuantizedGroups) -> torch.Tensor:
    """Half a step, plus what the fp16 rounding of the stored scale and minimum can add (2^b - 1 steps of it)."""
    scale, minimum = per_element(q, q.scale), per_element(q, q.minimum)
    maxq = 2**q.bits - 1
    return scale / 2 + FP16_EPS * (maxq * scale + minimum.abs()) * 1.01 + 1e-6


def rank_r(n, d, r, seed=0):
    return randn(n, r, seed=seed) @ randn(r, d, seed=seed + 1)


def gapped(n=96, d=48, seed=0):
    """A matrix with 4 large singular values and a flat tail: a clear spectral gap after rank 4."""
    U = torch.linalg.qr(randn(n, d, seed=seed)).Q
    V = torch.linalg.qr(randn(d, d, seed=seed + 1)).Q
    s = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), torch.full((d - 4,), 0.5)])
    return U @ torch.diag(s) @ V.T


def svd_error(R, r):
    return torch.linalg.svdvals(R)[..., r:].norm()


# ----------------------------------------------------------------------------- memory arithmetic


def test_kv_bytes_per_token_of_smollm(smollm):
    """SmolLM2-135M: 30 layers x (K, V) x 3 KV heads x head_dim 64 x 2 bytes = 23040 bytes per token."""
    config = smollm[0].config
    assert kv.kv_bytes_per_token(config) == 30 * 2 * 3 * 64 * 2 == 23040
    assert kv.kv_bytes_per_token(config, bytes_per_element=0.5) == 23040 / 4  # 4-bit elements
    assert kv.kv_bytes_per_token(config, bytes_per_element=4) == 2 * 23040


def test_kv_cache_bytes_is_linear_in_batch_and_context(smollm):
    config = smollm[0].config
    one = kv.kv_cache_bytes(config, 1, 1)
    assert one == kv.kv_bytes_per_token(config)
    for batch, context in ((1, 512), (8, 512), (8, 4096), (3, 7)):
        assert kv.kv_cache_bytes(config, batch, context) == batch * context * one
    assert kv.kv_cache_bytes(config, 4, 1000, 1) == kv.kv_cache_bytes(config, 4, 1000) / 2


def test_kv_bytes_use_the_config_head_dim_and_kv_heads():
    """An explicit head_dim (Qwen3 style, not hidden/heads) and grouped KV heads are what the cache stores."""
    qwen3 = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert kv.kv_bytes_per_token(qwen3) == 3 * 2 * 2 * 32 * 2
    llama = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=None)  # no GQA: kv heads = heads
    assert kv.kv_bytes_per_token(llama) == 2 * 2 * 4 * 16 * 2


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_packed_size(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), generator=gen(bits), dtype=torch.uint8)
    packed = kvformat.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert packed.numel() * packed.element_size() == codes.numel() * bits // 8
    out = kvformat.unpack_codes(packed, bits)
    assert out.dtype == torch.uint8 and torch.equal(out, codes)


def test_pack_codes_bit_layout():
    """Code j of a byte sits in bits [j*b, (j+1)*b): the first code is the lowest."""
    assert kvformat.pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert kvformat.pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    assert kvformat.pack_codes(torch.tensor([200, 7], dtype=torch.uint8), 8).tolist() == [200, 7]
    assert kvformat.unpack_codes(torch.tensor([0b11100100], dtype=torch.uint8), 2).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- group quantization (KIVI)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_dequantized_error_is_at_most_half_a_step(bits, kind):
    x = randn(2, 3, 64, 32, seed=bits, scale=3.0) + 1.0
    q = kv.quantize_keys(x, bits, 16) if kind == "key" else kv.quantize_values(x, bits, 16)
    x_hat = q.dequantize()
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    err = (x_hat - x).abs()
    assert (err <= quant_bound(q)).all(), (err / per_element(q, q.scale)).max()
    assert err.max() > 0.2 * per_element(q, q.scale).min()  # not trivially exact: a real quantizer
    codes = kvformat.unpack_codes(q.codes, bits)
    assert codes.max() == 2**bits - 1 and codes.min() == 0  # each group's range is used end to end


def test_keys_are_grouped_along_tokens_of_one_channel():
    x = randn(1, 2, 32, 8, seed=1)
    q = kv.quantize_keys(x, 2, group_size=8)
    assert q.scale.shape == q.minimum.shape == (1, 2, 8, 4, 1)  # (b, h, channels, token groups, 1)
    assert q.scale.dtype == q.minimum.dtype == torch.float16
    assert q.codes.shape == (1, 2, 8, 4, 8 * 2 // 8)
    y = x.clone()
    y[0, 1, 3, 5] += 50.0  # head 1, token 3 (token group 0), channel 5
    a, b = q.dequantize(), kv.quantize_keys(y, 2, group_size=8).dequantize()
    changed = (a != b)
    assert changed[0, 1, 0:8, 5].any()
    changed[0, 1, 0:8, 5] = False
    assert not changed.any()  # other channels, other token groups and the other head: untouched


def test_values_are_grouped_along_channels_of_one_token():
    x = randn(1, 2, 8, 32, seed=2)
    q = kv.quantize_values(x, 4, group_size=8)
    assert q.scale.shape == q.minimum.shape == (1, 2, 8, 4, 1)  # (b, h, tokens, channel groups, 1)
    assert q.codes.shape == (1, 2, 8, 4, 8 * 4 // 8)
    y = x.clone()
    y[0, 0, 3, 13] -= 50.0  # token 3, channel 13 (channel group 1)
    a, b = q.dequantize(), kv.quantize_values(y, 4, group_size=8).dequantize()
    changed = (a != b)
    assert changed[0, 0, 3, 8:16].any()
    changed[0, 0, 3, 8:16] = False
    assert not changed.any()


def test_quantize_groups_along_a_middle_dim_matches_moving_it_last():
    x = randn(4, 24, 6, seed=3)
    q = kv.quantize_groups(x, 4, 8, dim=1)
    assert q.dim == 1 and q.shape == (4, 24, 6)
    ref = kv.quantize_groups(x.movedim(1, -1).contiguous(), 4, 8, dim=-1).dequantize().movedim(-1, 1)
    assert torch.equal(q.dequantize(), ref)
    assert torch.equal(kv.quantize_groups(x, 4, 8, dim=-2).dequantize(), q.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nbytes_parts_are_what_the_tensors_hold(bits):
    b, h, t, d, g = 2, 3, 64, 32, 16
    for q in (kv.quantize_keys(randn(b, h, t, d), bits, g), kv.quantize_values(randn(b, h, t, d), bits, g)):
        parts = q.nbytes()
        assert set(parts) == {"codes", "scales+minima"}
        assert parts["codes"] == q.codes.numel() == b * h * t * d * bits // 8
        assert parts["scales+minima"] == 2 * 2 * (b * h * t * d // g)  # an fp16 scale and minimum per group


def test_a_constant_group_reconstructs_exactly():
    for c in (1.5, -0.25, 0.0, 96.0):  # fp16-representable: exact
        x = torch.full((1, 2, 16, 8), c)
        for bits in (2, 4, 8):
            assert torch.equal(kv.quantize_keys(x, bits, 8).dequantize(), x)
            assert torch.equal(kv.quantize_values(x, bits, 8).dequantize(), x)
    x = torch.full((1, 1, 8, 8), 0.1)  # not representable: off by no more than the fp16 rounding of the minimum
    assert torch.allclose(kv.quantize_values(x, 2, 8).dequantize(), x, rtol=0, atol=0.1 * FP16_EPS + 4e-5)


def test_quantization_is_per_group_scaled():
    """Groups of very different magnitudes each get their own range: the small group keeps its precision."""
    x = randn(1, 1, 8, 16, seed=4)
    x[..., 8:] *= 1000.0  # the second channel group of every token is huge
    q = kv.quantize_values(x, 4, 8)
    err = (q.dequantize() - x).abs()
    assert err[..., :8].max() < 0.3 and err[..., 8:].max() > 10


def test_four_bits_are_more_accurate_than_two():
    x = keylike(t=64, d=32, seed=5)
    for quantize in (kv.quantize_keys, kv.quantize_values):
        e2 = (quantize(x, 2, 16).dequantize() - x).abs().mean()
        e4 = (quantize(x, 4, 16).dequantize() - x).abs().mean()
        e8 = (quantize(x, 8, 16).dequantize() - x).abs().mean()
        assert e8 < e4 < e2 and e4 < 0.35 * e2


def test_fake_quantize_kv_keeps_shape_and_dtype_and_matches_the_groups():
    x = randn(1, 2, 32, 16, seed=6)
    for kind, quantize in (("key", kv.quantize_keys), ("value", kv.quantize_values)):
        out = kv.fake_quantize_kv(x, kind, bits=2, group_size=16)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out, quantize(x, 2, 16).dequantize())
    half = kv.fake_quantize_kv(x.half(), "key", bits=4, group_size=16)
    assert half.dtype == torch.float16 and half.shape == x.shape
    assert (kv.fake_quantize_kv(x, "key", 2, 16) != kv.fake_quantize_kv(x, "value", 2, 16)).any()


# ----------------------------------------------------------------------------- S: outliers


def test_outliers_per_side():
    assert kv.outliers_per_side(64, 0.02) == 1
    assert kv.outliers_per_side(512, 0.02) == 5
    assert kv.outliers_per_side(128, 0.02) == 1  # 1.28 rounds to 1
    assert kv.outliers_per_side(150, 0.02) == 2  # 1.5 rounds up
    assert kv.outliers_per_side(10, 0.02) == 1  # at least one per side once the ratio is > 0
    assert kv.outliers_per_side(64, 0.0) == 0
    assert kv.outliers_per_side(100, 0.5) == 25


@pytest.mark.parametrize("dim", [-1, -2, 0])
def test_outlier_mask_marks_the_k_largest_and_k_smallest(dim):
    x = randn(40, 64, seed=7)
    ratio = 0.1
    mask = kv.outlier_mask(x, ratio, dim)
    k = kv.outliers_per_side(x.shape[dim], ratio)
    assert mask.dtype == torch.bool and mask.shape == x.shape and k >= 2
    assert (mask.sum(dim) == 2 * k).all()
    xs, ms = x.movedim(dim, -1), mask.movedim(dim, -1)
    srt = xs.sort(-1).values
    n = xs.shape[-1]
    kth_smallest, kth_largest = srt[..., k - 1 : k], srt[..., n - k : n - k + 1]
    assert torch.equal(ms, (xs <= kth_smallest) | (xs >= kth_largest))


def test_outlier_mask_with_ratio_zero_marks_nothing():
    assert not kv.outlier_mask(randn(4, 64), 0.0, -1).any()
    assert not kv.outlier_mask(randn(4, 64), 0, -2).any()


def test_outlier_mask_k_on_a_real_shape():
    x = randn(2, 512, 64, seed=8)
    assert (kv.outlier_mask(x, 0.02, -1).sum(-1) == 2).all()  # 64 channels: 1 per side
    assert (kv.outlier_mask(x, 0.02, -2).sum(-2) == 10).all()  # 512 tokens: 5 per side


@pytest.mark.parametrize("dim", [-1, -2])
def test_split_outliers_keeps_them_exactly_and_clamps_the_rest(dim):
    x = keylike(t=64, d=32, seed=9)
    ratio = 0.1
    S, clamped = kv.split_outliers(x, ratio, dim)
    k = kv.outliers_per_side(x.shape[dim], ratio)
    assert S.values.dtype == torch.float16 and S.values.shape[-1] == 2 * k and S.index.shape == S.values.shape
    assert S.dim == dim % x.dim() and clamped.shape == x.shape
    mask = kv.outlier_mask(x, ratio, dim)
    marked = torch.zeros_like(mask).movedim(dim, -1).scatter_(-1, S.index.long(), True).movedim(-1, dim)
    assert torch.equal(marked, mask)  # S holds exactly the positions outlier_mask marks
    out = S.write_into(clamped)
    assert torch.equal(out[mask], x[mask].half().float())  # exact up to the fp16 storage
    assert torch.equal(out[~mask], x[~mask])  # inliers untouched by the write
    assert torch.equal(clamped[~mask], x[~mask])  # and by the clamp
    srt = x.movedim(dim, -1).sort(-1).values
    lo, hi = srt[..., k : k + 1].movedim(-1, dim), srt[..., -k - 1 : -k].movedim(-1, dim)  # extreme inliers
    assert ((clamped >= lo) & (clamped <= hi)).all()
    assert (clamped.amin(dim, keepdim=True) == lo).all() and (clamped.amax(dim, keepdim=True) == hi).all()


def test_split_outliers_index_dtype_is_the_smallest_that_fits():
    for n, dtype in ((64, torch.uint8), (256, torch.uint8), (257, torch.int16), (512, torch.int16)):
        S, _ = kv.split_outliers(randn(2, n, seed=n), 0.02, -1)
        assert S.index.dtype == dtype, n
        assert S.index.long().max() < n
        assert S.nbytes() == {"outlier values": 2 * 2 * 2 * kv.outliers_per_side(n, 0.02),
                              "outlier indices": 2 * 2 * kv.outliers_per_side(n, 0.02) * S.index.element_size()}


def test_write_into_does_not_modify_its_input():
    x = randn(3, 16, seed=10)
    S, clamped = kv.split_outliers(x, 0.25, -1)
    before = clamped.clone()
    S.write_into(clamped)
    assert torch.equal(clamped, before)


# ----------------------------------------------------------------------------- L: low rank by power iteration


@pytest.mark.parametrize("r", [1, 3])
def test_lowrank_reproduces_an_exactly_low_rank_matrix(r):
    R = rank_r(48, 32, r, seed=11)
    P, Q = kv.lowrank_power_iteration(R, r)
    assert P.shape == (48, r) and Q.shape == (32, r)
    assert torch.allclose(P @ Q.mT, R, atol=1e-4 * R.abs().max())


def test_lowrank_error_is_at_least_and_close_to_the_truncated_svd():
    R = gapped()
    for r in (1, 2, 4):
        P, Q = kv.lowrank_power_iteration(R, r)
        err, best = (R - P @ Q.mT).norm(), svd_error(R, r)
        assert err >= best * (1 - 1e-5)  # Eckart-Young: nothing beats the truncated SVD
    P, Q = kv.lowrank_power_iteration(R, 4)
    assert (R - P @ Q.mT).norm() <= 1.001 * svd_error(R, 4)  # clear gap after rank 4: converged in 3 rounds
    G = randn(96, 48, seed=12)  # no gap: still never better than the SVD, and not far off
    P, Q = kv.lowrank_power_iteration(G, 4)
    err, best = (G - P @ Q.mT).norm(), svd_error(G, 4)
    assert best * (1 - 1e-5) <= err <= 1.1 * best


def test_lowrank_p_has_orthonormal_columns_and_q_is_the_projection():
    R = randn(64, 32, seed=13)
    P, Q = kv.lowrank_power_iteration(R, 5)
    assert torch.allclose(P.mT @ P, torch.eye(5), atol=1e-5)
    assert torch.allclose(Q, R.mT @ P, atol=1e-5)  # P Q^T is R projected onto span(P)


def test_more_power_iterations_do_not_hurt():
    R = randn(64, 32, seed=14)
    errs = [(R - (lambda p, q: p @ q.mT)(*kv.lowrank_power_iteration(R, 4, iters=i))).norm() for i in (1, 3, 10)]
    assert errs[0] >= errs[1] >= errs[2] - 1e-5


def test_lowrank_is_deterministic_for_a_seed():
    R = randn(64, 32, seed=15)
    a, b = kv.lowrank_power_iteration(R, 4, seed=3), kv.lowrank_power_iteration(R, 4, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = kv.lowrank_power_iteration(R, 4, seed=4)
    assert not torch.equal(a[0] @ a[1].mT, c[0] @ c[1].mT)  # a flat spectrum: the start matters


def test_lowrank_batched_equals_a_loop_over_heads():
    R = randn(2, 3, 40, 16, seed=16)
    P, Q = kv.lowrank_power_iteration(R, 3)
    assert P.shape == (2, 3, 40, 3) and Q.shape == (2, 3, 16, 3)
    for i in range(2):
        for j in range(3):
            p, q = kv.lowrank_power_iteration(R[i, j], 3)
            assert torch.allclose(P[i, j] @ Q[i, j].mT, p @ q.mT, atol=1e-5)


def test_power_iteration_from_a_given_start():
    R = rank_r(30, 20, 2, seed=17)
    P, Q = kv.power_iteration(R, randn(20, 2, seed=18), iters=2)
    assert torch.allclose(P @ Q.mT, R, atol=1e-4 * R.abs().max())


@pytest.mark.parametrize("rank", [0, -1, 33, True, 2.0])
def test_lowrank_rejects_a_bad_rank(rank):
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(tokens, head_dim\)\] = \[1, 32\]"):
        kv.lowrank_power_iteration(randn(48, 32), rank)


# ----------------------------------------------------------------------------- GEAR = D + L + S


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_gear_beats_gear_l_beats_kivi(kind, bits):
    x = keylike(seed=19)
    errs = {}
    for name, rank, ratio in (("kivi", 0, 0.0), ("gear_l", 4, 0.0), ("gear", 4, 0.02)):
        c = kv.gear_compress(x, kind, bits=bits, group_size=32, rank=rank, outlier_ratio=ratio)
        errs[name] = (c.reconstruct() - x).norm().item()
    assert errs["gear"] <= errs["gear_l"] <= errs["kivi"], errs
    assert errs["gear_l"] < 0.9 * errs["kivi"], errs


def test_gear_with_rank_and_ratio_zero_is_kivi():
    x = keylike(t=64, d=32, seed=20)
    for kind, quantize in (("key", kv.quantize_keys), ("value", kv.quantize_values)):
        c = kv.gear_compress(x, kind, bits=2, group_size=16, rank=0, outlier_ratio=0.0)
        assert c.S is None and c.L is None
        assert set(c.nbytes()) == {"codes", "scales+minima"}
        assert torch.equal(c.reconstruct(), quantize(x, 2, 16).dequantize())


def test_gear_parts_shapes_and_storage():
    b, h, t, d = 1, 2, 64, 32
    x = keylike(b, h, t, d, seed=21)
    k = kv.gear_compress(x, "key", bits=2, group_size=16, rank=3, outlier_ratio=0.1)
    assert k.L[0].shape == (b, h, t, 3) and k.L[1].shape == (b, h, d, 3)
    assert k.L[0].dtype == k.L[1].dtype == torch.float16
    assert k.S.dim == 2 and k.S.values.shape == (b, h, d, 2 * kv.outliers_per_side(t, 0.1))  # per channel
    v = kv.gear_compress(x, "value", bits=2, group_size=16, rank=3, outlier_ratio=0.1)
    assert v.S.dim == 3 and v.S.values.shape == (b, h, t, 2 * kv.outliers_per_side(d, 0.1))  # per token
    for c, dim in ((k, -2), (v, -1)):
        mask = kv.outlier_mask(x, 0.1, dim)
        assert torch.equal(c.reconstruct()[mask], x[mask].half().float())  # S is exact (fp16) where it is
        assert c.reconstruct(torch.float16).dtype == torch.float16
    gl = kv.gear_compress(x, "key", bits=2, group_size=16, rank=3, outlier_ratio=0.0)
    assert gl.S is None and gl.L is not None


def test_gear_parts_are_quantized_inliers_plus_the_low_rank_fit_of_the_rest():
    """D quantizes the clamped inliers, L is the seeded power-iteration fit of x - D (zero at S), X_hat = D + L, S."""
    x = keylike(t=64, d=32, seed=25)
    for kind, dim in (("key", -2), ("value", -1)):
        gl = kv.gear_compress(x, kind, bits=2, group_size=16, rank=3, outlier_ratio=0.0)
        D = kv.quantize_groups(x, 2, 16, dim).dequantize()
        assert torch.equal(gl.D.dequantize(), D)
        P, Q = kv.lowrank_power_iteration(x - D, 3)
        assert torch.equal(gl.L[0], P.half()) and torch.equal(gl.L[1], Q.half())
        assert torch.allclose(gl.reconstruct(), D + P.half().float() @ Q.half().float().mT, atol=1e-5)
        err, best = (x - gl.reconstruct()).norm(), svd_error(x - D, 3)
        assert best * (1 - 1e-3) <= err <= 1.1 * best  # close to the best rank-3 correction

        g = kv.gear_compress(x, kind, bits=2, group_size=16, rank=3, outlier_ratio=0.05)
        S, clamped = kv.split_outliers(x, 0.05, dim)
        D = kv.quantize_groups(clamped, 2, 16, dim).dequantize()
        assert torch.equal(g.D.dequantize(), D)
        R = (x - D).masked_fill(kv.outlier_mask(x, 0.05, dim), 0.0)
        P, Q = kv.lowrank_power_iteration(R, 3)
        assert torch.equal(g.L[0], P.half()) and torch.equal(g.L[1], Q.half())
        assert torch.allclose(g.reconstruct(), S.write_into(D + P.half().float() @ Q.half().float().mT), atol=1e-5)


def test_gear_is_deterministic():
    x = keylike(t=64, d=32, seed=22)
    a = kv.gear_compress(x, "value", 2, 16, rank=4, outlier_ratio=0.05).reconstruct()
    assert torch.equal(a, kv.gear_compress(x, "value", 2, 16, rank=4, outlier_ratio=0.05).reconstruct())


@pytest.mark.parametrize("t", [128, 320])
@pytest.mark.parametrize("bits,group,rank,ratio", [(2, 64, 4, 0.02), (4, 32, 2, 0.05), (2, 16, 0, 0.02),
                                                    (8, 64, 3, 0.0)])
def test_gear_nbytes_matches_the_formula(t, bits, group, rank, ratio):
    b, h, d = 2, 2, 64
    x = keylike(b, h, t, d, seed=23)
    for kind in ("key", "value"):
        c = kv.gear_compress(x, kind, bits=bits, group_size=group, rank=rank, outlier_ratio=ratio)
        if kind == "key":  # per channel: 2k outliers in each of the d channels, k from the tokens
            n_out, index_bytes = d * 2 * kv.outliers_per_side(t, ratio), (1 if t <= 256 else 2)
        else:  # per token: 2k in each of the t tokens, k from the channels
            n_out, index_bytes = t * 2 * kv.outliers_per_side(d, ratio), 1
        expected = kv.gear_nbytes(t, d, bits, group, rank, n_out, index_bytes) * b * h
        assert sum(c.nbytes().values()) == expected, (kind, c.nbytes())
        if ratio:
            assert c.S.index.element_size() == index_bytes


def test_gear_nbytes_by_hand():
    """One head of 64 tokens x 64 channels, 2 bits, groups of 64, rank 4, 128 outliers with 1-byte positions."""
    assert kv.gear_nbytes(64, 64, 2, 64, 4, 128, 1) == 64 * 64 // 4 + 4 * 64 + 128 * 3 + 2 * 4 * 128


# ----------------------------------------------------------------------------- bad input


def _x(*shape):
    return randn(*shape, seed=24)


BAD = [  # (callable, exception, message pattern)
    (lambda: kv.quantize_groups(_x(1, 1, 16, 16), 3, 16, -1), ValueError, r"bits must be one of \(2, 4, 8\).*got 3"),
    (lambda: kv.quantize_groups(_x(1, 1, 16, 16), 16, 16, -1), ValueError, r"bits must be one of.*got 16.*fp16"),
    (lambda: kv.quantize_groups(_x(1, 1, 16, 16), True, 16, -1), ValueError, r"bits must be one of.*got True"),
    (lambda: kv.KVConfig(bits=3), ValueError, r"bits must be one of.*got 3"),
    (lambda: kv.KVConfig(bits=16), ValueError, r"bits must be one of.*got 16"),
    (lambda: kv.KVConfig(bits=True), ValueError, r"bits must be one of.*got True"),
    (lambda: kv.KVConfig(key_bits=3), ValueError, r"bits must be one of.*got 3"),
    (lambda: kv.outlier_mask(_x(4, 16), -0.1, -1), ValueError, r"outlier_ratio must be a fraction in \[0, 1\)"),
    (lambda: kv.outlier_mask(_x(4, 16), 1.0, -1), ValueError, r"outlier_ratio must be a fraction.*got 1.0"),
    (lambda: kv.outlier_mask(_x(4, 16), float("nan"), -1), ValueError, r"outlier_ratio must be a fraction"),
    (lambda: kv.split_outliers(_x(4, 16), 1.0, -1), ValueError, r"outlier_ratio must be a fraction"),
    (lambda: kv.KVConfig(outlier_ratio=-0.1), ValueError, r"outlier_ratio must be a fraction.*got -0.1"),
    (lambda: kv.KVConfig(outlier_ratio=1.0), ValueError, r"outlier_ratio must be a fraction.*got 1.0"),
    (lambda: kv.gear_compress(_x(1, 1, 16, 8), "key", 2, 8, rank=9, outlier_ratio=0), ValueError,
     r"rank must be an int in \[1, min\(tokens, head_dim\)\] = \[1, 8\]"),
    (lambda: kv.gear_compress(_x(1, 1, 16, 8), "key", 2, 8, rank=4, outlier_ratio=1.5), ValueError, "outlier_ratio"),
    (lambda: kv.quantize_values(_x(1, 1, 4, 40), 2, 32), ValueError, r"group_size=32 does not divide the size of dim 3 \(40\)"),
    (lambda: kv.quantize_keys(_x(1, 1, 40, 8), 2, 32), ValueError, r"group_size=32 does not divide the tokens of the block"),
    (lambda: kv.quantize_values(_x(1, 1, 4, 24), 2, 6), ValueError, r"group_size must be a positive multiple of 4"),
    (lambda: kv.quantize_values(_x(1, 1, 4, 24), 2, 0), ValueError, r"group_size must be a positive multiple of 4"),
    (lambda: kv.KVConfig(group_size=48), ValueError, r"group_size=48 does not divide the residual_length.*\(64\)\. Use one of \[4, 8, 16, 32, 64\]"),
    (lambda: kv.KVConfig(group_size=32, residual_length=48), ValueError, r"group_size=32 does not divide the residual_length.*\(48\)"),
    (lambda: kv.KVConfig(group_size=True), ValueError, r"group_size must be a positive multiple of 4"),
    (lambda: kv.KVConfig("kiwi"), ValueError, r"method must be one of \('fp16', 'kivi', 'gear_l', 'gear'\)"),
    (lambda: kv.KVConfig(rank=-1), ValueError, r"rank must be an int >= 0"),
    (lambda: kv.KVConfig(rank_decode=1.5), ValueError, r"rank_decode must be an int >= 0"),
    (lambda: kv.KVConfig(iters=0), ValueError, r"iters must be an int >= 1"),
    (lambda: kv.gear_compress(_x(1, 1, 16, 8), "keys", 2, 8), ValueError, r"kind must be 'key'.*or 'value'"),
    (lambda: kv.fake_quantize_kv(_x(1, 1, 16, 8), "k", 2, 8), ValueError, r"kind must be 'key'"),
    (lambda: kv.gear_compress(_x(16, 8), "key", 2, 8), ValueError, r"\(batch, kv_heads, tokens, head_dim\)"),
    (lambda: kv.quantize_keys(torch.arange(64).reshape(1, 1, 8, 8), 2, 8), TypeError, r"must be floating point"),
    (lambda: kv.fake_quantize_kv(torch.ones(1, 1, 8, 8, dtype=torch.int32), "value", 2, 8), TypeError,
     r"floating point, got torch.int32"),
    (lambda: kv.gear_compress(torch.ones(1, 1, 8, 8, dtype=torch.int64), "key", 2, 8, rank=0, outlier_ratio=0),
     TypeError, r"floating point"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_rejected_with_a_clear_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kvconfig_defaults_and_labels():
    c = kv.KVConfig()
    assert (c.method, c.bits, c.group_size, c.rank, c.rank_decode, c.outlier_ratio, c.residual_length) == \
        ("gear", 2, 64, 4, 2, 0.02, 64)
    assert c.label == "gear 2b g64 r4/2 s2%"
    assert kv.KVConfig("fp16").label == "fp16"
    assert kv.KVConfig("kivi", bits=4, group_size=32).label == "kivi 4b g32"
    assert kv.KVConfig("kivi", bits=2, key_bits=4).label == "kivi K4V2 g64"
    assert kv.KVConfig("gear_l", rank=8, rank_decode=0).label == "gear_l 2b g64 r8/0"
    with pytest.raises(Exception):
        c.bits = 4  # frozen


# ----------------------------------------------------------------------------- which models


def _tiny_qwen2(**kw):
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, **kw))


def test_make_cache_rejects_an_unsupported_model_family():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"model_type='gpt2'"):
        kvcache.make_cache(gpt2, kv.KVConfig())
    assert isinstance(kvcache.make_cache(gpt2, None), DynamicCache)  # the reference cache works for any model


def test_make_cache_rejects_sliding_window_layers():
    with pytest.raises(ValueError, match=r"full attention in every layer.*sliding_attention"):
        kvcache.make_cache(_tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1), kv.KVConfig())
    # use_sliding_window with every layer below max_window_layers: all layers are full attention, so it is accepted
    assert kvcache.make_cache(_tiny_qwen2(use_sliding_window=True, sliding_window=8),
                        kv.KVConfig("kivi", group_size=16, residual_length=16)) is not None
    with pytest.raises(ValueError, match=r"sliding_attention"):
        kvcache.validate_model_supported(SimpleNamespace(config=Qwen2Config(
            num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])))


def test_make_cache_accepts_a_full_attention_qwen2():
    cache = kvcache.make_cache(_tiny_qwen2(), kv.KVConfig("kivi", group_size=16, residual_length=16))  # head_dim 16
    assert len(cache.layers) == 2 and all(isinstance(l, kvcache.CompressedLayer) for l in cache.layers)


def test_make_cache_checks_the_head_dim_against_the_group(smollm):
    model, _ = smollm
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the head_dim.*\(64\)"):
        kvcache.make_cache(model, kv.KVConfig(group_size=48, residual_length=96))
    layer = kvcache.CompressedLayer(kv.KVConfig(group_size=32))  # head_dim 40 reaches the layer: refused when caching
    with pytest.raises(ValueError, match=r"group_size=32 does not divide the head_dim.*\(40\)"):
        layer.update(randn(1, 1, 4, 40), randn(1, 1, 4, 40))


# ----------------------------------------------------------------------------- CompressedLayer on synthetic states


def _states(t, b=1, h=2, d=16, seed=0):
    # values that fp16 cannot represent exactly, to tell the full-precision path from the stored one
    return randn(b, h, t, d, seed=seed) + 1e-4, randn(b, h, t, d, seed=seed + 100) - 1e-4


def test_layer_prefill_attends_in_full_precision_and_compresses_whole_blocks():
    cfg = kv.KVConfig("kivi", bits=4, group_size=8, residual_length=16)
    layer = kvcache.CompressedLayer(cfg)
    k, v = _states(40)
    k_out, v_out = layer.update(k, v)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)  # this pass's own tokens: untouched
    assert layer.get_seq_length() == 40
    assert len(layer.key_blocks) == len(layer.value_blocks) == 1
    assert layer.key_blocks[0].D.shape == (1, 2, 32, 16)  # 2 whole residual blocks of 16, compressed as one
    assert layer.keys.shape == (1, 2, 8, 16) and layer.keys.dtype == torch.float16
    assert torch.equal(layer.keys, k[..., 32:, :].half()) and torch.equal(layer.values, v[..., 32:, :].half())
    ref_k = kv.gear_compress(k[..., :32, :].half().float(), "key", 4, 8, rank=0, outlier_ratio=0)
    ref_v = kv.gear_compress(v[..., :32, :].half().float(), "value", 4, 8, rank=0, outlier_ratio=0)
    assert torch.equal(layer.key_blocks[0].reconstruct(), ref_k.reconstruct())
    assert torch.equal(layer.value_blocks[0].reconstruct(), ref_v.reconstruct())

    k1, v1 = _states(1, seed=1)  # one decode step: compressed past + fp16 buffer + the new token in full
    k_out, v_out = layer.update(k1, v1)
    assert torch.equal(k_out, torch.cat([ref_k.reconstruct(), k[..., 32:, :].half().float(), k1], -2))
    assert torch.equal(v_out, torch.cat([ref_v.reconstruct(), v[..., 32:, :].half().float(), v1], -2))
    assert layer.get_seq_length() == 41 and layer.keys.shape[-2] == 9
    assert layer.get_mask_sizes(3) == (44, 0)


def test_layer_compresses_a_block_each_time_the_buffer_fills():
    cfg = kv.KVConfig("gear", bits=2, group_size=8, residual_length=16, rank=4, rank_decode=2, outlier_ratio=0.1)
    layer = kvcache.CompressedLayer(cfg)
    k, v = _states(40, seed=2)
    layer.update(k[..., :20, :], v[..., :20, :])  # buffer 20 -> one block of 16, 4 left
    assert [b.D.shape[-2] for b in layer.key_blocks] == [16] and layer.keys.shape[-2] == 4
    for i in range(20, 40):  # 20 decode steps: the buffer fills at 32 and compresses 16 more
        layer.update(k[..., i : i + 1, :], v[..., i : i + 1, :])
        held = sum(b.D.shape[-2] for b in layer.key_blocks) + layer.keys.shape[-2]
        assert held == layer.get_seq_length() == i + 1
        assert layer.keys.shape[-2] < cfg.residual_length
    assert [b.D.shape[-2] for b in layer.key_blocks] == [16, 16] and layer.keys.shape[-2] == 8
    first, later = layer.key_blocks
    assert first.L[0].shape[-1] == 4 and later.L[0].shape[-1] == 2  # prefill rank, then rank_decode
    assert first.S is not None and later.S is not None
    assert torch.allclose(later.reconstruct(), k[..., 16:32, :], atol=2.0)  # a coarse but real copy


def test_layer_rank_is_capped_by_the_block_and_key_bits_apply_to_keys():
    layer = kvcache.CompressedLayer(kv.KVConfig("gear_l", bits=2, key_bits=4, group_size=4, residual_length=4, rank=8))
    k, v = _states(4, d=8, seed=3)
    layer.update(k, v)
    kb, vb = layer.key_blocks[0], layer.value_blocks[0]
    assert kb.D.bits == 4 and vb.D.bits == 2
    assert kb.L[0].shape[-1] == 4 and kb.S is None  # min(rank 8, 4 tokens, 8 channels)


def test_fp16_layer_never_compresses():
    layer = kvcache.CompressedLayer(kv.KVConfig("fp16", group_size=8, residual_length=8))
    k, v = _states(30, seed=4)
    k_out, _ = layer.update(k, v)
    k_out2, _ = layer.update(k[..., :1, :], v[..., :1, :])
    assert layer.key_blocks == [] and layer.keys.shape[-2] == 31
    assert torch.equal(k_out2, torch.cat([k.half().float(), k[..., :1, :]], -2))
    assert layer.nbytes() == {"fp16 buffer": 2 * 31 * 2 * 16 * 2}


def test_layer_nbytes_sums_blocks_and_buffer_and_reset_starts_over():
    cfg = kv.KVConfig("gear", bits=2, group_size=8, residual_length=16, rank=2, outlier_ratio=0.1)
    layer = kvcache.CompressedLayer(cfg)
    assert layer.nbytes() == {} and layer.get_seq_length() == 0
    k, v = _states(37, seed=5)
    first = layer.update(k, v)
    parts = layer.nbytes()
    blocks = sum(sum(b.nbytes().values()) for b in layer.key_blocks + layer.value_blocks)
    assert sum(parts.values()) == blocks + 2 * 5 * 2 * 16 * 2  # + K and V buffers of 5 fp16 tokens
    assert set(parts) == {"fp16 buffer", "codes", "scales+minima", "outlier values", "outlier indices",
                          "low-rank factors"}
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.key_blocks == [] and layer.nbytes() == {}
    again = layer.update(k, v)
    assert torch.equal(again[0], first[0]) and layer.get_seq_length() == 37
    fresh = kvcache.CompressedLayer(cfg)
    fresh.update(k, v)
    assert torch.equal(fresh.key_blocks[0].reconstruct(), layer.key_blocks[0].reconstruct())


def test_layer_refuses_beam_search_cropping_and_batch_edits():
    layer = kvcache.CompressedLayer(kv.KVConfig("kivi", group_size=8, residual_length=8))
    layer.update(*_states(10))
    for call in (lambda: layer.reorder_cache(torch.tensor([0])), lambda: layer.crop(-1),
                 lambda: layer.batch_repeat_interleave(2), lambda: layer.batch_select_indices(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="num_beams=1"):
            call()


def test_compressed_cache_says_it_is_not_croppable():
    """generate() trusts is_croppable before cropping (DeferredStopCheck on mps): it must be False, as crop raises."""
    cache = Cache(layers=[kvcache.CompressedLayer(kv.KVConfig("kivi", group_size=8, residual_length=8))])
    assert not cache.is_croppable


# ----------------------------------------------------------------------------- inside transformers (smollm)


@pytest.fixture(scope="module")
def prompt(smollm):
    """40 WikiText-2 test tokens: the prompt of the generate tests."""
    return wikitext_windows(smollm[1], 1, 40)


@pytest.fixture(scope="module")
def reference(smollm, prompt):
    """Greedy generation of 8 tokens through transformers' DynamicCache: (tokens, the cache afterwards)."""
    model, tok = smollm
    cache = kvcache.make_cache(model, None)
    assert isinstance(cache, DynamicCache)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=cache,
                         pad_token_id=tok.pad_token_id)
    return out, cache


def _generate(smollm, prompt, config):
    model, tok = smollm
    cache = kvcache.make_cache(model, config)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=cache,
                         pad_token_id=tok.pad_token_id)
    return out, cache


def test_fp16_cache_generates_the_same_tokens_as_dynamic_cache(smollm, prompt, reference):
    out, cache = _generate(smollm, prompt, kv.KVConfig("fp16"))
    ref, ref_cache = reference
    assert out.shape == (1, 48) and torch.equal(out, ref)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 47  # the last token is never fed back
    assert all(l.key_blocks == [] and l.keys.shape[-2] == 47 for l in cache.layers)


@pytest.mark.parametrize("config", [kv.KVConfig("kivi", bits=4, group_size=16, residual_length=16),
                                    kv.KVConfig("gear", bits=2, group_size=16, residual_length=16)],
                         ids=["kivi4", "gear2"])
def test_compressed_cache_runs_through_generate(smollm, prompt, reference, config):
    model, _ = smollm
    out, cache = _generate(smollm, prompt, config)
    ref, ref_cache = reference
    assert out.shape == ref.shape and torch.equal(out[:, :40], prompt)
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:  # prefill 40: one block of 32 + 8 buffered, then 7 decode steps -> 15 buffered
        assert [b.D.shape for b in layer.key_blocks] == [(1, 3, 32, 64)]
        assert layer.keys.shape == (1, 3, 15, 64) and layer.keys.shape[-2] < config.residual_length
        assert layer.get_seq_length() == 47
    parts = kvcache.cache_nbytes(cache)
    assert sum(parts.values()) == sum(sum(l.nbytes().values()) for l in cache.layers)
    assert parts["fp16 buffer"] == 30 * 2 * 3 * 15 * 64 * 2
    assert parts["codes"] == 30 * 2 * 3 * 32 * 64 * config.bits // 8
    assert parts["scales+minima"] == 30 * 2 * 3 * 32 * 64 // 16 * 4
    if config.method == "kivi":
        assert torch.equal(out[:, 40:42], ref[:, 40:42])  # 4 bits: the first greedy tokens survive


def test_compressed_cache_refuses_beam_search_and_crop(smollm, prompt):
    model, tok = smollm
    cfg = kv.KVConfig("kivi", group_size=16, residual_length=16)
    _, cache = _generate(smollm, prompt[:, :20], cfg)
    with pytest.raises(NotImplementedError):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError):
        cache.crop(-2)
    with pytest.raises(NotImplementedError):
        model.generate(prompt[:, :20], max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=tok.pad_token_id,
                       past_key_values=kvcache.make_cache(model, cfg))


def test_generate_with_fp16_config_matches_the_reference(smollm):
    model, tok = smollm
    prompt = "The capital of France is"
    ref = kvcache.generate_with(model, tok, prompt, None, max_new_tokens=6)
    assert isinstance(ref, str) and ref
    assert kvcache.generate_with(model, tok, prompt, kv.KVConfig("fp16"), max_new_tokens=6) == ref


# ----------------------------------------------------------------------------- kv_perplexity (smollm)

PPL_ARGS = dict(n_windows=1, prefix=64, scored=64, chunk=16, progress=False)


@pytest.fixture(scope="module")
def ppl(smollm):
    """kv_perplexity of the reference, fp16 and KIVI 2-bit caches (computed once for the module)."""
    model, tok = smollm
    return {name: kvcache.kv_perplexity(model, tok, cfg, **PPL_ARGS)
            for name, cfg in (("dynamic", None), ("fp16", kv.KVConfig("fp16")), ("kivi2", kv.KVConfig("kivi", bits=2)))}


def test_kv_perplexity_fp16_matches_the_dynamic_cache(ppl):
    ref, fp16 = ppl["dynamic"], ppl["fp16"]
    assert math.isfinite(ref["ppl"]) and 1 < ref["ppl"] < 100
    assert fp16["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)
    assert fp16["method"] == "fp16" and ref["method"] == "fp (DynamicCache)"
    assert fp16["context"] == 128 and fp16["prefix"] == 64 and fp16["chunk"] == 16


def test_kv_perplexity_bytes_and_ratios(ppl):
    fp16_bytes = 128 * 23040  # 1 window x 128 stored tokens x 23040 bytes per token
    for r in ppl.values():
        assert r["fp16_bytes"] == fp16_bytes and r["kv_bytes"] == sum(r["parts"].values())
        assert r["ratio"] == r["kv_bytes"] / r["fp16_bytes"]
    assert abs(ppl["fp16"]["ratio"] - 1.0) < 1e-9 and ppl["fp16"]["parts"] == {"fp16 buffer": fp16_bytes}
    assert ppl["dynamic"]["ratio"] == 2.0  # the measured DynamicCache of a float32 model holds float32
    # KIVI 2-bit, groups of 64, residual 64: 128 tokens = 2 whole blocks, the buffer empty;
    # per element 2/8 bytes of codes + 4 bytes (scale, minimum) per 64 elements, against 2 bytes
    kivi = ppl["kivi2"]
    assert kivi["parts"]["fp16 buffer"] == 0
    assert kivi["ratio"] == pytest.approx((2 / 8 + 4 / 64) / 2) and kivi["ratio"] < 0.2


def test_kv_perplexity_two_bit_kivi_is_worse_than_fp16(ppl):
    assert ppl["kivi2"]["ppl"] > ppl["fp16"]["ppl"] * 1.001
    assert ppl["kivi2"]["ppl"] < 3 * ppl["fp16"]["ppl"]  # worse, not broken


def test_kv_perplexity_is_deterministic(smollm, ppl):
    model, tok = smollm
    again = kvcache.kv_perplexity(model, tok, kv.KVConfig("kivi", bits=2), **PPL_ARGS)
    assert again == ppl["kivi2"]
    cfg = kv.KVConfig("gear", bits=2, group_size=32, residual_length=32)
    args = dict(PPL_ARGS, prefix=64, scored=32)
    a, b = kvcache.kv_perplexity(model, tok, cfg, **args), kvcache.kv_perplexity(model, tok, cfg, **args)
    assert a == b and math.isfinite(a["ppl"])
    assert {"low-rank factors", "outlier values", "outlier indices"} <= set(a["parts"])


def test_kv_perplexity_builtin_quanto_cache(smollm):
    pytest.importorskip("optimum.quanto")
    model, tok = smollm
    r = kvcache.kv_perplexity(model, tok, "builtin-4", **PPL_ARGS)
    assert r["method"] == "builtin-4" and math.isfinite(r["ppl"]) and 1 < r["ppl"] < 100
    assert set(r["parts"]) == {"quantized (backend)", "fp buffer"} and r["parts"]["quantized (backend)"] > 0


def test_kv_perplexity_rejects_an_unknown_string(smollm):
    model, tok = smollm
    for bad in ("gear", "builtin-x", "builtin-2-token", "builtin-2-channel-3"):
        with pytest.raises(ValueError, match=rf"config must be a KVConfig, None, 'builtin-<bits>' or "
                                             rf"'builtin-<bits>-channel', got '{bad}'"):
            kvcache.kv_perplexity(model, tok, bad, **PPL_ARGS)


def test_builtin_cache_key_axis(smollm):
    """Issue 24, item 24: transformers' QuantizedCache defaults to axis_key=0 (a scale per token for keys);
    'builtin-<bits>-channel' sets axis_key=-1 (per channel, KIVI's layout), which is what lab 06 compares."""
    pytest.importorskip("optimum.quanto")
    model, tok = smollm
    assert kvcache.new_cache(model, "builtin-2").layers[0].axis_key == 0
    assert kvcache.new_cache(model, "builtin-2-channel").layers[0].axis_key == -1
    with pytest.raises(ValueError, match="axis_key must be 0"):
        kvcache.builtin_quantized_cache(model, 2, axis_key=1)


def test_power_iteration_and_bits_reject_bad_arguments():
    """iters < 1 and non-int bits get a clear error, not a crash deep inside."""
    R = torch.randn(16, 8)
    with pytest.raises(ValueError, match="iters"):
        kv.lowrank_power_iteration(R, 2, iters=0)
    with pytest.raises(ValueError, match="bits"):
        kv.KVConfig("kivi", bits=4.0)
    with pytest.raises(ValueError, match="bits"):
        kv.quantize_values(torch.randn(1, 1, 4, 16), 4.0, 16)


def test_outlier_share_is_what_is_kept_not_what_is_asked():
    """Issue 24, item 9: "2 %" GEAR outliers keep 1 + 1 of every 64-entry vector, 3.125 %; the bits follow."""
    assert kv.outlier_share(64, 0.02) == 2 / 64 == 0.03125
    assert kv.outlier_share(512, 0.02) == 10 / 512 and kv.outlier_share(64, 0.0) == 0.0
    x = torch.randn(3, 64)
    assert kv.outlier_mask(x, 0.02, -1).float().mean().item() == kv.outlier_share(64, 0.02)
    bits = kv.outlier_share(64, 0.02) * (2 + kv.index_bytes(64)) * 8  # fp16 value + position, per entry
    assert bits == 0.75


# ----------------------------------------------------------------------------- batches through a compressed cache


def test_unpadded_batches_group_equal_lengths():
    from compresslab.evaluation import unpadded_batches

    assert unpadded_batches([5, 7, 5, 5, 7, 9], 2) == [[0, 2], [3], [1, 4], [5]]
    assert unpadded_batches([], 4) == []


def test_batched_generation_never_puts_padding_into_a_compressed_cache(smollm):
    """Issue 24, item 3: left padding put pad tokens into the groups (min/max, outliers, low-rank fit) of the
    compressed cache. With a cache_factory, generate_batch batches prompts of one length only: every real token's
    compressed state equals the prompt's state generated alone; the old left-padded batch's differs."""
    from compresslab.evaluation import generate_batch

    model, tok = smollm
    cfg = kv.KVConfig("kivi", bits=2)
    prompts = [tok.decode(wikitext_windows(tok, 1, n)[0]) for n in (80, 70)]
    lengths = [len(tok(p).input_ids) for p in prompts]
    assert lengths[0] > lengths[1] >= 64  # the first block (64 tokens) is compressed at prefill
    caches, masks = [], []
    generate = model.generate

    def recording(**kw):
        masks.append(kw["attention_mask"])
        return generate(**kw)

    def factory():
        caches.append(kvcache.make_cache(model, cfg))
        return caches[-1]

    model.generate = recording
    try:
        batched = generate_batch(model, tok, prompts + prompts[:1], 3, batch_size=4, progress=False,
                                 cache_factory=factory)
    finally:
        del model.generate
    assert all(bool(m.all()) for m in masks) and [m.shape[0] for m in masks] == [2, 1]  # no padding anywhere
    alone = [generate_batch(model, tok, [p], 3, progress=False, cache_factory=factory) for p in prompts]
    assert batched == [a[0] for a in alone] + [alone[0][0]]

    def first_keys(cache, row):  # layer 0's first compressed key block, one sequence (h, 64, d)
        return cache.layers[0].key_blocks[0].reconstruct(torch.float32)[row]

    torch.testing.assert_close(first_keys(caches[0], 0), first_keys(caches[2], 0), atol=1e-4, rtol=0)
    # the old way: a left-padded batch of both prompts; the shorter one's first block mixes pads and real tokens
    enc = tok(prompts, return_tensors="pt", padding=True)
    padded = kvcache.make_cache(model, cfg)
    model.generate(**enc, max_new_tokens=1, do_sample=False, past_key_values=padded, pad_token_id=tok.pad_token_id)
    pad = lengths[0] - lengths[1]
    ref = kvcache.make_cache(model, cfg)
    model.generate(**tok(prompts[1:], return_tensors="pt"), max_new_tokens=1, do_sample=False, past_key_values=ref,
                   pad_token_id=tok.pad_token_id)
    got = padded.layers[0].key_blocks[0].reconstruct(torch.float32)[1][:, pad:]  # its real tokens in block 0
    want = ref.layers[0].key_blocks[0].reconstruct(torch.float32)[0][:, : 64 - pad]
    assert (got - want).abs().max() > 1e-2  # contaminated: why the batches above hold one length only


def test_probe_with_align_compresses_the_question_too(smollm):
    """Issue 24, item 4: a ~98-token 4-shot prompt left its last 34 tokens (the question) in the fp16 buffer, so
    the probe "through the cache" never read a compressed question. align=64 keeps the last 64k prompt tokens: the
    whole prompt is compressed at prefill and only the generated tokens sit in the buffer."""
    from compresslab.evaluation import arithmetic_prompts, arithmetic_probe

    model, tok = smollm
    caches = []

    def factory():
        caches.append(kvcache.make_cache(model, kv.KVConfig("kivi", bits=4)))
        return caches[-1]

    acc, details = arithmetic_probe(model, tok, n=3, shots=4, progress=False, cache_factory=factory, align=64,
                                    return_details=True)
    lengths = [len(tok(p).input_ids) for p, _ in arithmetic_prompts(3, shots=4)]
    assert all(n % 64 > 0 for n in lengths)  # unaligned, the question would have stayed in the buffer
    for cache in caches:
        layer = cache.layers[0]
        compressed = sum(b.reconstruct().shape[-2] for b in layer.key_blocks)
        assert compressed >= 64 and layer.keys.shape[-2] <= 4 - 1  # the buffer holds generated tokens only
    assert 0 <= acc <= 1 and len(details) == 3
    with pytest.raises(ValueError, match="shorter than align=512"):
        arithmetic_probe(model, tok, n=1, shots=1, progress=False, align=512)
    with pytest.raises(ValueError, match="align must be a positive int"):
        arithmetic_probe(model, tok, n=1, progress=False, align=0)


# ----------------------------------------------------------------------------- judging a layout by the attention


def test_layer_qkv_reproduces_the_models_attention(smollm, prompt):
    """q, k, v from layer_qkv give exactly the attention output the model feeds o_proj (so the errors below are the
    errors the model would see)."""
    model, _ = smollm
    q, k, v = kvcache.layer_qkv(model, prompt, 3)
    assert q.shape == (1, 9, 40, 64) and k.shape == v.shape == (1, 3, 40, 64)
    seen = {}
    h = model.model.layers[3].self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with torch.no_grad():
        model(prompt)
    h.remove()
    rep = lambda x: x.repeat_interleave(3, dim=1)  # noqa: E731
    p = (q @ rep(k).mT / 8).masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    out = (p @ rep(v)).transpose(1, 2).reshape(1, 40, 576)
    torch.testing.assert_close(out, seen["x"].float(), atol=1e-4, rtol=1e-4)
    exact = kvformat.attention_error(q, k, v, k, v)
    assert exact == {"scores": 0.0, "output": 0.0}


def test_attention_error_decides_kivis_layout(smollm):
    """Issue 24, item 25: the layout argument is about the attention, not ‖V̂ − V‖. On the real cache at 2 bits,
    per-channel keys give smaller score and output errors than per-token keys; per-token values a smaller output
    error than per-channel values."""
    model, tok = smollm
    q, k, v = kvcache.layer_qkv(model, wikitext_windows(tok, 1, 256), 15)
    per_channel = lambda x: kv.quantize_groups(x, 2, 64, dim=-2).dequantize(torch.float32)  # noqa: E731
    per_token = lambda x: kv.quantize_groups(x, 2, 64, dim=-1).dequantize(torch.float32)  # noqa: E731
    keys_ch, keys_tok = (kvformat.attention_error(q, k, v, f(k), v) for f in (per_channel, per_token))
    vals_tok, vals_ch = (kvformat.attention_error(q, k, v, k, f(v)) for f in (per_token, per_channel))
    assert keys_ch["scores"] < keys_tok["scores"] and keys_ch["output"] < keys_tok["output"]
    assert vals_tok["scores"] == vals_ch["scores"] == 0.0 and vals_tok["output"] < vals_ch["output"]
    with pytest.raises(ValueError, match="must share one shape"):
        kvformat.attention_error(q, k, v, k[..., :32], v)
    with pytest.raises(ValueError, match="does not fit k"):
        kvformat.attention_error(q[:, :4], k, v, k, v)
