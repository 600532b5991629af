"""Activation quantization (compresslab.actquant) and MXFP8 (compresslab.formats), activation lab.

Unit tests on seeded random tensors; model tests on the `tiny_llama` fixture (a random 2-layer Llama, hidden 64) with
random calibration ids. Fast: the real model is only loaded because that fixture borrows its tokenizer.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compresslab import actquant as aq
from compresslab import formats

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread for the module

E4M3 = formats.grid("fp8_e4m3").float()  # (253,) every finite float8_e4m3fn value


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def with_outliers(seed=0):
    """(8, 64) activations with two outlier channels, as real LLM inputs have."""
    x = randn(8, 64, seed=seed)
    x[:, 5] *= 40
    x[:, 17] *= -25
    return x


@pytest.fixture
def tiny(tiny_llama):
    """A fresh copy of the tiny random Llama (tests modify models in place) and random calibration ids."""
    model, tok = tiny_llama
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    return copy.deepcopy(model), calib


# ----------------------------------------------------------------------------- FP8 grid


def test_fp8_e4m3_saturates_instead_of_nan():
    x = torch.tensor([448.0, 460.0, 500.0, 1e4, 1e30, -1e4, float("inf")])
    assert torch.equal(aq.fp8_e4m3(x), torch.tensor([448.0, 448.0, 448.0, 448.0, 448.0, -448.0, 448.0]))
    assert aq.fp8_e4m3(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_every_e4m3_value_round_trips_exactly():
    assert torch.equal(aq.fp8_e4m3(E4M3), E4M3)
    # through quantize_activation at scale 1 (static amax 448): the grid is the fixed point
    assert torch.equal(aq.quantize_activation(E4M3[None], "fp8", "tensor", amax=448.0)[0], E4M3)
    # and at a power-of-two scale (exact): amax = 448 * 2^-6
    assert torch.equal(aq.quantize_activation(E4M3 * 2**-6, "fp8", "tensor", amax=7.0), E4M3 * 2**-6)


def test_fp8_rounds_to_the_nearest_grid_value():
    x = randn(4096, seed=1, scale=100.0).clamp(-448, 448)
    err = (aq.fp8_e4m3(x) - x).abs()
    best = (x[:, None] - E4M3).abs().amin(dim=1)
    assert torch.allclose(err, best)


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_token_keeps_each_rows_max_and_bounds_the_error(fmt):
    x = with_outliers()
    x_hat = aq.quantize_activation(x, fmt, "token")
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    amax = x.abs().amax(dim=-1, keepdim=True)  # (8, 1)
    assert torch.allclose(x_hat.abs().amax(dim=-1, keepdim=True), amax)  # the row max maps onto the grid's max
    if fmt == "int8":  # uniform grid: at most half a step per value
        assert ((x_hat - x).abs() <= amax / 127 / 2 * (1 + 1e-5)).all()
        codes = x_hat / (amax / 127)
        assert torch.allclose(codes, codes.round(), atol=1e-4)
    else:  # 3 mantissa bits: relative error <= 2^-4 above the subnormals
        normal = x.abs() / (amax / 448) >= 2**-6
        assert ((x_hat - x).abs()[normal] <= x.abs()[normal] * 2**-4 * (1 + 1e-5)).all()


def test_per_token_is_finer_than_per_tensor_on_outlier_inputs():
    x = with_outliers()
    x[4:] *= 0.01  # small tokens suffer from one scale for the whole tensor
    tok = (aq.quantize_activation(x, "int8", "token") - x).norm()
    ten = (aq.quantize_activation(x, "int8", "tensor") - x).norm()
    assert tok < ten


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_static_amax_saturates_beyond_it(fmt):
    x = torch.tensor([[-10.0, -3.0, -1.0, 0.0, 0.5, 1.0, 2.9, 3.5, 100.0]])
    x_hat = aq.quantize_activation(x, fmt, "tensor", amax=3.0)
    assert x_hat[0, 0].item() == pytest.approx(-3.0) and x_hat[0, -2:].tolist() == pytest.approx([3.0, 3.0])
    # inside the range: rounded (half an INT8 step, or 2^-4 relative for E4M3's 3 mantissa bits), not clipped
    tol = {"atol": 3.0 / 127 / 2 + 1e-6, "rtol": 0} if fmt == "int8" else {"atol": 0, "rtol": 2**-4}
    assert torch.allclose(x_hat[0, 1:7], x[0, 1:7], **tol)
    assert x_hat[0, 3] == 0
    # the dynamic per-tensor scale uses the tensor's own max instead
    assert aq.quantize_activation(x, fmt, "tensor")[0, -1].item() == pytest.approx(100.0)


@pytest.mark.parametrize("fmt,gran", [("int8", "token"), ("fp8", "token"), ("int8", "tensor"), ("fp8", "tensor"),
                                      ("nvfp4", "block"), ("mxfp4", "block"), ("mxfp8", "block")])
def test_zero_rows_stay_zero(fmt, gran):
    x = randn(4, 64, seed=2)
    x[1] = 0
    x_hat = aq.quantize_activation(x, fmt, gran)
    assert torch.isfinite(x_hat).all() and (x_hat[1] == 0).all()
    assert (aq.quantize_activation(torch.zeros(2, 64), fmt, gran) == 0).all()


def test_static_amax_of_zero_gives_zeros():
    assert (aq.quantize_activation(randn(2, 8), "int8", "tensor", amax=0.0) == 0).all()


@pytest.mark.parametrize("fmt,fn", [("nvfp4", formats.nvfp4_quantize), ("mxfp4", formats.mxfp4_quantize),
                                    ("mxfp8", formats.mxfp8_quantize)])
def test_microscaling_activations_use_the_formats(fmt, fn):
    x = randn(2, 3, 64, seed=3).to(torch.bfloat16)
    x_hat = aq.quantize_activation(x, fmt, "block")
    assert x_hat.shape == x.shape and x_hat.dtype == torch.bfloat16
    assert torch.equal(x_hat, fn(x).dequantize().to(torch.bfloat16))


def test_bad_activation_arguments():
    x = randn(2, 64)
    with pytest.raises(ValueError, match="fmt must be one of"):
        aq.quantize_activation(x, "int4", "token")
    with pytest.raises(ValueError, match="microscaling"):
        aq.quantize_activation(x, "int8", "block")
    with pytest.raises(ValueError, match="granularity='block'"):
        aq.quantize_activation(x, "nvfp4", "token")
    with pytest.raises(ValueError, match="granularity='tensor'"):
        aq.quantize_activation(x, "fp8", "token", amax=3.0)
    with pytest.raises(ValueError, match="amax=None"):
        aq.quantize_activation(x, "mxfp8", "block", amax=3.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        aq.quantize_activation(randn(2, 40), "nvfp4", "block")
    with pytest.raises(ValueError, match="non-negative"):
        aq.quantize_activation(x, "int8", "tensor", amax=-1.0)
    with pytest.raises(TypeError, match="floating point"):
        aq.quantize_activation(torch.ones(2, 4, dtype=torch.int32), "int8", "token")


# ----------------------------------------------------------------------------- 8-bit weights


@pytest.mark.parametrize("fmt,dtype", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
@pytest.mark.parametrize("gran", ["channel", "tensor"])
def test_weight_codes_and_scales(fmt, dtype, gran):
    w = randn(16, 64, seed=4, scale=0.05)
    w[3] = 0  # an all-zero row
    codes, scale = aq.quantize_weight(w, fmt, gran)
    assert codes.dtype == dtype and codes.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == ((16, 1) if gran == "channel" else ())
    w_hat = aq.dequantize_weight(codes, scale, torch.float32)
    assert (w_hat[3] == 0).all() and torch.isfinite(w_hat).all()
    assert ((w_hat - w).norm() / w.norm()).item() < 0.04
    qmax = 127 if fmt == "int8" else 448
    assert codes.float().abs().max() == qmax  # the largest weight maps onto the grid's max
    if gran == "channel":
        assert torch.allclose(w_hat.abs().amax(dim=1), w.abs().amax(dim=1))
    assert aq.dequantize_weight(codes, scale, torch.bfloat16).dtype == torch.bfloat16


def test_bad_weight_arguments():
    with pytest.raises(ValueError, match="'channel'"):
        aq.quantize_weight(randn(4, 8), "int8", "token")
    with pytest.raises(ValueError, match="weight fmt"):
        aq.quantize_weight(randn(4, 8), "nvfp4", "channel")
    with pytest.raises(ValueError, match=r"\(out, in\)"):
        aq.quantize_weight(randn(8), "int8", "channel")


# ----------------------------------------------------------------------------- ActQuantLinear


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_act_quant_linear_matches_the_manual_computation(fmt):
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(randn(32, 64, seed=5, scale=0.1))
    m = aq.ActQuantLinear.from_linear(lin, weight_fmt=fmt, act_fmt=fmt, act_granularity="token")
    assert m.weight.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    assert m.weight_scale.shape == (32, 1) and m.input_amax is None and m.pre_quant_scale is None
    assert {n for n, _ in m.named_buffers()} == {"weight", "weight_scale"}
    x = with_outliers(seed=6)
    codes, scale = aq.quantize_weight(lin.weight, fmt, "channel")
    want = F.linear(aq.quantize_activation(x, fmt, "token"), codes.float() * scale, lin.bias)
    assert torch.allclose(m(x), want, atol=1e-6)
    assert ((m(x) - lin(x)).norm() / lin(x).norm()).item() < 0.05
    assert f"weight={fmt} channel" in repr(m) and f"act={fmt} token" in repr(m)


def test_act_quant_linear_static_amax_and_state_dict():
    lin = nn.Linear(64, 8, bias=False)
    m = aq.ActQuantLinear.from_linear(lin, weight_fmt="int8", weight_granularity="tensor", act_fmt="int8",
                                      act_granularity="tensor", input_amax=2.5)
    assert m.input_amax.shape == () and m.input_amax.item() == 2.5 and m.weight_scale.shape == ()
    x = with_outliers(seed=7)
    want = F.linear(aq.quantize_activation(x, "int8", "tensor", amax=2.5), m.dequantized_weight())
    assert torch.equal(m(x), want)
    assert set(m.state_dict()) == {"weight", "weight_scale", "input_amax"}
    assert "static amax=2.5" in repr(m)


def test_storage_dtypes_survive_a_model_dtype_cast():
    m = aq.ActQuantLinear.from_linear(nn.Linear(64, 8), act_granularity="tensor", input_amax=3.0,
                                      pre_quant_scale=torch.full((64,), 2.0))
    before = {n: b.clone() for n, b in m.named_buffers()}
    m.to(torch.bfloat16)
    for n, b in m.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    assert m.bias.dtype == torch.bfloat16 and m(randn(2, 64).to(torch.bfloat16)).dtype == torch.bfloat16
    mx = aq.ActQuantLinear.from_linear(nn.Linear(64, 8), weight_fmt="mxfp8", act_fmt=None).to(torch.bfloat16)
    assert mx.weight.dtype == torch.bfloat16  # the emulated float weight follows the model


def test_pre_quant_scale_keeps_the_layer_exact_in_full_precision():
    lin = nn.Linear(64, 16)
    p = torch.rand(64, generator=torch.Generator().manual_seed(8)) + 0.5
    m = aq.ActQuantLinear.from_linear(lin, weight_fmt=None, act_fmt=None, pre_quant_scale=p)
    x = randn(3, 64, seed=9)
    assert torch.allclose(m(x), lin(x), atol=1e-5)
    assert m.pre_quant_scale.shape == (64,)
    with pytest.raises(ValueError, match="pre_quant_scale"):
        aq.ActQuantLinear.from_linear(lin, pre_quant_scale=torch.ones(63))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_act_quant_linear_microscaling_stores_the_emulated_weight(fmt):
    lin = nn.Linear(64, 16, bias=False)
    m = aq.ActQuantLinear.from_linear(lin, weight_fmt=fmt, act_fmt=fmt, act_granularity="block")
    assert m.weight.dtype == torch.float32 and m.weight_scale is None
    assert torch.equal(m.weight, aq.MICROSCALING[fmt](lin.weight).dequantize())
    x = randn(2, 64, seed=10)
    assert torch.equal(m(x), F.linear(aq.quantize_activation(x, fmt, "block"), m.weight))


def test_from_linear_bad_arguments():
    lin = nn.Linear(64, 8)
    with pytest.raises(ValueError, match="granularity='tensor'"):
        aq.ActQuantLinear.from_linear(lin, act_granularity="token", input_amax=1.0)
    with pytest.raises(ValueError, match="weight_granularity"):
        aq.ActQuantLinear.from_linear(lin, weight_granularity="group")
    with pytest.raises(ValueError, match="act_fmt"):
        aq.ActQuantLinear.from_linear(lin, act_fmt="int4")
    with pytest.raises(TypeError, match="nn.Linear"):
        aq.ActQuantLinear.from_linear(nn.Conv1d(4, 4, 1))


# ----------------------------------------------------------------------------- calibration and configs


def test_calibrate_input_amax_is_the_max_over_all_tokens(tiny):
    model, calib = tiny
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    linears = {n: model.get_submodule(n) for n in names}
    seen = {n: [] for n in names}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0].abs().max()))
             for n, m in linears.items()]
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    amax = aq.calibrate_input_amax(model, calib, linears, batch_size=3, progress=False)  # two batches: 3 + 1
    assert set(amax) == set(names)
    for n in names:
        assert amax[n] == pytest.approx(max(seen[n]).item(), rel=1e-6)
    stats = aq.input_stats(model, calib, names, progress=False)
    assert stats[names[1]]["channel_amax"].shape == (128,) and stats[names[1]]["token_amax"].shape == (4 * 32,)
    assert stats[names[0]]["tensor_amax"] == pytest.approx(amax[names[0]], rel=1e-6)
    assert len(aq.input_stats(model, calib, progress=False)) == 14  # every decoder Linear, not lm_head


def test_w8a8_config_validation():
    assert aq.W8A8Config() == aq.W8A8Config(fmt="fp8", weights="channel", activations="token")
    for kwargs, match in [({"fmt": "int4"}, "fp8' or 'int8"), ({"fmt": "nvfp4"}, "MXConfig"),
                          ({"weights": "group"}, "weights must be"), ({"activations": "channel"}, "activations"),
                          ({"smooth_alpha": 1.5}, "smooth_alpha"), ({"smooth_alpha": True}, "smooth_alpha"),
                          ({"skip": "lm_head"}, "mind the comma")]:
        with pytest.raises(ValueError, match=match):
            aq.W8A8Config(**kwargs)
    with pytest.raises(TypeError):
        aq.W8A8Config("fp8")  # keyword-only
    with pytest.raises(ValueError, match="W8A8Config"):
        aq.MXConfig(fmt="fp8")
    with pytest.raises(ValueError, match="True or False"):
        aq.MXConfig(activations="yes")


def test_bits_per_config():
    assert aq.weight_bits(aq.W8A8Config()) == aq.activation_bits(aq.W8A8Config(fmt="int8")) == 8
    assert aq.weight_bits(aq.MXConfig(fmt="nvfp4")) == aq.activation_bits(aq.MXConfig(fmt="nvfp4")) == 4.5
    assert aq.weight_bits(aq.MXConfig(fmt="mxfp4")) == 4.25 and aq.weight_bits(aq.MXConfig(fmt="mxfp8")) == 8.25
    assert aq.activation_bits(aq.MXConfig(fmt="mxfp4", activations=False)) == 16


# ----------------------------------------------------------------------------- apply


@pytest.mark.parametrize("config", [aq.W8A8Config(fmt="fp8"), aq.W8A8Config(fmt="int8", activations="tensor"),
                                    aq.W8A8Config(fmt="int8", weights="tensor", activations="tensor",
                                                  smooth_alpha=0.5),
                                    aq.MXConfig(fmt="mxfp8"), aq.MXConfig(fmt="nvfp4", activations=False),
                                    aq.MXConfig(fmt="mxfp4", rotate=True)])
def test_apply_swaps_the_decoder_linears_in_place(tiny, config):
    model, calib = tiny
    with torch.no_grad():
        before = model(calib, use_cache=False).logits
    out = aq.apply(model, config, calib, batch_size=2, progress=False)
    assert out is model
    swapped = [n for n, m in model.named_modules() if isinstance(m, aq.ActQuantLinear)]
    assert len(swapped) == 14 and isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers"))
    static = getattr(config, "activations", None) == "tensor"
    assert all((m.input_amax is not None) == static for m in model.modules() if isinstance(m, aq.ActQuantLinear))
    qc = model.config.quantization_config
    assert qc["quant_method"] == "compresslab" and qc["format"] == config.fmt
    with torch.no_grad():
        after = model(calib, use_cache=False).logits
    assert torch.isfinite(after).all()
    assert ((after - before).norm() / before.norm()).item() < 0.2
    with pytest.raises(ValueError, match="already holds ActQuantLinear"):
        aq.apply(model, config, calib)


def test_apply_needs_calibration_for_static_scales_and_smoothing(tiny):
    model, calib = tiny
    for config in [aq.W8A8Config(activations="tensor"), aq.W8A8Config(smooth_alpha=0.5)]:
        with pytest.raises(ValueError, match="calibration_batches"):
            aq.apply(model, config)
    with pytest.raises(ValueError, match="calibration must be"):
        aq.apply(model, aq.W8A8Config(activations="tensor"), calib.float())
    with pytest.raises(TypeError, match="W8A8Config or an MXConfig"):
        aq.apply(model, {"fmt": "fp8"})
    assert not any(isinstance(m, aq.ActQuantLinear) for m in model.modules())  # nothing swapped on failure


def test_apply_mx_refuses_features_off_the_block_before_swapping():
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 8))
    with pytest.raises(ValueError, match="multiple of 16"):
        aq.apply(model, aq.MXConfig(fmt="nvfp4"))
    assert isinstance(model[0], nn.Linear)
    aq.apply(model, aq.MXConfig(fmt="nvfp4", skip=("1",)))  # keep the odd one in full precision
    assert isinstance(model[0], aq.ActQuantLinear) and isinstance(model[1], nn.Linear)


# ----------------------------------------------------------------------------- rotation (QuaRot's idea)


def test_random_rotation_is_orthogonal_seeded_and_checked():
    r = aq.random_rotation(48, seed=3)
    assert r.shape == (48, 48) and r.dtype == torch.float32
    assert torch.allclose(r.t() @ r, torch.eye(48), atol=1e-5)
    assert torch.equal(r, aq.random_rotation(48, seed=3)) and not torch.equal(r, aq.random_rotation(48, seed=4))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            aq.random_rotation(bad)


def _outlier_inputs(tokens=256, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, 5] *= 40.0  # one loud channel, as at a real down_proj's input
    return x


def test_rotated_linear_is_exact_without_quantization_and_flattens_outliers():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = _outlier_inputs()
    r = aq.random_rotation(64, seed=1)
    plain = aq.ActQuantLinear.from_linear(lin, weight_fmt=None, act_fmt=None, rotation=r)
    assert torch.allclose(plain(x), lin(x), atol=1e-4)  # (x R)(W R)^T = x W^T
    kurt = lambda t: (((t - t.mean()) / t.std()) ** 4).mean().item()  # noqa: E731
    assert kurt(x @ r) < kurt(x) / 5  # the loud channel spread over all of them
    # with one int4-like scale per token, the rotation is what makes 4-bit inputs usable: MXFP4's block of 32
    # holds the outlier with 31 quiet values; rotated, every block is Gaussian-like
    as_is = aq.ActQuantLinear.from_linear(lin, weight_fmt="mxfp4", act_fmt="mxfp4", act_granularity="block")
    rotated = aq.ActQuantLinear.from_linear(lin, weight_fmt="mxfp4", act_fmt="mxfp4", act_granularity="block",
                                            rotation=r)
    err = lambda m: ((m(x) - lin(x)).norm() / lin(x).norm()).item()  # noqa: E731
    assert err(rotated) < err(as_is)
    assert "rotation=True" in repr(rotated)
    assert rotated.to(torch.bfloat16).rotation.dtype == torch.float32  # the buffer keeps its storage dtype


def test_rotation_must_be_orthogonal_and_the_right_size():
    lin = nn.Linear(64, 8)
    for bad in (torch.eye(32), 2 * torch.eye(64), torch.ones(64, 64)):
        with pytest.raises(ValueError, match="orthogonal"):
            aq.ActQuantLinear.from_linear(lin, weight_fmt="nvfp4", act_fmt="nvfp4", act_granularity="block",
                                          rotation=bad)
    for kwargs, match in [({"rotate": 1}, "rotate must be True or False"), ({"seed": "0"}, "seed must be an int"),
                          ({"seed": True}, "seed must be an int")]:
        with pytest.raises(ValueError, match=match):
            aq.MXConfig(**kwargs)


def test_apply_rotates_every_linear_with_one_rotation_per_width(tiny):
    model, calib = tiny
    aq.apply(model, aq.MXConfig(fmt="nvfp4", rotate=True, seed=2), progress=False)
    layers = [m for m in model.modules() if isinstance(m, aq.ActQuantLinear)]
    assert all(m.rotation is not None for m in layers)
    by_width = {}
    for m in layers:
        by_width.setdefault(m.in_features, m.rotation)
        assert m.rotation.data_ptr() == by_width[m.in_features].data_ptr()  # shared, not one copy per Linear
    assert torch.equal(layers[0].rotation, aq.random_rotation(layers[0].in_features, 2))
    assert model.config.quantization_config["rotate"] is True


# ----------------------------------------------------------------------------- MXFP8 (formats)


def test_mxfp8_reproduces_values_on_its_grid():
    g = torch.Generator().manual_seed(11)
    elements = E4M3[torch.randint(0, len(E4M3), (12, 32), generator=g)]
    elements[:, 7] = 448.0  # every block's amax: 448 = 1.75 * 2^8, so the shared exponent is exactly k
    k = torch.randint(-20, 20, (12, 1), generator=g)
    w = (elements * torch.ldexp(torch.ones(12, 1), k)).reshape(3, 128)
    q = formats.mxfp8_quantize(w)
    assert isinstance(q, formats.BlockFP8) and q.tensor_scale == 1.0
    assert torch.equal(q.block_scales, torch.ldexp(torch.ones(12, 1), k))
    assert torch.equal(q.elements, elements) and torch.equal(q.dequantize(), w)


def test_mxfp8_parts_and_bits():
    w = randn(8, 96, seed=12, scale=0.03)
    q = formats.mxfp8_quantize(w)
    assert q.elements.shape == (8 * 96 // 32, 32) and q.block_scales.shape == (8 * 96 // 32, 1)
    assert torch.equal(q.elements.to(torch.float8_e4m3fn).float(), q.elements)  # exact E4M3 values
    assert torch.equal(torch.exp2(torch.log2(q.block_scales).round()), q.block_scales)  # powers of two
    block_amax = q.elements.abs().amax(dim=1)
    assert (block_amax >= 256).all() and (block_amax <= 448).all()  # amax lands in [256, 512) * X, clipped at 448
    assert ((q.dequantize() - w).norm() / w.norm()).item() < 0.04
    assert formats.bits_per_element("mxfp8") == 8.25
    with pytest.raises(ValueError, match="multiple of 32"):
        formats.mxfp8_quantize(randn(4, 48))
