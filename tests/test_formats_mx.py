"""Unit tests of compresslab.formats' microscaled FP4 emulations (NVFP4, MXFP4) and bits_per_element (< 5 s)."""

import pytest
import torch

from compresslab import formats

E2M1 = torch.tensor(formats.E2M1_MAGNITUDES)  # (8,) magnitudes 0 .. 6
E4M3 = formats.grid("fp8_e4m3").float()  # every finite E4M3 value


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_e2m1(n_blocks, block, seed):
    """(n_blocks, block) random E2M1 values, each block holding a ±6 so that its amax is exactly 6."""
    g = torch.Generator().manual_seed(seed)
    mags = E2M1[torch.randint(0, 8, (n_blocks, block), generator=g)]
    signs = torch.randint(0, 2, (n_blocks, block), generator=g) * 2 - 1
    values = mags * signs
    values[:, 3] = 6.0 * signs[:, 3]
    return values


def is_e2m1(x):
    return torch.isin(x.abs(), E2M1).all().item()


# ----------------------------------------------------------------------------- round_to_e2m1


def test_round_to_e2m1_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 1e6, -0.75, -5.0, -1e6])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -1.0, -4.0, -6.0])
    assert torch.equal(formats.round_to_e2m1(x), want)


def _nearest_e2m1_ties_to_even(x):
    """The definition, as a search: the nearest of E2M1's 8 magnitudes, a tie to the even code, NaN/inf to 6."""
    mags = torch.tensor(formats.E2M1_MAGNITUDES)
    mids = (mags[1:] + mags[:-1]) / 2
    a = x.abs().clamp(max=6.0)
    code = torch.bucketize(a, mids)  # NaN lands past the last boundary: code 7
    tie = (code < len(mids)) & (a == mids[code.clamp(max=len(mids) - 1)])
    return torch.copysign(mags[code + (tie & (code % 2 == 1)).long()], x)


def test_round_to_e2m1_equals_the_search_bit_for_bit():
    """Every float32 within 2^16 ulps of each decision boundary (the midpoints, the step changes at 2 and 4, the
    saturation at 6, zero), both signs, plus random values, inf, NaN and subnormals: the same bits as the search."""
    points = [0.0, 0.25, 0.75, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0]
    bits = torch.cat([torch.tensor(p).view(torch.int32) + torch.arange(-(2**16), 2**16 + 1, dtype=torch.int32)
                      for p in points])
    x = bits[bits >= 0].view(torch.float32)  # (nonnegative bit patterns: the floats around each point)
    x = torch.cat([x, -x, randn(100_000, seed=4, scale=4.0),
                   torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 0.0, -0.0])])
    got, want = formats.round_to_e2m1(x), _nearest_e2m1_ties_to_even(x)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_round_to_e2m1_is_the_nearest_grid_value():
    x = randn(4096, seed=1, scale=3.0)
    out = formats.round_to_e2m1(x)
    grid = formats.grid("fp4_e2m1").float()
    best = (x.clamp(-6, 6)[:, None] - grid).abs().amin(dim=1)
    assert torch.allclose((x.clamp(-6, 6) - out).abs(), best)


# ----------------------------------------------------------------------------- NVFP4


def test_nvfp4_reproduces_values_already_on_its_grid():
    s_t = 2.0**-10  # a power-of-two tensor scale keeps every product exact
    block_scales = E4M3[E4M3 > 0][torch.randperm(126, generator=torch.Generator().manual_seed(2))[:24]]
    block_scales[5] = 448.0  # the largest block: amax = 6 * 448 * s_t, so the tensor scale comes out as s_t
    w = (random_e2m1(24, 16, seed=3) * block_scales[:, None] * s_t).reshape(6, 64)
    q = formats.nvfp4_quantize(w)
    assert q.tensor_scale == s_t
    assert torch.equal(q.block_scales[:, 0], block_scales)
    assert torch.equal(q.dequantize(), w)


def test_nvfp4_parts_are_e4m3_scales_and_e2m1_elements():
    w = randn(32, 96, seed=4, scale=0.02)
    q = formats.nvfp4_quantize(w)
    assert q.elements.shape == (32 * 96 // 16, 16) and q.block_scales.shape == (32 * 96 // 16, 1)
    assert torch.equal(q.block_scales.to(torch.float8_e4m3fn).float(), q.block_scales)  # exact E4M3 values
    assert q.block_scales.max() == 448.0  # the tensor scale maps the largest block onto E4M3's top
    assert q.tensor_scale == pytest.approx(w.abs().max().item() / (448 * 6), rel=1e-6)
    assert is_e2m1(q.elements) and q.elements.abs().max() == 6.0
    assert torch.equal(q.dequantize(), (q.elements * q.block_scales * q.tensor_scale).reshape(w.shape))
    assert q.dequantize().shape == w.shape and rel_error(q.dequantize(), w) < 0.15


def naive_nvfp4(w):
    """NVFP4 without the per-tensor scale: block amax / 6 cast straight to E4M3 (saturating at 448)."""
    blocks = w.float().reshape(-1, 16)
    scales = (blocks.abs().amax(-1, keepdim=True) / 6).clamp(max=448).to(torch.float8_e4m3fn).float()
    x = torch.where(scales > 0, blocks / scales, torch.zeros_like(blocks))
    return (formats.round_to_e2m1(x) * scales).reshape(w.shape)


@pytest.mark.parametrize("magnitude", [2.0**-12, 2.0**-6, 1.0, 2.0**12])
def test_nvfp4_error_does_not_depend_on_magnitude_unlike_without_the_tensor_scale(magnitude):
    w = randn(64, 128, seed=5)
    reference = rel_error(formats.nvfp4_quantize(w).dequantize(), w)
    scaled = w * magnitude  # a power of two: the exact same problem, shifted in exponent
    assert rel_error(formats.nvfp4_quantize(scaled).dequantize(), scaled) == pytest.approx(reference, rel=1e-6)
    naive = rel_error(naive_nvfp4(scaled), scaled)
    if magnitude in (2.0**-12, 2.0**12):  # tiny weights: subnormal scales; large ones: saturated at 448
        assert naive > 2 * reference, (naive, reference)


def test_nvfp4_zero_tensor_and_underflowing_blocks_give_zeros_not_nan():
    assert torch.equal(formats.nvfp4_quantize(torch.zeros(4, 32)).dequantize(), torch.zeros(4, 32))
    w = torch.full((2, 16), 1e-12)
    w[0] = 1e6  # the second block's scale is far below E4M3's smallest subnormal
    q = formats.nvfp4_quantize(w).dequantize()
    assert torch.isfinite(q).all() and torch.equal(q[1], torch.zeros(16))


# ----------------------------------------------------------------------------- MXFP4


def test_mxfp4_reproduces_values_already_on_its_grid():
    exponents = torch.randint(-20, 20, (12, 1), generator=torch.Generator().manual_seed(6))
    scales = torch.ldexp(torch.ones(12, 1), exponents)
    w = (random_e2m1(12, 32, seed=7) * scales).reshape(4, 96)  # block amax = 6 * 2^e: floor(log2) - 2 = e
    q = formats.mxfp4_quantize(w)
    assert torch.equal(q.block_scales, scales) and q.tensor_scale == 1.0
    assert torch.equal(q.dequantize(), w)


def test_mxfp4_scales_are_powers_of_two_by_the_spec():
    w = randn(16, 256, seed=8, scale=0.02)
    q = formats.mxfp4_quantize(w)
    mantissa, exponent = torch.frexp(q.block_scales)
    assert (mantissa == 0.5).all()  # 2^k exactly
    amax = w.reshape(-1, 32).abs().amax(-1, keepdim=True)
    assert torch.equal(exponent - 1, torch.floor(torch.log2(amax)).int() - 2)  # OCP MX: floor(log2 amax) - emax
    assert is_e2m1(q.elements)
    assert rel_error(q.dequantize(), w) < 0.2


def test_mxfp4_clips_a_block_max_above_six_times_the_scale():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 7.5, 1.0  # floor(log2 7.5) - 2 = 0: scale 1, and 7.5 is beyond E2M1's 6
    q = formats.mxfp4_quantize(w)
    assert q.block_scales.item() == 1.0
    assert q.dequantize()[0, 0] == 6.0 and q.dequantize()[0, 1] == 1.0


def naive_mxfp4(w):
    """A wrong MXFP4: scale 2^floor(log2 amax), forgetting E2M1's emax of 2, so only [-2, 2) of the grid is used."""
    blocks = w.float().reshape(-1, 32)
    scales = torch.exp2(torch.floor(torch.log2(blocks.abs().amax(-1, keepdim=True))))
    return (formats.round_to_e2m1(blocks / scales) * scales).reshape(w.shape)


def test_mxfp4_beats_a_scale_that_ignores_the_element_range():
    w = randn(64, 256, seed=9)
    assert rel_error(formats.mxfp4_quantize(w).dequantize(), w) < 0.5 * rel_error(naive_mxfp4(w), w)


def test_mxfp4_all_zero_block_and_tiny_values():
    w = torch.zeros(2, 32)
    w[1] = 1e-40  # subnormal float32: the exponent clamps to E8M0's range, nothing is NaN
    q = formats.mxfp4_quantize(w)
    assert torch.isfinite(q.dequantize()).all() and torch.equal(q.dequantize()[0], torch.zeros(32))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn, block", [(formats.nvfp4_quantize, 16), (formats.mxfp4_quantize, 32)])
def test_last_dim_not_a_multiple_of_the_block_is_refused_with_the_fix(fn, block):
    with pytest.raises(ValueError, match=rf"multiple of {block}.*Pad the last dim"):
        fn(torch.randn(4, block + 8))
    with pytest.raises(ValueError, match=f"multiple of {block}"):
        fn(torch.randn(block * 4, 8))  # the last dim is the one blocked, even if the total would fit


@pytest.mark.parametrize("fn", [formats.nvfp4_quantize, formats.mxfp4_quantize])
def test_non_float_and_non_finite_input_are_refused(fn):
    with pytest.raises(TypeError, match="floating point"):
        fn(torch.ones(2, 32, dtype=torch.int32))
    bad = torch.randn(2, 32)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        fn(bad)


@pytest.mark.parametrize("fn", [formats.nvfp4_quantize, formats.mxfp4_quantize])
def test_keeps_shape_and_accepts_half_precision(fn):
    w = randn(2, 3, 64, seed=10).to(torch.bfloat16)
    out = fn(w).dequantize()
    assert out.shape == w.shape and out.dtype == torch.float32


# ----------------------------------------------------------------------------- bits per weight


def test_bits_per_element():
    assert formats.bits_per_element("nvfp4") == 4.5  # 4 + 8/16
    assert formats.bits_per_element("mxfp4") == 4.25  # 4 + 8/32
    assert formats.bits_per_element("nf4 g64 (bitsandbytes)") == 4.5  # 4 + 32/64
    assert formats.bits_per_element("int4 sym g64") == 4.25  # 4 + 16/64
    assert formats.bits_per_element("int4 asym g64") == 4 + 24 / 64  # fp16 scale + 8-bit zero, as QuantLinear
    assert formats.bits_per_element("int4 asym g64, 4-bit zero") == 4 + 20 / 64
    assert formats.bits_per_element("int4 asym g64, fp16 zero") == 4.5
    with pytest.raises(ValueError, match="unknown format"):
        formats.bits_per_element("nvfp8")


def test_codebook_quantize_with_an_fp16_scale_stays_on_the_grid():
    w = randn(8, 128, seed=11, scale=0.02)
    levels = formats.grid("nf4")
    out = formats.codebook_quantize(w, levels, 64, scale_dtype=torch.float16)
    scale = (w.reshape(-1, 64).abs().amax(-1, keepdim=True) / levels.abs().max()).half().float()
    on_grid = (out.reshape(-1, 64) / scale).double()[..., None] - levels
    assert (on_grid.abs().amin(-1) < 1e-5).all()
