"""GPTQ (compresslab.gptq) and its checkpoint format (compresslab.checkpoint), lab 02.

Unit tests run on seeded random data: weights (out, in) and a Hessian H = 2/N X^T X of inputs with uneven column
scales and correlated columns (where GPTQ has something to exploit). Model tests use the `tiny_llama` fixture (a
random 2-layer Llama, hidden 64, with SmolLM2's tokenizer) and random calibration ids; the real model is only loaded
because that fixture borrows its tokenizer.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from compresslab import checkpoint, gptq, quant
from layer_testing import gen, hessian_of, layer, make_inputs, make_weight  # noqa: F401 (layer: fixture)

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread for the module


def reference_gptq(W, H, bits, group_size, act_order, lazy_block, damp=0.01):
    """An independent transcription of IST-DASLab/gptq `fasterquant` (dynamic groups, asymmetric, no dead columns).

    As in the reference, a dynamic group's qparams are read from W as of the last block boundary. With
    lazy_block=1 every column is its own block, so the qparams come from the fully updated weights.
    """
    W, H = W.clone().float(), H.clone().float()
    n, maxq = W.shape[1], 2**bits - 1
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    mean_diag = torch.mean(torch.diag(H)).item()
    Hd = H.double() + damp * mean_diag * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True).float()
    Q = torch.zeros_like(W)
    for i1 in range(0, n, lazy_block):
        i2 = min(i1 + lazy_block, n)
        W1, E = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for i in range(i2 - i1):
            c = i1 + i
            if c % group_size == 0:
                scale, zero = (t[:, 0] for t in gptq.gptq_qparams(W[:, c : c + group_size], bits, sym=False))
            w = W1[:, i]
            q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
            E[:, i] = (w - q) / U[c, c]
            W1[:, i:] -= torch.outer(E[:, i], U[c, c:i2])
            Q[:, c] = q
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)] if act_order else Q


# ----------------------------------------------------------------------------- gptq_quantize_weight: the result


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("static_groups", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_result_fields_and_dequantization(layer, act_order, static_groups, sym):
    W, _, H = layer
    out_f, in_f, gs, bits = *W.shape, 32, 4
    res = gptq.gptq_quantize_weight(W, H, bits=bits, group_size=gs, sym=sym, act_order=act_order,
                                    static_groups=static_groups)
    n_groups = in_f // gs
    assert res.dequantized.shape == (out_f, in_f) and res.dequantized.dtype == torch.float32
    assert res.codes.shape == (out_f, in_f) and not res.codes.is_floating_point()
    assert res.scales.shape == res.zeros.shape == (out_f, n_groups)
    assert res.scales.dtype == res.zeros.dtype == torch.float32
    assert res.g_idx.shape == (in_f,) and res.g_idx.dtype == torch.int64
    assert isinstance(res.damp_used, float) and isinstance(res.loss, float)
    assert np.isfinite(res.loss) and res.loss >= 0
    if act_order:
        assert res.perm.dtype == torch.int64 and torch.equal(res.perm.sort().values, torch.arange(in_f))
    else:
        assert res.perm is None
    # codes in range, zeros integer codes, scales positive and float16-exact
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 2**bits - 1
    assert torch.equal(res.zeros, res.zeros.round()) and (res.zeros >= 0).all() and (res.zeros <= 2**bits - 1).all()
    if sym:
        assert (res.zeros == 2 ** (bits - 1)).all()
    assert (res.scales > 0).all() and torch.equal(res.scales, res.scales.half().float())
    # the weights ARE the codes: column j reads its group's scale and zero through g_idx, bit for bit
    deq = (res.codes.float() - res.zeros[:, res.g_idx]) * res.scales[:, res.g_idx]
    assert torch.equal(deq, res.dequantized)
    # every group is used by exactly gs columns
    assert torch.equal(torch.bincount(res.g_idx, minlength=n_groups), torch.full((n_groups,), gs))


@pytest.mark.parametrize("static_groups", [False, True], ids=["dynamic", "static"])
def test_clipped_ranges_keep_the_format(layer, static_groups):
    """clip=True (the reference's `mse` range search) changes only the qparams: the format invariants hold."""
    W, _, H = layer
    res = gptq.gptq_quantize_weight(W, H, 3, 32, act_order=True, static_groups=static_groups, clip=True)
    plain = gptq.gptq_quantize_weight(W, H, 3, 32, act_order=True, static_groups=static_groups)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 7
    assert torch.equal(res.scales, res.scales.half().float())
    assert torch.equal((res.codes.float() - res.zeros[:, res.g_idx]) * res.scales[:, res.g_idx], res.dequantized)
    assert not torch.equal(res.scales, plain.scales)
    if static_groups:  # qparams from the original weights: clipping can only shrink the range
        assert (res.scales <= plain.scales).all()
    with pytest.raises(ValueError, match="clip"):
        gptq.gptq_quantize_weight(W, H, 3, 32, sym=True, clip=True)


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (False, True), (True, True)])
def test_g_idx_is_contiguous_without_dynamic_act_order(layer, act_order, static_groups):
    W, _, H = layer
    res = gptq.gptq_quantize_weight(W, H, 4, 32, act_order=act_order, static_groups=static_groups)
    assert torch.equal(res.g_idx, torch.arange(W.shape[1]) // 32)


def test_g_idx_follows_the_quantization_order_with_act_order_and_dynamic_groups(layer):
    W, _, H = layer
    gs = 32
    res = gptq.gptq_quantize_weight(W, H, 4, gs, act_order=True, static_groups=False)
    assert torch.equal(res.perm, torch.argsort(torch.diag(H), descending=True))
    j = torch.arange(W.shape[1])
    assert torch.equal(res.g_idx[res.perm], j // gs)  # column perm[j] is quantized j-th
    assert (res.g_idx[1:] < res.g_idx[:-1]).any()  # scattered: not monotone in the original order
    assert not torch.equal(res.g_idx, j // gs)


def test_per_channel_group(layer):
    W, _, H = layer
    for gs in (-1, "channel", W.shape[1]):
        res = gptq.gptq_quantize_weight(W, H, 4, gs, act_order=True)
        assert res.scales.shape == (W.shape[0], 1) and (res.g_idx == 0).all()
        assert torch.equal((res.codes.float() - res.zeros) * res.scales, res.dequantized)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_output_error_is_well_below_rtn(layer, bits, act_order):
    W, X, H = layer
    res = gptq.gptq_quantize_weight(W, H, bits, 32, act_order=act_order)
    err_gptq = gptq.reconstruction_error(W, res.dequantized, X).item()
    err_rtn = gptq.reconstruction_error(W, quant.fake_quantize(W, bits, 32), X).item()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)  # measured ratios 0.3 .. 0.52 on this data


def test_act_order_helps_on_uneven_inputs(layer):
    W, X, H = layer
    plain = gptq.gptq_quantize_weight(W, H, 3, 32, act_order=False).dequantized
    ordered = gptq.gptq_quantize_weight(W, H, 3, 32, act_order=True).dequantized
    assert gptq.reconstruction_error(W, ordered, X) < gptq.reconstruction_error(W, plain, X)


def test_more_bits_less_error(layer):
    W, X, H = layer
    errs = [gptq.reconstruction_error(W, gptq.gptq_quantize_weight(W, H, b, 32).dequantized, X).item()
            for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True), errs


# ----------------------------------------------------------------------------- lazy batches and block size


def test_lazy_block_does_not_matter_for_static_and_per_channel_groups():
    """Lazy batching only reorders the OBS updates: with qparams fixed up front the result is the same."""
    X = make_inputs(1024, 256, seed=2)
    W, H = make_weight(32, 256, seed=3), hessian_of(X)
    for kw in (dict(group_size=32, static_groups=True, act_order=False),
               dict(group_size=32, static_groups=True, act_order=True),
               dict(group_size=-1, act_order=False), dict(group_size=-1, act_order=True)):
        one_block = gptq.gptq_quantize_weight(W, H, 4, lazy_block=256, **kw).dequantized
        for bs in (128, 16):
            torch.testing.assert_close(gptq.gptq_quantize_weight(W, H, 4, lazy_block=bs, **kw).dequantized,
                                       one_block, rtol=0, atol=1e-5, msg=f"{kw}, lazy_block={bs}")


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_lazy_block_dividing_the_group_equals_the_one_column_at_a_time_loop(act_order):
    """Dynamic groups: when every group starts on a block boundary, lazy batches change nothing."""
    X = make_inputs(1024, 128, seed=4)
    W, H = make_weight(24, 128, seed=5), hessian_of(X)
    plain = reference_gptq(W, H, 4, 32, act_order, lazy_block=1)  # qparams from the fully updated weights
    for bs in (32, 16):
        res = gptq.gptq_quantize_weight(W, H, 4, 32, act_order=act_order, lazy_block=bs)
        torch.testing.assert_close(res.dequantized, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_dynamic_groups_match_the_reference_implementation(act_order):
    """With groups that start inside a block, the reference reads their qparams from W as of the block's start;
    the package does the same (its docstring: 'as the reference'), for the default and a whole-matrix block."""
    X = make_inputs(1024, 256, seed=6)
    W, H = make_weight(24, 256, seed=7), hessian_of(X)
    for bs in (128, 256):
        res = gptq.gptq_quantize_weight(W, H, 4, 32, act_order=act_order, lazy_block=bs)
        torch.testing.assert_close(res.dequantized, reference_gptq(W, H, 4, 32, act_order, bs), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- robustness


def test_inputs_are_not_modified(layer):
    W, _, H = layer
    W0, H0 = W.clone(), H.clone()
    Wd = W.clone()
    Hd = H.clone()
    Hd[:, 3] = Hd[3, :] = 0  # a dead column: the code edits its (copied) H and W
    for kw in (dict(act_order=True), dict(act_order=True, static_groups=True), dict(act_order=False)):
        gptq.gptq_quantize_weight(W, H, 4, 32, **kw)
        Wd0, Hd0 = Wd.clone(), Hd.clone()
        gptq.gptq_quantize_weight(Wd, Hd, 4, 32, **kw)
        assert torch.equal(Wd, Wd0) and torch.equal(Hd, Hd0)
    assert torch.equal(W, W0) and torch.equal(H, H0)


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
def test_dead_input_columns_give_zero_weights(act_order, static_groups):
    dead = [5, 40, 63]
    X = make_inputs(256, 64, seed=8, dead=dead)
    W, H = make_weight(16, 64, seed=9), hessian_of(X)
    assert (torch.diag(H)[dead] == 0).all()
    res = gptq.gptq_quantize_weight(W, H, 4, 16, act_order=act_order, static_groups=static_groups)
    assert (res.dequantized[:, dead] == 0).all()
    assert torch.isfinite(res.dequantized).all() and res.damp_used == 0.01


def test_all_inputs_dead_does_not_crash():
    W = make_weight(8, 32)
    res = gptq.gptq_quantize_weight(W, torch.zeros(32, 32), 4, 16)
    assert (res.dequantized == 0).all()


def test_damp_used_is_damp_for_a_well_conditioned_hessian(layer):
    W, _, H = layer
    assert gptq.gptq_quantize_weight(W, H, 4, 32).damp_used == 0.01
    assert gptq.gptq_quantize_weight(W, H, 4, 32, damp=0.05).damp_used == 0.05


def test_rank_deficient_hessian_is_fixed_by_the_default_damp():
    X = make_inputs(16, 64, seed=10)  # 16 tokens for 64 features: H has rank 16
    H = hessian_of(X)
    assert torch.linalg.matrix_rank(H) <= 16
    res = gptq.gptq_quantize_weight(make_weight(8, 64), H, 4, 16)
    assert res.damp_used == 0.01 and torch.isfinite(res.dequantized).all()


def _shifted(H, frac):
    """H shifted so that its smallest eigenvalue is -frac * mean(diag) of the result (approximately)."""
    lo = torch.linalg.eigvalsh(H.double()).min().item()
    return H - (lo + frac * torch.diag(H).mean().item()) * torch.eye(H.shape[0])


def test_slightly_indefinite_hessian_gets_more_damping(layer):
    W, _, H = layer
    Hn = _shifted(H, 0.015)  # damp 0.01 is not enough, 0.02 is
    assert torch.linalg.eigvalsh(Hn.double()).min() < 0
    res = gptq.gptq_quantize_weight(W, Hn, 4, 32)
    assert res.damp_used > 0.01
    assert res.damp_used == pytest.approx(0.02)
    assert torch.isfinite(res.dequantized).all()


@pytest.mark.parametrize("case", ["big negative eigenvalue", "rank-deficient minus a rank-one", "-I"])
def test_strongly_indefinite_hessian_raises_a_clear_error(case):
    W = make_weight(8, 64)
    if case == "big negative eigenvalue":
        H = _shifted(hessian_of(make_inputs(256, 64, seed=11)), 0.5)
    elif case == "rank-deficient minus a rank-one":
        H = hessian_of(make_inputs(16, 64, seed=12))
        v = torch.randn(64, generator=gen(13))
        v = v / v.norm()
        H = H - 0.5 * torch.diag(H).mean() * 64 * torch.outer(v, v)
    else:
        H = -torch.eye(64)
    with pytest.raises(RuntimeError, match="positive definite"):
        gptq.gptq_quantize_weight(W, H, 4, 16)


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 16])
def test_unsupported_bits_raise(layer, bits):
    W, _, H = layer
    with pytest.raises(ValueError, match="GPTQ supports bits"):
        gptq.gptq_quantize_weight(W, H, bits, 32)


def test_group_size_must_divide_in_features():
    W, H = make_weight(8, 64), hessian_of(make_inputs(256, 64))
    with pytest.raises(ValueError, match="does not divide"):
        gptq.gptq_quantize_weight(W, H, 4, 48)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_raises(bad):
    W, H = make_weight(8, 64), hessian_of(make_inputs(256, 64))
    H[3, 7] = bad
    with pytest.raises(ValueError, match="NaN"):
        gptq.gptq_quantize_weight(W, H, 4, 16)


@pytest.mark.parametrize("shapes", [((8, 64), (32, 32)), ((8, 64), (64, 32)), ((64,), (64, 64)),
                                    ((2, 8, 64), (64, 64)), ((8, 64), (8, 8))], ids=str)
def test_mismatched_shapes_raise(shapes):
    w_shape, h_shape = shapes
    with pytest.raises(ValueError, match="W must be"):
        gptq.gptq_quantize_weight(torch.randn(*w_shape), torch.eye(*h_shape) if len(set(h_shape)) == 1
                                  else torch.randn(*h_shape), 4, 16)


# ----------------------------------------------------------------------------- the Hessian


def test_hessian_in_batches_equals_one_batch_and_the_formula():
    X = make_inputs(96, 32, seed=14)
    h2 = gptq.Hessian(32)
    h2.add_batch(X[:40])
    h2.add_batch(X[40:].reshape(4, 14, 32))  # (batch, seq, in) is flattened to tokens
    h1 = gptq.Hessian(32)
    h1.add_batch(X)
    assert h1.n == h2.n == 96
    torch.testing.assert_close(h2.H, h1.H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.H, 2 / 96 * X.t() @ X, rtol=1e-5, atol=1e-5)
    assert h1.H.dtype == torch.float32


def test_hessian_accepts_half_precision_inputs():
    X = make_inputs(20, 16, seed=15)
    h = gptq.Hessian(16)
    h.add_batch(X.to(torch.bfloat16))
    Xb = X.to(torch.bfloat16).float()
    torch.testing.assert_close(h.H, 2 / 20 * Xb.t() @ Xb, rtol=1e-5, atol=1e-5)


def test_hessian_wrong_feature_count_raises_and_keeps_its_state():
    h = gptq.Hessian(32)
    h.add_batch(torch.randn(10, 32))
    H0 = h.H.clone()
    with pytest.raises(ValueError, match="features"):
        h.add_batch(torch.randn(10, 31))
    assert h.n == 10 and torch.equal(h.H, H0)


# ----------------------------------------------------------------------------- act-order, the quantizer, one step


@pytest.mark.parametrize("n, gs", [(16, 4), (64, 16), (48, 48)])
def test_act_order_permutation(n, gs):
    H = hessian_of(make_inputs(4 * n, n, seed=n))
    perm, g_idx = gptq.act_order_permutation(H, gs)
    d = torch.diag(H)
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert (d[perm][1:] <= d[perm][:-1]).all()  # diag descending
    assert torch.equal(g_idx[perm], torch.arange(n) // gs)
    assert torch.equal(torch.bincount(g_idx), torch.full((n // gs,), gs))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sym_quantizer_zero_and_fp16_scale(bits):
    w = make_weight(16, 32, seed=bits) + torch.linspace(-0.05, 0.05, 16)[:, None]  # rows with a sign bias
    scale, zero = gptq.gptq_qparams(w, bits, sym=True)
    maxq = 2**bits - 1
    assert scale.shape == zero.shape == (16, 1)
    assert (zero == (maxq + 1) / 2).all()
    assert torch.equal(scale, scale.half().float())
    torch.testing.assert_close(scale, 2 * w.abs().amax(1, keepdim=True) / maxq, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asym_quantizer_is_lab01s_with_fp16_scales(bits):
    w = make_weight(16, 32, seed=bits)
    w[3] = w[3].abs()  # an all-positive row: zero point 0
    scale, zero = gptq.gptq_qparams(w, bits, sym=False)
    ref_scale, ref_zero = quant.compute_qparams(w, bits, sym=False)
    assert torch.equal(scale, scale.half().float())
    assert torch.equal(zero, ref_zero) and zero[3].item() == 0
    torch.testing.assert_close(scale, ref_scale, rtol=1e-3, atol=0)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_scale_of_an_all_zero_group_is_fp16_exact(sym):
    scale, _ = gptq.gptq_qparams(torch.zeros(2, 16), 4, sym)
    assert torch.equal(scale, scale.half().float())


def test_column_step_turns_column_i_into_q_and_leaves_earlier_columns():
    g = gen(16)
    W1 = torch.randn(8, 16, generator=g) * 0.1
    H = hessian_of(make_inputs(64, 16, seed=17))
    U, _ = gptq.inverse_cholesky(H, 0.01)
    U = U.float()
    scale, zero = gptq.gptq_qparams(W1, 4, sym=False)
    before = W1.clone()
    codes, q, err = gptq.column_step(W1, U, 5, scale[:, 0], zero[:, 0], 15)
    assert torch.equal(W1[:, :5], before[:, :5])
    torch.testing.assert_close(W1[:, 5], q, rtol=0, atol=1e-6)
    assert torch.equal(q, (codes - zero[:, 0]) * scale[:, 0])
    torch.testing.assert_close(err, (before[:, 5] - q) / U[5, 5])
    assert torch.allclose(U, U.triu())  # the factor is upper-triangular


# ----------------------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def calib(tiny_llama):
    _, tok = tiny_llama
    return torch.randint(0, len(tok), (8, 32), generator=gen(0))


@pytest.fixture(scope="module")
def quantized(tiny_llama, calib):
    model, _ = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, report = gptq.quantize_model(model, calib, bits=4, group_size=16, progress=False)
    return qmodel, report, before


def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


def test_quantize_model_returns_a_new_model_and_leaves_the_original(tiny_llama, quantized):
    model, _ = tiny_llama
    qmodel, _, before = quantized
    assert qmodel is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.config.use_cache == qmodel.config.use_cache  # restored after calibration


def test_every_decoder_linear_holds_its_gptq_weights(tiny_llama, quantized):
    model, _ = tiny_llama
    qmodel, report, _ = quantized
    n_layers = model.config.num_hidden_layers
    assert sorted(report) == sorted(f"model.layers.{i}.{p}" for i in range(n_layers) for p in PROJ)
    linears = _decoder_linears(qmodel)
    assert set(linears) == set(report)
    for name, m in linears.items():
        res = report[name]
        assert torch.equal(m.weight, res.dequantized.to(m.weight.dtype)), name
        assert not torch.equal(m.weight, model.get_submodule(name).weight), name
        assert res.codes.shape == m.weight.shape and res.scales.shape == (m.out_features, m.in_features // 16)
        assert res.perm is not None  # act_order is the default
    # embeddings, norms and the (tied) head are not quantized
    assert torch.equal(qmodel.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(qmodel.model.norm.weight, model.model.norm.weight)


def test_quantized_model_forward_is_finite_and_close_to_the_original(tiny_llama, quantized, calib):
    model, _ = tiny_llama
    qmodel, _, _ = quantized
    with torch.no_grad():
        ref, out = model(calib[:2]).logits, qmodel(calib[:2]).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.5


def test_quantize_model_inplace(tiny_llama, calib):
    model = copy.deepcopy(tiny_llama[0])
    q_proj = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    qmodel, report = gptq.quantize_model(model, calib, bits=3, group_size=32, inplace=True, progress=False)
    assert qmodel is model
    w = model.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(w, q_proj) and torch.equal(w, report["model.layers.1.self_attn.q_proj"].dequantized)


def test_quantize_model_with_just_enough_tokens(tiny_llama):
    model, tok = tiny_llama
    ids = torch.randint(0, len(tok), (2, 32), generator=gen(1))  # 64 tokens = hidden size; down_proj sees 128 dims
    _, report = gptq.quantize_model(model, ids, bits=4, group_size=16, progress=False)
    assert all(torch.isfinite(r.dequantized).all() for r in report.values())


def test_quantize_model_bad_inputs(tiny_llama, calib):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="calibration tokens"):
        gptq.quantize_model(model, calib[:1], bits=4, group_size=16, progress=False)  # 32 tokens < hidden 64
    with pytest.raises(ValueError, match="GPTQ supports bits"):
        gptq.quantize_model(model, calib, bits=5, group_size=16, progress=False)
    with pytest.raises(TypeError, match="decoder-only"):
        gptq.quantize_model(nn.Linear(64, 64), calib, bits=4, group_size=16, progress=False)
    with pytest.raises(ValueError, match="does not divide"):
        gptq.quantize_model(model, calib, bits=4, group_size=48, progress=False)


# ----------------------------------------------------------------------------- the checkpoint


def _unpack(words: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """int32 words -> codes, field k of word w is element w * (32/bits) + k along `axis` (written independently)."""
    u = words.numpy().view(np.uint32).astype(np.int64)
    per = 32 // bits
    shape = list(u.shape)
    shape[axis] *= per
    out = np.zeros(shape, dtype=np.int64)
    for k in range(per):
        field = (u >> (bits * k)) & (2**bits - 1)
        if axis == 0:
            out[k::per] = field
        else:
            out[:, k::per] = field
    return torch.from_numpy(out)


NONNEG = "model.layers.0.self_attn.q_proj"  # made all non-negative: its first groups have zero point 0


@pytest.fixture(scope="module")
def exported(tiny_llama, calib, tmp_path_factory):
    """bits -> (quantized model, report, checkpoint path) for a tiny Llama with one all-non-negative Linear."""
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    model.get_submodule(NONNEG).weight.data.abs_()
    out = {}
    for bits in (4, 8, 2):
        qmodel, report = gptq.quantize_model(model, calib, bits=bits, group_size=16, progress=False)
        path = checkpoint.save_gptq(qmodel, report, tmp_path_factory.mktemp(f"gptq{bits}") / "ck", bits=bits,
                                    group_size=16, sym=False, act_order=True, tokenizer=tok)
        out[bits] = qmodel, report, path
    return out


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_checkpoint_round_trip(exported, calib, bits):
    qmodel, report, path = exported[bits]
    reloaded, tok = checkpoint.load_gptq(path)
    assert tok is not None and tok("12 + 7 =").input_ids
    for name in report:
        diff = (reloaded.get_submodule(name).weight - qmodel.get_submodule(name).weight).abs().max().item()
        assert diff <= 1e-6, (name, diff)
    for name, p in qmodel.state_dict().items():  # the unquantized tensors come back untouched
        if name.rsplit(".", 1)[0] not in report:
            assert torch.equal(reloaded.state_dict()[name], p), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(calib[:2]).logits, qmodel(calib[:2]).logits, rtol=1e-4, atol=1e-4)


def test_checkpoint_config(exported):
    _, report, path = exported[4]
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq"
    assert q["bits"] == 4 and q["group_size"] == 16 and q["desc_act"] is True and q["sym"] is False
    assert q["static_groups"] is False and q["damp_percent"] == pytest.approx(0.01)
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary folder, then renamed


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_checkpoint_tensors(exported, bits):
    _, report, path = exported[bits]
    tensors = _tensors(path)
    per = 32 // bits
    for name, res in report.items():
        out_f, in_f = res.codes.shape
        n_groups = in_f // 16
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"]
        assert f"{name}.weight" not in tensors
        assert qweight.dtype == torch.int32 and qweight.shape == (in_f // per, out_f)
        assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, out_f // per)
        assert scales.dtype == torch.float16 and scales.shape == (n_groups, out_f)
        assert g_idx.dtype == torch.int32 and g_idx.shape == (in_f,)
        assert torch.equal(_unpack(qweight, bits, axis=0), res.codes.t().long())  # codes along in_features
        stored = _unpack(qzeros, bits, axis=1)  # (n_groups, out)
        assert torch.equal(stored, (res.zeros.t().long() - 1) % 2**bits)  # v1: zero - 1, wrapped
        assert torch.equal(scales.float(), res.scales.t())  # fp16-exact by construction
        assert torch.equal(g_idx.long(), res.g_idx)
    assert "lm_head.weight" not in tensors  # tied to the embeddings
    assert "model.embed_tokens.weight" in tensors


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_v1_zero_point_off_by_one(exported, bits):
    """A zero point of 0 is stored as 2^bits - 1; reading a v1 file as v2 gives wrong weights."""
    _, report, path = exported[bits]
    tensors = _tensors(path)
    res = report[NONNEG]
    is_zero = res.zeros.t() == 0  # (n_groups, out)
    assert is_zero.any()  # the all-non-negative weight: at least its first group in act-order has xmin = 0
    stored = _unpack(tensors[f"{NONNEG}.qzeros"], bits, axis=1)
    assert (stored[is_zero] == 2**bits - 1).all()  # 0 - 1 wrapped (15 at 4 bits)
    good = checkpoint.read_gptq_layer(tensors, NONNEG, bits, checkpoint_format="gptq")
    torch.testing.assert_close(good, res.dequantized, rtol=0, atol=1e-6)
    wrong = checkpoint.read_gptq_layer(tensors, NONNEG, bits, checkpoint_format="gptq_v2")
    assert not torch.allclose(wrong, res.dequantized, atol=1e-3)
    # where the zero point is 0, v2 reads 2^bits - 1: every such weight shifts down by (2^bits - 1) * scale
    col_zero = is_zero[res.g_idx]  # (in, out): columns whose group has zero 0
    shift = (res.dequantized.t() - wrong.t())[col_zero]
    expected = ((2**bits - 1) * res.scales.t()[res.g_idx])[col_zero]
    torch.testing.assert_close(shift, expected, rtol=1e-5, atol=1e-6)


def test_v1_zero_point_at_the_top_of_the_range_wraps_to_zero():
    """zero = 2^bits - 1 is stored as 2^bits - 2; zero 1 as 0: the writer subtracts exactly one, nothing else."""
    from compresslab.packing import pack

    zeros = torch.tensor([[0, 1, 7, 15, 14, 2, 3, 8]])  # (n_groups=1, out=8) 4-bit zero points
    stored = _unpack(pack(((zeros.t() - 1) & 15).t(), 4, dim=1, word=torch.int32), 4, axis=1)
    assert stored.tolist() == [[15, 0, 6, 14, 13, 1, 2, 7]]


def test_save_gptq_rejects_3_bits(exported, tmp_path):
    qmodel, report, _ = exported[4]
    with pytest.raises(ValueError, match="bits=4"):
        checkpoint.save_gptq(qmodel, report, tmp_path / "ck3", bits=3, group_size=16, sym=False, act_order=True)
    assert not (tmp_path / "ck3").exists() and not (tmp_path / "ck3.tmp").exists()


def test_save_gptq_refuses_act_order_false_beside_an_act_order_g_idx(exported, tmp_path):
    """desc_act: false in the config beside a permuted g_idx would be a checkpoint that contradicts itself."""
    qmodel, report, _ = exported[4]
    with pytest.raises(ValueError, match="pass act_order=True"):
        checkpoint.save_gptq(qmodel, report, tmp_path / "ck", bits=4, group_size=16, sym=False, act_order=False)
    assert not (tmp_path / "ck").exists()


def test_load_gptq_rejects_a_non_gptq_checkpoint(exported, tmp_path):
    import shutil

    _, _, path = exported[4]
    other = tmp_path / "awq"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        checkpoint.load_gptq(other)


def test_save_gptq_overwrites_an_existing_export(exported, tmp_path):
    qmodel, report, _ = exported[4]
    target = tmp_path / "ck"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    checkpoint.save_gptq(qmodel, report, target, bits=4, group_size=16, sym=False, act_order=True)
    assert not (target / "stale.bin").exists() and (target / "model.safetensors").exists()
    assert not (target / "tokenizer_config.json").exists()  # no tokenizer given


def test_rtn_quantize_model_is_round_to_nearest_with_a_gptq_report(tiny_llama):
    """GPTQ with an identity Hessian propagates nothing: every weight is its group's nearest grid point (within a
    tenth of a step), and the report exports like GPTQ's."""
    from compresslab import gptq

    model, _ = tiny_llama
    q, report = gptq.rtn_quantize_model(model, bits=4, group_size=16)
    assert len(report) == 7 * len(model.model.layers)
    for name, res in report.items():
        W = model.get_submodule(name).weight.detach()
        scale, zero = gptq.gptq_qparams(W.reshape(W.shape[0], -1, 16).reshape(-1, 16), 4, False)
        codes = torch.clamp(torch.round(W.reshape(-1, 16) / scale) + zero, 0, 15)
        rtn = ((codes - zero) * scale).reshape(W.shape)
        assert torch.allclose(q.get_submodule(name).weight, rtn, atol=1e-6)
        assert torch.equal(res.g_idx, torch.arange(W.shape[1]) // 16)
    assert not torch.equal(q.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq.rtn_quantize_model(model, bits=5)
