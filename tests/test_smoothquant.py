"""SmoothQuant (compresslab.smoothquant), activation lab.

Unit tests on seeded random tensors and toy layers; the limits alpha = 0 / 1 on the `tiny_llama` fixture; exactness
and the W8A8 perplexity gain on the real model (SmolLM2-135M, float32), with 4 x 64 calibration tokens and
perplexity on 2 windows of 128 (about 10 s in all).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compresslab import actquant, smoothquant as sq

# one torch thread: on a busy 2-core machine, two threads contending with other work run the model many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class ToyRMSNorm(nn.Module):
    def __init__(self, n, seed):
        super().__init__()
        self.weight = nn.Parameter(randn(n, seed=seed).abs() + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def toy_linear(n_in, n_out, seed, bias=False):
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(randn(n_out, n_in, seed=seed, scale=0.1))
        if bias:
            lin.bias.copy_(randn(n_out, seed=seed + 1))
    return lin


@pytest.fixture
def tiny(tiny_llama):
    model, tok = tiny_llama
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    return copy.deepcopy(model), calib


# ----------------------------------------------------------------------------- smoothing factors


def test_smooth_scales_formula_and_shape():
    act, w = randn(64, seed=1).abs() * 10, randn(64, seed=2).abs()
    s = sq.smooth_scales(act, w, alpha=0.5)
    assert s.shape == (64,) and s.dtype == torch.float32
    assert torch.allclose(s, (act / w).sqrt())  # alpha = 0.5: act^0.5 / w^0.5
    assert torch.allclose(sq.smooth_scales(act, w, 1.0), act)  # all the difficulty onto the weights
    assert torch.allclose(sq.smooth_scales(act, w, 0), 1 / w)  # none: only the weights are flattened
    assert (sq.smooth_scales(torch.zeros(4), torch.zeros(4), 0.5) >= sq.MIN_SCALE).all()  # never 0, never inf


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "0.5", None])
def test_smooth_scales_refuses_a_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        sq.smooth_scales(torch.ones(4), torch.ones(4), alpha)


def test_smooth_scales_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="amax"):
        sq.smooth_scales(torch.ones(4), torch.ones(5))
    with pytest.raises(ValueError, match=r"\(in,\) vectors"):
        sq.smooth_scales(torch.ones(4, 4), torch.ones(4, 4))


# ----------------------------------------------------------------------------- folding


def test_fold_smoothing_is_exact_and_moves_the_outliers():
    norm, q, k = ToyRMSNorm(32, seed=3), toy_linear(32, 16, seed=4), toy_linear(32, 8, seed=5, bias=True)
    x = randn(6, 32, seed=6)
    x[:, 3] *= 50  # an outlier channel
    h = norm(x)
    ref = [q(h), k(h)]
    act = h.abs().amax(dim=0)
    s = sq.smooth_scales(act, sq.weight_amax([q, k]), alpha=0.5)
    sq.fold_smoothing(norm, [q, k], s)
    h_smooth = norm(x)
    assert torch.allclose(h_smooth, h / s, rtol=1e-5)  # the norm now divides channel j by s_j
    for lin, y in zip([q, k], ref, strict=True):
        assert torch.allclose(lin(h_smooth), y, rtol=1e-4, atol=1e-5)
    spread = lambda t: (t.max() / t.min()).item()  # noqa: E731
    assert spread(h_smooth.abs().amax(dim=0)) < spread(act)  # flatter activations


def test_fold_into_linear_is_exact_through_the_gated_mlp():
    gate, up, down = toy_linear(16, 48, 7), toy_linear(16, 48, 8), toy_linear(48, 16, 9)
    x = randn(5, 16, seed=10)
    mlp = lambda: down(F.silu(gate(x)) * up(x))  # noqa: E731
    ref = mlp()
    s = randn(48, seed=11).abs() + 0.1
    sq.fold_into_linear(up, down, s)
    assert torch.allclose(mlp(), ref, rtol=1e-4, atol=1e-6)


def test_folding_refuses_mismatched_sizes_and_quantized_layers():
    norm, lin = ToyRMSNorm(32, seed=12), toy_linear(32, 8, seed=13)
    with pytest.raises(ValueError, match="s must be"):
        sq.fold_smoothing(norm, [lin], torch.ones(31))
    with pytest.raises(ValueError, match="in_features=32"):
        sq.fold_smoothing(ToyRMSNorm(16, seed=0), [lin], torch.ones(16))
    with pytest.raises(ValueError, match=r"prev.out_features"):
        sq.fold_into_linear(lin, toy_linear(8, 4, seed=14), torch.ones(7))
    quantized = actquant.ActQuantLinear.from_linear(lin)
    with pytest.raises(TypeError, match="before quantizing"):
        sq.fold_smoothing(norm, [quantized], torch.ones(32))


# ----------------------------------------------------------------------------- the whole model


def test_smooth_model_alpha_limits(tiny, tiny_llama):
    """alpha = 1: every smoothed input channel has max |x_j| = 1; alpha = 0: every smoothed weight column max 1."""
    model, calib = tiny
    scales = sq.smooth_model(model, calib, alpha=1.0, progress=False)
    assert len(scales) == 2 * 6 and scales["model.layers.0.self_attn.k_proj"].shape == (64,)
    assert scales["model.layers.1.mlp.down_proj"].shape == (128,)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")]
    for n, amax in sq.channel_amax(model, calib, names, progress=False).items():
        assert torch.allclose(amax, torch.ones_like(amax), rtol=1e-4), n

    model0 = copy.deepcopy(tiny_llama[0])
    sq.smooth_model(model0, calib, alpha=0.0, progress=False)
    for layer in model0.model.layers:
        for group in (sq.ATTN_IN, sq.MLP_IN, ["mlp.down_proj"]):
            w = sq.weight_amax([layer.get_submodule(n) for n in group])
            assert torch.allclose(w, torch.ones_like(w), rtol=1e-5)


def test_smooth_model_refuses_other_layouts(tiny):
    model, calib = tiny
    with pytest.raises(TypeError, match="model.model.layers"):
        sq.smooth_model(nn.Sequential(nn.Linear(4, 4)), calib)
    with pytest.raises(ValueError, match="alpha"):
        sq.smooth_model(model, calib, alpha=2.0)
    actquant.apply(model, actquant.W8A8Config(fmt="fp8"))
    with pytest.raises(TypeError, match="smooth the model before quantizing"):
        sq.smooth_model(model, calib)


def test_input_stats_names(tiny):
    model, calib = tiny
    with pytest.raises(ValueError, match="no module named"):
        sq.input_stats(model, calib, ["model.layers.0.q_proj"])
    assert len(sq.linear_names(model)) == 14


@pytest.fixture(scope="module")
def real(smollm):
    import compresslab as cl

    model, tok = smollm
    return model, tok, cl.data.calibration_batches(tok, n_samples=4, seq_len=64, seed=0)


def test_smoothing_the_real_model_changes_no_logit(real):
    model, _, calib = real
    smoothed = copy.deepcopy(model)
    scales = sq.smooth_model(smoothed, calib, alpha=0.5, progress=False)
    assert len(scales) == 30 * 6 and all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())
    ids = calib[:2, :32]
    with torch.no_grad():
        scale = model(ids).logits.abs().max().item()
    change = sq.max_logit_change(model, smoothed, ids)
    # fp32 rounding only: measured 6.7e-5 on logits up to 34 (2e-6 relative)
    assert change < 2e-5 * scale, f"max |logit change| {change:.2e} on logits up to {scale:.1f}"
    assert sq.max_logit_change(model, model, ids) == 0


def test_smoothquant_lowers_int8_static_w8a8_perplexity(real):
    import compresslab as cl

    model, tok, calib = real
    ppl = {}
    for alpha in (None, 0.5):
        config = actquant.W8A8Config(fmt="int8", weights="channel", activations="tensor", smooth_alpha=alpha)
        q = actquant.apply(copy.deepcopy(model), config, calib, progress=False)
        ppl[alpha] = cl.evaluation.perplexity(q, tok, n_windows=2, seq_len=128, progress=False)
        del q
    # measured: 88.1 without smoothing, 56.5 with alpha 0.5 (full precision: 46.3)
    assert ppl[0.5] < 0.85 * ppl[None], ppl
