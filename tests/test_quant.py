"""Unit tests of compresslab.quant, compresslab.formats and compresslab.runtime (no model, no notebook: < 10 s)."""

import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compresslab import evaluation
from compresslab import formats, quant, runtime

ALL_BITS = [2, 3, 4, 5, 6, 7, 8]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------- compute_qparams


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_qparams_shapes_and_dtype(bits, sym):
    x = randn(12, 64, scale=0.05)
    scale, zero = quant.compute_qparams(x, bits, sym)
    assert scale.shape == zero.shape == (12, 1)
    assert scale.dtype == zero.dtype == torch.float32
    assert (scale > 0).all()
    assert torch.equal(zero, zero.round())  # the zero point is an integer code
    qmin, qmax = quant.qrange(bits, sym)
    assert ((zero >= qmin) & (zero <= qmax)).all()
    if sym:
        assert (zero == 0).all()


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shift", [0.0, 1.0, -1.0], ids=["mixed", "positive", "negative"])
def test_zero_is_exactly_representable(bits, sym, shift):
    x = randn(8, 32, seed=1, scale=0.05) + shift  # shifted: one-signed groups too
    scale, zero = quant.compute_qparams(x, bits, sym)
    q0 = quant.quantize(torch.zeros_like(x), scale, zero, bits, sym)
    assert torch.equal(quant.dequantize(q0, scale, zero), torch.zeros_like(x))


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_all_zero_group_gives_a_finite_scale(sym):
    x = torch.cat([randn(2, 16), torch.zeros(1, 16)])
    scale, zero = quant.compute_qparams(x, 4, sym)
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all() and (scale > 0).all()
    w_hat = quant.fake_quantize(x, 4, 16, sym)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[2], torch.zeros(16))


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_error_at_most_half_a_step_per_group(bits, sym):
    w = randn(16, 128, seed=2, scale=0.05)
    w[3, 5] = 1.0  # an outlier: its group's step is large, the others' are not
    w[7] += 0.2  # an all-positive group row
    group_size = 32
    scale, _ = quant.compute_qparams(quant.group_view(w, group_size), bits, sym)  # (n_groups, 1)
    err = (quant.fake_quantize(w, bits, group_size, sym) - w).reshape(-1, group_size).abs()  # (n_groups, g)
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-7).all(), (err / scale).max()


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_more_bits_much_less_error(sym):
    w = randn(64, 256, seed=3)
    errors = {b: rel_error(quant.fake_quantize(w, b, 64, sym), w) for b in (2, 3, 4, 8)}
    assert errors[8] < errors[4] / 10
    assert errors[8] < errors[4] < errors[3] < errors[2]


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_codes_stay_in_range(bits, sym):
    x = randn(8, 64, seed=4)
    scale, zero = quant.compute_qparams(x * 0.3, bits, sym)  # calibrated on a narrower range: x saturates
    q = quant.quantize(x, scale, zero, bits, sym)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert quant.qrange(bits, sym) == (lo, hi)
    assert int(q.min()) == lo and int(q.max()) == hi  # both ends reached, none passed
    q_in = quant.quantize(x, *quant.compute_qparams(x, bits, sym), bits, sym)
    assert int(q_in.min()) >= lo and int(q_in.max()) <= hi


# ----------------------------------------------------------------------------- fake_quantize


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [32, "channel", -1, "tensor"], ids=str)
def test_fake_quantize_keeps_shape_and_dtype(dtype, group_size):
    for shape in [(16, 64), (2, 3, 64)]:
        w = randn(*shape, seed=5).to(dtype)
        w_hat = quant.fake_quantize(w, 4, group_size)
        assert w_hat.shape == w.shape and w_hat.dtype == dtype
        assert rel_error(w_hat, w) < 0.2


def test_fake_quantize_granularities():
    w = randn(8, 64, seed=6)

    def by_rows(rows):  # the reference: quantize-dequantize each row of rows with its own (scale, zero)
        s, z = quant.compute_qparams(rows, 4)
        return quant.dequantize(quant.quantize(rows, s, z, 4), s, z)

    assert torch.equal(quant.fake_quantize(w, 4, "tensor"), by_rows(w.reshape(1, -1)).reshape(w.shape))
    assert torch.equal(quant.fake_quantize(w, 4, "channel"), by_rows(w))
    assert torch.equal(quant.fake_quantize(w, 4, -1), by_rows(w))
    assert torch.equal(quant.fake_quantize(w, 4, 64), by_rows(w))  # group == in_features is per-channel
    assert torch.equal(quant.fake_quantize(w, 4, 16), by_rows(w.reshape(-1, 16)).reshape(w.shape))
    # groups are consecutive columns: changing one column-block only moves that block's output
    w2 = w.clone()
    w2[:, :16] *= 10
    assert torch.equal(quant.fake_quantize(w2, 4, 16)[:, 16:], quant.fake_quantize(w, 4, 16)[:, 16:])
    assert not torch.equal(quant.fake_quantize(w2, 4, "channel")[:, 16:], quant.fake_quantize(w, 4, "channel")[:, 16:])


def test_fake_quantize_bfloat16_matches_float32_path():
    w = randn(8, 64, seed=7).to(torch.bfloat16)
    assert torch.equal(quant.fake_quantize(w, 4, 32), quant.fake_quantize(w.float(), 4, 32).to(torch.bfloat16))


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [3, 4])
def test_smaller_groups_less_error(bits, sym):
    w = randn(128, 1024, seed=8)
    sizes = ["tensor", "channel", 256, 64, 16]
    errors = [rel_error(quant.fake_quantize(w, bits, g, sym), w) for g in sizes]
    assert all(a >= b for a, b in zip(errors, errors[1:])), dict(zip(sizes, errors))
    assert errors[-1] < 0.8 * errors[1]


# ----------------------------------------------------------------------------- bad input


BAD_BITS = [1, 9, 16, 4.0, True, "4", None]
W576 = randn(4, 576, seed=9)


def _linear(in_f=64, out_f=16):
    return nn.Linear(in_f, out_f)


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
@pytest.mark.parametrize("call", [
    lambda b: quant.validate_bits(b),
    lambda b: quant.compute_qparams(randn(2, 8), b),
    lambda b: quant.fake_quantize(randn(2, 8), b, 8),
    lambda b: quant.QuantLinear.from_linear(_linear(), b, 16),
    lambda b: quant.fake_quantize_model(nn.Sequential(_linear()), b, 16),
    lambda b: quant.quantize_model(nn.Sequential(_linear()), b, 16),
], ids=["validate_bits", "compute_qparams", "fake_quantize", "from_linear", "fake_quantize_model", "quantize_model"])
def test_bad_bits(call, bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        call(bits)


def test_bad_bits_message_names_the_alternatives():
    with pytest.raises(ValueError) as info:
        quant.fake_quantize(randn(2, 8), 16, 8)
    assert "got 16" in str(info.value) and "bfloat16" in str(info.value)


@pytest.mark.parametrize("call", [
    lambda: quant.fake_quantize(W576, 4, 128),
    lambda: quant.group_view(W576, 128),
    lambda: quant.QuantLinear.from_linear(nn.Linear(576, 8), 4, 128),
    lambda: quant.fake_quantize_model(nn.Sequential(nn.Linear(576, 8)), 4, 128),
    lambda: formats.codebook_quantize(W576, formats.grid("nf4"), 128),
], ids=["fake_quantize", "group_view", "from_linear", "fake_quantize_model", "codebook_quantize"])
def test_group_size_that_does_not_divide(call):
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert "does not divide" in msg and "in_features=576" in msg and "64" in msg


@pytest.mark.parametrize("group_size", [0, -3, "row", 2.5, True, None], ids=repr)
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size must be"):
        quant.fake_quantize(randn(4, 64), 4, group_size)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("call", [
    lambda x: quant.compute_qparams(x, 4),
    lambda x: quant.fake_quantize(x, 4, 8),
    lambda x: formats.codebook_quantize(x, formats.grid("nf4"), 8),
], ids=["compute_qparams", "fake_quantize", "codebook_quantize"])
def test_integer_input_is_refused(call, dtype):
    x = torch.ones(2, 8, dtype=dtype)
    with pytest.raises(TypeError, match="floating point"):
        call(x)


def test_non_tensor_input_is_refused():
    with pytest.raises(TypeError, match="torch.Tensor"):
        quant.fake_quantize([[0.1, 0.2]], 4, 2)


@pytest.mark.parametrize("q, bits, match", [
    (torch.zeros(2, 3, dtype=torch.uint8), 4, "multiple of 2"),
    (torch.zeros(5, dtype=torch.uint8), 4, "multiple of 2"),
    (torch.zeros(6, dtype=torch.uint8), 2, "multiple of 4"),
    (torch.tensor([16, 0]), 4, r"\[0, 15\]"),
    (torch.tensor([4, 0, 0, 0]), 2, r"\[0, 3\]"),
    (torch.tensor([-1, 0]), 4, "shift symmetric codes"),
    (torch.tensor([256]), 8, r"\[0, 255\]"),
    (torch.zeros(8, dtype=torch.uint8), 3, "one per byte"),
    (torch.zeros(8, dtype=torch.uint8), 1, "bits=1"),
], ids=["odd-4bit-2d", "odd-4bit-1d", "not-x4-2bit", "16-4bit", "4-2bit", "negative", "256-8bit", "3bit", "1bit"])
def test_pack_bits_bad_input(q, bits, match):
    with pytest.raises(ValueError, match=match):
        quant.pack_bits(q, bits)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.float32], ids=str)
def test_unpack_needs_uint8(dtype):
    with pytest.raises(TypeError, match="uint8"):
        quant.unpack_bits(torch.zeros(2, 4, dtype=dtype), 4)
    with pytest.raises(TypeError, match="uint8"):
        quant.unpack_int4(torch.zeros(2, 4, dtype=dtype))


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 5, 8), (1, 1, 1, 64)], ids=str)
def test_pack_unpack_round_trip(bits, shape):
    q = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(10), dtype=torch.int64)
    packed = quant.pack_bits(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    unpacked = quant.unpack_bits(packed, bits)
    assert unpacked.dtype == torch.uint8 and unpacked.shape == q.shape
    assert torch.equal(unpacked.long(), q)
    if bits == 4:
        assert torch.equal(quant.pack_int4(q), packed)
        assert torch.equal(quant.unpack_int4(packed).long(), q)


def test_pack_layout_low_bits_first():
    assert torch.equal(quant.pack_int4(torch.tensor([1, 2])), torch.tensor([0x21], dtype=torch.uint8))
    assert torch.equal(quant.pack_int4(torch.tensor([[15, 0, 0, 15]])), torch.tensor([[0x0F, 0xF0]], dtype=torch.uint8))
    assert torch.equal(quant.pack_bits(torch.tensor([1, 2, 3, 0]), 2), torch.tensor([0b00111001], dtype=torch.uint8))
    assert torch.equal(quant.pack_bits(torch.tensor([7, 255]), 8), torch.tensor([7, 255], dtype=torch.uint8))
    assert torch.equal(quant.unpack_int4(torch.tensor([0x21], dtype=torch.uint8)), torch.tensor([1, 2], dtype=torch.uint8))


# ----------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, "channel"], ids=str)
def test_quant_linear_matches_fake_quantize(bits, sym, group_size):
    torch.manual_seed(11)
    lin = nn.Linear(128, 48)
    ql = quant.QuantLinear.from_linear(lin, bits, group_size, sym)
    x = randn(5, 128, seed=12)
    w = lin.weight.detach()
    w_fake = quant.fake_quantize(w, bits, group_size, sym)
    exact, expected = F.linear(x, w, lin.bias), F.linear(x, w_fake, lin.bias)
    out = ql(x)
    assert out.shape == (5, 48)
    # Scales are stored in float16, and the codes are computed against that scale: a few codes move by one step
    # (values that sat near a rounding boundary). At 2-3 bits one step is large, so the tolerance is 1 % of the
    # output plus a tenth of the quantization error itself.
    assert (out - expected).norm() <= 1e-2 * expected.norm() + 0.1 * (expected - exact).norm()
    w_hat = ql.dequantized_weight()
    assert w_hat.shape == (48, 128) and w_hat.dtype == torch.float32
    assert ql.dequantized_weight(torch.float16).dtype == torch.float16
    scale, _ = quant.compute_qparams(quant.group_view(w, group_size), bits, sym)  # (n_groups, 1)
    steps = (w_hat - w_fake).reshape(scale.shape[0], -1).abs() / scale  # (n_groups, g): difference in steps
    assert (steps <= 1.002).all()  # never more than one step apart
    assert (steps > 0.25).float().mean() <= 0.05  # and only rarely a whole step (most often at 8 bits: big codes)
    assert torch.equal(ql.bias, lin.bias)
    n_groups = 128 // 32 if group_size == 32 else 1
    assert ql.qweight.dtype == torch.uint8 and ql.scales.dtype == torch.float16 and ql.zeros.dtype == torch.uint8
    assert ql.scales.shape == ql.zeros.shape == (48, n_groups)
    per_byte = 8 // bits if bits in (2, 4, 8) else 1
    assert ql.qweight.numel() * ql.qweight.element_size() == 48 * 128 // per_byte
    assert ql.qweight.shape == (48, 128 // per_byte)
    if bits == 4:
        assert ql.qweight.numel() == 128 * 48 / 2
        assert torch.equal(quant.pack_int4(quant.unpack_int4(ql.qweight)), ql.qweight)


def test_quant_linear_without_bias_and_nonlinear_buffers():
    lin = nn.Linear(64, 8, bias=False)
    ql = quant.QuantLinear.from_linear(lin, 4, 16)
    assert ql.bias is None
    assert set(dict(ql.named_buffers())) == {"qweight", "scales", "zeros"}
    assert [n for n, _ in ql.named_parameters()] == []  # nothing trainable: the weight is the packed buffer
    x = randn(3, 64)
    assert torch.allclose(ql(x), x @ ql.dequantized_weight().t())


def test_quant_linear_all_zero_rows_stay_zero():
    lin = nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        lin.weight[1] = 0
    ql = quant.QuantLinear.from_linear(lin, 4, 16)
    assert torch.equal(ql.dequantized_weight()[1], torch.zeros(32))
    assert torch.isfinite(ql.scales.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quant_linear_half_precision_with_bias(dtype):
    lin = nn.Linear(64, 16).to(dtype)
    ql = quant.QuantLinear.from_linear(lin, 4, 32)
    x = randn(2, 64).to(dtype)
    out = ql(x)
    assert out.dtype == dtype
    expected = F.linear(x.float(), quant.fake_quantize(lin.weight.float(), 4, 32), lin.bias.float())
    assert (out.float() - expected).norm() <= 2e-2 * expected.norm()


def test_quant_linear_half_precision_without_bias():
    lin = nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    ql = quant.QuantLinear.from_linear(lin, 4, 32)
    out = ql(randn(2, 64).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_quantize_model_per_tensor_says_why():
    model = nn.Sequential(nn.Linear(64, 16))
    assert quant.group_size_fits(model, "tensor")  # fine for fake quantization ...
    with pytest.raises(ValueError, match="'tensor' is for fake_quantize"):  # ... but not a storage layout
        quant.quantize_model(model, 4, "tensor")


# ----------------------------------------------------------------------------- whole models


def tiny_model():
    """embedding -> Linear(64, 96) -> ReLU -> Linear(96, 48) -> lm_head Linear(48, 10), nested once."""
    torch.manual_seed(13)
    return nn.Sequential(OrderedDict(
        embed=nn.Embedding(10, 64),
        block=nn.Sequential(OrderedDict(up=nn.Linear(64, 96), act=nn.ReLU(), down=nn.Linear(96, 48))),
        lm_head=nn.Linear(48, 10, bias=False),
    ))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_linear_in_features_and_group_size_fits():
    model = tiny_model()
    assert quant.linear_in_features(model) == {64, 96}  # lm_head (48) is skipped
    assert quant.linear_in_features(model, skip=()) == {64, 96, 48}
    for g in (16, 32, "channel", "tensor", -1):
        assert quant.group_size_fits(model, g), g
    for g in (64, 48, 96, 128):
        assert not quant.group_size_fits(model, g), g


@pytest.mark.parametrize("inplace", [False, True])
def test_quantize_model(inplace):
    model = tiny_model()
    before, fp_bytes = _state(model), evaluation.stored_bytes(model)
    ids = torch.tensor([[1, 2, 3]])
    q = quant.quantize_model(model, bits=4, group_size=32, inplace=inplace)
    assert (q is model) == inplace
    assert isinstance(q.block.up, quant.QuantLinear) and isinstance(q.block.down, quant.QuantLinear)
    assert type(q.lm_head) is nn.Linear and torch.equal(q.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(q.embed.weight, before["embed.weight"])
    assert q.block.up.bits == 4 and q.block.up.group_size == 32
    if not inplace:  # the original is untouched
        assert type(model.block.up) is nn.Linear and type(model.block.down) is nn.Linear
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # exact byte count: packed codes + fp16 scales + uint8 zeros per group, float32 bias; the rest unchanged
    quantized = sum(o * i // 2 + o * (i // 32) * 3 + 4 * o for i, o in [(64, 96), (96, 48)])
    untouched = 4 * (10 * 64 + 48 * 10)
    assert evaluation.stored_bytes(q) == quantized + untouched < fp_bytes
    fake = quant.fake_quantize_model(tiny_model(), bits=4, group_size=32)
    with torch.no_grad():  # same tolerance as test_quant_linear_matches_fake_quantize (float16 scales)
        out, expected, exact = q(ids), fake(ids), tiny_model()(ids)
        assert (out - expected).norm() <= 1e-2 * expected.norm() + 0.1 * (expected - exact).norm()


@pytest.mark.parametrize("inplace", [False, True])
def test_fake_quantize_model(inplace):
    model = tiny_model()
    before = _state(model)
    f = quant.fake_quantize_model(model, bits=3, group_size=16, inplace=inplace)
    assert (f is model) == inplace
    assert all(type(m) is not quant.QuantLinear for m in f.modules())
    for name in ("block.up.weight", "block.down.weight"):
        got = f.state_dict()[name]
        assert torch.equal(got, quant.fake_quantize(before[name], 3, 16))
        assert not torch.equal(got, before[name])
    for name in ("lm_head.weight", "embed.weight", "block.up.bias", "block.down.bias"):
        assert torch.equal(f.state_dict()[name], before[name]), name
    if not inplace:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert evaluation.stored_bytes(f) == evaluation.stored_bytes(tiny_model())  # fake: nothing saved


def test_model_skip_patterns():
    model = tiny_model()
    q = quant.quantize_model(model, bits=8, group_size=16, skip=("lm_head", "down"))
    assert isinstance(q.block.up, quant.QuantLinear)
    assert type(q.block.down) is nn.Linear and type(q.lm_head) is nn.Linear
    everything = quant.quantize_model(model, bits=8, group_size=16, skip=())
    assert isinstance(everything.lm_head, quant.QuantLinear)


# ----------------------------------------------------------------------------- formats


def test_grid_fp8():
    e4m3, e5m2 = formats.grid("fp8_e4m3"), formats.grid("fp8_e5m2")
    assert len(e4m3) == 253 and e4m3.max() == 448 and e4m3.min() == -448
    assert e5m2.max() == 57344 and e5m2.min() == -57344
    for g in (e4m3, e5m2):
        assert g.dtype == torch.float64 and torch.isfinite(g).all()
        assert len(torch.unique(g)) == len(g) and torch.equal(g, g.sort().values)
        assert (g == 0).sum() == 1
    assert len(e5m2) == 247


def test_grid_fp4_nf4_int():
    fp4 = formats.grid("fp4_e2m1")
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert fp4.tolist() == sorted({s * m for m in mags for s in (1, -1)})
    assert len(fp4) == 15
    nf4 = formats.grid("nf4")
    assert len(nf4) == 16 and nf4.min() == -1 and nf4.max() == 1 and (nf4 == 0).any()
    assert formats.grid("int4").tolist() == list(range(-8, 8))
    assert formats.grid("int8").tolist() == list(range(-128, 128))
    assert formats.int_levels(4).tolist() == list(range(-7, 8))


def test_grid_16_bit():
    bf16, fp16 = formats.grid("bf16"), formats.grid("fp16")
    assert fp16.max() == 65504 and len(fp16) == 2**16 - 2 * 2**10 - 1  # minus inf/NaN patterns, -0 merged
    assert bf16.max() == torch.finfo(torch.bfloat16).max


@pytest.mark.parametrize("name", ["fp32", "int3", "nf3", "FP8_E4M3", ""])
def test_grid_unknown_name(name):
    with pytest.raises(ValueError, match="unknown format"):
        formats.grid(name)


@pytest.mark.parametrize("name", ["nf4", "fp4_e2m1", "int4", "fp8_e4m3"])
def test_codebook_quantize_lands_on_the_grid(name):
    levels = formats.grid(name)
    w = randn(6, 128, seed=14)
    w[2, :64] = 0  # an all-zero block
    out = formats.codebook_quantize(w, levels, 64)
    assert out.shape == w.shape and out.dtype == w.dtype
    blocks, out_blocks = w.reshape(-1, 64), out.reshape(-1, 64)
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12) / levels.abs().max()  # (n_blocks, 1)
    on_grid = (out_blocks / scale).double()[..., None] - levels  # (n_blocks, 64, n_levels)
    assert (on_grid.abs().amin(-1) <= 1e-4 * levels.abs().max()).all()
    assert torch.equal(out[2, :64], torch.zeros(64))
    # nearest level: no grid point is closer to w / scale than the one chosen
    dist = ((blocks / scale).double()[..., None] - levels).abs()
    chosen = ((blocks / scale).double() - (out_blocks / scale).double()).abs()
    assert (chosen <= dist.amin(-1) + 1e-4).all()


def test_codebook_quantize_keeps_shape_and_dtype():
    w = randn(2, 3, 64, seed=15).to(torch.bfloat16)
    out = formats.codebook_quantize(w, formats.grid("nf4"), 32)
    assert out.shape == w.shape and out.dtype == torch.bfloat16


def test_nf4_beats_int4_absmax_on_normal_weights():
    w = randn(512, 512, seed=16)
    nf4 = rel_error(formats.codebook_quantize(w, formats.grid("nf4"), 64), w)
    int4 = rel_error(formats.codebook_quantize(w, formats.int_levels(4), 64), w)
    assert nf4 < int4 * 0.95, (nf4, int4)


# ----------------------------------------------------------------------------- runtime


@pytest.fixture
def restore_env(monkeypatch):
    """setup() may set TRITON_INTERPRET; put the variable back as it was after the test."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    return monkeypatch


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_resolve_device_cuda_without_gpu():
    with pytest.raises(RuntimeError, match="GPU"):
        runtime.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="GPU"):
        runtime.resolve_device("cuda:0")
    assert runtime.resolve_device("auto") == runtime.resolve_device(None) == "cpu"


def test_resolve_device_cuda_without_gpu_simulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="GPU") as info:
        runtime.resolve_device("cuda")
    assert "device='cuda'" in str(info.value) and "device='cpu'" in str(info.value)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        runtime.require_cuda("the Triton kernel")
    assert runtime.resolve_device("auto") == "cpu"
    assert runtime.device_tier() == ("cpu", "cpu", None, None)


@pytest.mark.parametrize("device", ["tpu", "mps", "gpu", "CPU"])
def test_resolve_device_unknown(device):
    with pytest.raises(ValueError, match="device must be"):
        runtime.resolve_device(device)


def test_resolve_device_cpu():
    assert runtime.resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_require_cuda_without_gpu():
    with pytest.raises(RuntimeError, match="GPU") as info:
        runtime.require_cuda("the W4A16 kernel")
    assert "the W4A16 kernel" in str(info.value)


def test_setup_quick(restore_env):
    env = runtime.setup(quick=True)
    assert isinstance(env, runtime.Env)
    assert env.quick is True and env.sizes == runtime.QUICK_SIZES and env.seed == 0
    full = runtime.setup(quick=False)
    assert full.quick is False and full.sizes == runtime.FULL_SIZES[full.tier]
    assert "mode=QUICK" in str(env) and "mode=FULL" in str(full)


AUTO = not torch.cuda.is_available()  # the automatic mode: quick on a CPU, full on a CUDA GPU


@pytest.mark.parametrize("value, quick", [("1", True), ("true", True), ("YES", True), ("0", False),
                                          ("", AUTO), ("no", False), (None, AUTO)])
def test_setup_reads_compresslab_quick(restore_env, value, quick):
    if value is None:
        restore_env.delenv("COMPRESSLAB_QUICK", raising=False)
    else:
        restore_env.setenv("COMPRESSLAB_QUICK", value)
    env = runtime.setup()
    assert env.quick is quick
    assert ("automatic" in str(env)) == (value in (None, ""))  # the printout says which mode and why
    assert env.sizes == (runtime.QUICK_SIZES if quick else runtime.FULL_SIZES[env.tier])
    restore_env.setenv("COMPRESSLAB_QUICK", "1")
    assert runtime.setup(quick=False).quick is False  # an explicit argument wins over the variable


def test_setup_sizes_override(restore_env):
    restore_env.setenv("COMPRESSLAB_SIZES", "quick")
    env = runtime.setup(quick=False)
    assert env.quick is False and env.sizes == runtime.QUICK_SIZES
    assert "COMPRESSLAB_SIZES=quick" in str(env) and "dry run" in str(env)
    restore_env.setenv("COMPRESSLAB_SIZES", "a100+")
    assert runtime.setup(quick=True).sizes == runtime.FULL_SIZES["a100+"]
    restore_env.setenv("COMPRESSLAB_SIZES", "")
    assert runtime.setup(quick=False).sizes == runtime.FULL_SIZES[runtime.device_tier()[1]]
    restore_env.setenv("COMPRESSLAB_SIZES", "tiny")
    with pytest.raises(ValueError, match="COMPRESSLAB_SIZES must be one of .*'quick'.*got 'tiny'"):
        runtime.setup(quick=False)


def test_setup_seeds_everything(restore_env):
    runtime.setup(quick=True, seed=3)
    a = (torch.randn(5), np.random.rand(3), random.random())
    runtime.setup(quick=True, seed=3)
    b = (torch.randn(5), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    runtime.setup(quick=True, seed=4)
    assert not torch.equal(torch.randn(5), a[0])
