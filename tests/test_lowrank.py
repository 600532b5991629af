"""Low-rank factorization (compresslab.lowrank), lab 08: truncated SVD and Eckart-Young, activation-aware SVD,
the parameter accounting (break-even, ratio, energy), LowRankLinear, whole-model factorization, low-rank
compensation of quantization error, and bad input.

Unit tests run on seeded random matrices; model tests use the `tiny_llama` fixture (a random 2-layer Llama, hidden 64,
intermediate 128, 4 heads / 2 KV heads, with SmolLM2's tokenizer) and random calibration ids. The real model is used
once: one Linear of layer 0 on real WikiText windows, where ASVD must beat plain SVD on output error.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from layer_testing import gen

from compresslab import data, quant
from compresslab import lowrank as lr

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread for the module


def _truncated(W: torch.Tensor, r: int) -> torch.Tensor:
    """The reference best rank-r approximation, straight from torch.linalg.svd (float64)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _outlier_inputs(tokens: int, d_in: int, loud=(3, 17, 40), gain: float = 30.0, seed: int = 0) -> torch.Tensor:
    """(tokens, d_in) activations where a few input channels are `gain` times louder than the rest."""
    X = torch.randn(tokens, d_in, generator=gen(seed))
    X[:, list(loud)] *= gain
    return X


def _decoder_linears(model) -> dict:
    """{'model.layers.{i}.{proj}': module} of the 7 projections of every layer that are (still) dense nn.Linear."""
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and ".".join(n.split(".")[3:]) in PROJ and isinstance(m, nn.Linear)}


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips the tied lm_head


# ----------------------------------------------------------------------------- svd_factors: plain SVD


@pytest.mark.parametrize("shape,r", [((20, 12), 1), ((20, 12), 5), ((12, 30), 7), ((16, 16), 15)])
def test_svd_factors_are_the_best_rank_r_approximation(shape, r):
    W = torch.randn(*shape, generator=gen(1))
    A, B = lr.svd_factors(W, r)
    assert A.shape == (shape[0], r) and B.shape == (r, shape[1])
    AB = (A @ B).double()
    torch.testing.assert_close(AB, _truncated(W, r), rtol=1e-4, atol=1e-5)
    # Eckart-Young: the Frobenius error is exactly the energy of the dropped singular values
    S = torch.linalg.svdvals(W.double())
    assert (W.double() - AB).norm().item() == pytest.approx(S[r:].pow(2).sum().sqrt().item(), rel=1e-4)
    assert lr.relative_error(W, A @ B) == pytest.approx((S[r:].pow(2).sum() / S.pow(2).sum()).sqrt().item(), rel=1e-4)
    assert torch.linalg.matrix_rank(A @ B).item() == r  # float32 tolerance: the product is float32


def test_svd_factors_split_the_singular_values_evenly():
    # A = U sqrt(S), B = sqrt(S) V^T: both factors carry the same column / row norms
    W = torch.randn(24, 10, generator=gen(2))
    A, B = lr.svd_factors(W, 6)
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(A.norm(dim=0) ** 2, torch.linalg.svdvals(W)[:6], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(9, 9), (7, 13), (13, 7)])
def test_full_rank_reconstructs_exactly(shape):
    W = torch.randn(*shape, generator=gen(3))
    A, B = lr.svd_factors(W, min(shape))
    torch.testing.assert_close(A @ B, W, rtol=1e-4, atol=1e-5)
    assert lr.relative_error(W, A @ B) < 1e-5


def test_the_error_falls_with_the_rank():
    W = torch.randn(32, 24, generator=gen(4))
    errors = [lr.relative_error(W, torch.matmul(*lr.svd_factors(W, r))) for r in range(1, 25)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5 < errors[-2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_svd_factors_keep_the_dtype(dtype):
    W = torch.randn(16, 8, generator=gen(5)).to(dtype)
    A, B = lr.svd_factors(W, 4)
    assert A.dtype == dtype and B.dtype == dtype
    A, B = lr.svd_factors(W, 8, scale=torch.rand(8, generator=gen(6)) + 0.5)
    assert A.dtype == dtype and B.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 3e-2
    assert lr.relative_error(W, A.float() @ B.float()) < tol  # full rank, through the low-precision round trip


# ----------------------------------------------------------------------------- ASVD


def test_asvd_at_full_rank_reconstructs_w():
    W = torch.randn(12, 20, generator=gen(7))
    s = torch.rand(20, generator=gen(8)) * 10 + 0.1
    A, B = lr.svd_factors(W, 12, scale=s)
    torch.testing.assert_close(A @ B, W, rtol=1e-4, atol=1e-4)


def test_asvd_with_all_ones_scale_is_plain_svd():
    W = torch.randn(18, 11, generator=gen(9))
    A, B = lr.svd_factors(W, 4)
    A1, B1 = lr.svd_factors(W, 4, scale=torch.ones(11))
    torch.testing.assert_close(A1 @ B1, A @ B, rtol=1e-5, atol=1e-6)
    # and so is a constant scale (it only rescales the singular values)
    A2, B2 = lr.svd_factors(W, 4, scale=torch.full((11,), 3.7))
    torch.testing.assert_close(A2 @ B2, A @ B, rtol=1e-4, atol=1e-5)


def test_asvd_is_the_best_rank_r_approximation_of_w_diag_s():
    W = torch.randn(14, 10, generator=gen(10))
    s = torch.rand(10, generator=gen(11)) * 4 + 0.2
    A, B = lr.svd_factors(W, 3, scale=s)
    torch.testing.assert_close((A @ B * s).double(), _truncated(W * s, 3), rtol=1e-4, atol=1e-5)


def test_asvd_trades_weight_error_for_output_error_on_outlier_channels():
    d_out, d_in, r = 48, 64, 12
    W = torch.randn(d_out, d_in, generator=gen(12))
    X = _outlier_inputs(512, d_in)
    X_eval = _outlier_inputs(512, d_in, seed=1)  # fresh tokens, same loud channels
    act = X.norm(dim=0) / math.sqrt(X.shape[0])
    svd = torch.matmul(*lr.svd_factors(W, r))
    asvd = torch.matmul(*lr.svd_factors(W, r, scale=lr.activation_scale(act)))
    # the output error (what the model sees) is lower with ASVD ...
    assert lr.relative_error(W, asvd, X_eval) < 0.9 * lr.relative_error(W, svd, X_eval)
    # ... while plain SVD stays the best approximation of W itself (Eckart-Young)
    assert lr.relative_error(W, svd) < lr.relative_error(W, asvd)


def test_activation_scale():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    s = lr.activation_scale(act, alpha=0.5)
    assert s.shape == (4,) and s.mean().item() == pytest.approx(1.0)
    assert (s > 0).all()  # a dead channel is clamped, not zero (B is divided by s)
    assert s[3] / s[1] == pytest.approx(3.0) and s[0] / s[1] == pytest.approx(2.0)
    torch.testing.assert_close(lr.activation_scale(act, alpha=0.0), torch.ones(4))
    assert lr.activation_scale(act, alpha=1.0)[3] / lr.activation_scale(act, alpha=1.0)[1] == pytest.approx(9.0)


def test_relative_error():
    W = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert lr.relative_error(W, W) == 0.0
    assert lr.relative_error(W, torch.zeros(2, 2)) == pytest.approx(1.0)
    assert lr.relative_error(W, torch.tensor([[3.0, 0.0], [0.0, 0.0]])) == pytest.approx(0.8)
    # with inputs only the channels that carry signal matter
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert lr.relative_error(W, torch.tensor([[3.0, 0.0], [0.0, 0.0]]), X) == pytest.approx(0.0)
    assert lr.relative_error(W, torch.tensor([[1.5, 0.0], [0.0, 4.0]]), X.reshape(1, 2, 2)) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- accounting


def test_break_even_rank_exact_cases():
    assert lr.break_even_rank(576, 576) == 287  # 288 x 1152 == 576 x 576: equal is not a saving
    assert lr.break_even_rank(3, 6) == 1  # 2 x 9 == 18
    assert lr.break_even_rank(1, 1) == 0  # no rank saves anything
    assert lr.break_even_rank(576, 1536) == 418
    assert lr.break_even_rank(2, 2) == 0 and lr.break_even_rank(4, 4) == 1


@pytest.mark.parametrize("d_out", [1, 2, 3, 5, 8, 12, 64, 100, 576, 1536])
def test_break_even_rank_is_the_last_saving_rank(d_out):
    for d_in in list(range(1, 70)) + [96, 100, 128, 192, 576, 1536, 4096, 12288]:
        r = lr.break_even_rank(d_out, d_in)
        assert r >= 0
        assert r * (d_out + d_in) < d_out * d_in, (d_out, d_in, r)
        assert (r + 1) * (d_out + d_in) >= d_out * d_in, (d_out, d_in, r)
        assert lr.break_even_rank(d_in, d_out) == r


def test_lowrank_params():
    assert lr.lowrank_params(576, 1536, 10) == 10 * 2112
    assert lr.lowrank_params(3, 6, 1) == 9
    A, B = lr.svd_factors(torch.randn(7, 5, generator=gen(13)), 3)
    assert lr.lowrank_params(7, 5, 3) == A.numel() + B.numel()


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(576, 576), (576, 1536), (1536, 576), (64, 64), (32, 64), (10, 7), (3, 3)])
def test_rank_for_ratio_is_the_largest_rank_within_the_budget(ratio, shape):
    d_out, d_in = shape
    r = lr.rank_for_ratio(d_out, d_in, ratio)
    assert isinstance(r, int) and 1 <= r <= min(shape)
    budget = ratio * d_out * d_in
    if lr.lowrank_params(d_out, d_in, 1) <= budget:
        assert lr.lowrank_params(d_out, d_in, r) <= budget + 1e-9
        assert lr.lowrank_params(d_out, d_in, r + 1) > budget - 1e-9
    else:  # not even rank 1 fits: rank 1 is the floor
        assert r == 1


def test_rank_for_ratio_known_values():
    assert lr.rank_for_ratio(576, 576, 0.5) == 144
    assert lr.rank_for_ratio(64, 128, 0.5) == 21  # 4096 / 192 = 21.3
    assert lr.rank_for_ratio(32, 64, 0.5) == 10
    assert lr.rank_for_ratio(4, 4, 0.01) == 1
    assert lr.rank_for_ratio(576, 576, 0.999) == lr.break_even_rank(576, 576)


def test_rank_for_energy():
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert lr.rank_for_energy(S, 16 / 22) == 1  # exactly reached
    assert lr.rank_for_energy(S, 16 / 22 + 1e-6) == 2
    assert lr.rank_for_energy(S, 0.9) == 2  # 20 / 22 = 0.909
    assert lr.rank_for_energy(S, 0.95) == 3  # 21 / 22 = 0.955
    assert lr.rank_for_energy(S, 1.0) == 4
    assert lr.rank_for_energy(S, 1e-9) == 1
    assert lr.rank_for_energy(torch.tensor([3.0, 1.0, 0.0, 0.0]), 1.0) == 2  # zeros add nothing


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_rank_for_energy_is_the_smallest_rank_keeping_the_energy(energy):
    S = torch.linalg.svdvals(torch.randn(40, 30, generator=gen(14)))
    r = lr.rank_for_energy(S, energy)
    kept = lambda k: (S[:k].double() ** 2).sum().item() / (S.double() ** 2).sum().item()  # noqa: E731
    assert 1 <= r <= S.numel()
    assert kept(r) >= energy - 1e-9
    if r > 1:
        assert kept(r - 1) < energy
    if energy == 1.0:
        assert r == S.numel()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rank", [0, -1, 7])
def test_check_rank_rejects(rank):
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(d_out, d_in\)\] = \[1, 6\]"):
        lr.validate_rank(rank, 6, 9)


@pytest.mark.parametrize("rank", [2.5, True, "3", None])
def test_check_rank_rejects_non_integers(rank):
    with pytest.raises(ValueError, match=r"rank must be an integer, got"):
        lr.validate_rank(rank, 6, 9)


def test_check_rank_accepts_the_range():
    assert [lr.validate_rank(r, 9, 6) for r in (1, 3, 6)] == [1, 3, 6]


@pytest.mark.parametrize("W", [torch.ones(8), torch.ones(2, 3, 4), torch.tensor(1.0)])
def test_svd_factors_needs_a_matrix(W):
    with pytest.raises(ValueError, match=r"W must be a matrix \(d_out, d_in\)"):
        lr.svd_factors(W, 1)


def test_svd_factors_rejects_a_bad_rank_or_scale():
    W = torch.randn(6, 4, generator=gen(15))
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        lr.svd_factors(W, 5)
    for scale in (torch.ones(6), torch.ones(4, 1), torch.ones(5)):
        with pytest.raises(ValueError, match=r"one entry per input channel \(4,\)"):
            lr.svd_factors(W, 2, scale=scale)


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, 1.5, -0.2])
def test_rank_for_ratio_rejects(ratio):
    with pytest.raises(ValueError, match=r"in \(0, 1\).*keep the dense layer"):
        lr.rank_for_ratio(64, 64, ratio)


@pytest.mark.parametrize("energy", [0, -0.1, 1.5])
def test_rank_for_energy_rejects(energy):
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        lr.rank_for_energy(torch.ones(4), energy)


def test_from_linear_rejects_a_factorized_layer():
    low = lr.LowRankLinear.from_linear(nn.Linear(8, 6), 2)
    with pytest.raises(TypeError, match="needs an nn.Linear, got LowRankLinear.*factorize before quantizing"):
        lr.LowRankLinear.from_linear(low, 2)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        lr.LowRankLinear.from_linear(nn.Linear(8, 6), 7)


# ----------------------------------------------------------------------------- LowRankLinear


def test_low_rank_linear_with_bias():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, bias=True)
    lin.bias.data.uniform_(1.0, 2.0)  # large enough to be seen
    low = lr.LowRankLinear.from_linear(lin, 3)
    assert low.A.bias is not None and torch.equal(low.A.bias, lin.bias)
    assert low.B.bias is None  # the bias is added once, after A
    x = torch.randn(5, 12, generator=gen(16))
    A, B = lr.svd_factors(lin.weight.data, 3)
    torch.testing.assert_close(low(x), x @ (A @ B).T + lin.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.weight, A @ B, rtol=1e-5, atol=1e-6)
    assert _n_params(low) == 3 * (12 + 10) + 10
    assert (low.in_features, low.out_features, low.rank) == (12, 10, 3)
    assert "rank=3" in repr(low)


@pytest.mark.parametrize("bias", [False, True])
def test_low_rank_linear_at_full_rank_is_the_linear(bias):
    torch.manual_seed(1)
    lin = nn.Linear(9, 14, bias=bias)
    low = lr.LowRankLinear.from_linear(lin, 9)
    x = torch.randn(3, 4, 9, generator=gen(17))
    torch.testing.assert_close(low(x), lin(x), rtol=1e-4, atol=1e-5)
    assert _n_params(low) == 9 * (9 + 14) + (14 if bias else 0)


def test_low_rank_linear_below_full_rank_differs_from_the_linear():
    torch.manual_seed(2)
    lin = nn.Linear(16, 16, bias=False)
    low = lr.LowRankLinear.from_linear(lin, 4)
    x = torch.randn(8, 16, generator=gen(18))
    assert not torch.allclose(low(x), lin(x), atol=1e-3)
    assert _n_params(low) == 4 * 32 < _n_params(lin)


def test_low_rank_linear_asvd_uses_the_scale():
    torch.manual_seed(3)
    lin = nn.Linear(16, 12, bias=False)
    s = torch.rand(16, generator=gen(19)) * 5 + 0.1
    low = lr.LowRankLinear.from_linear(lin, 4, scale=s)
    torch.testing.assert_close(low.weight, torch.matmul(*lr.svd_factors(lin.weight.data, 4, s)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(low.weight, torch.matmul(*lr.svd_factors(lin.weight.data, 4)), atol=1e-3)


# ----------------------------------------------------------------------------- the whole model (tiny Llama)


@pytest.fixture(scope="module")
def calib(tiny_llama):
    _, tok = tiny_llama
    return torch.randint(0, len(tok), (4, 32), generator=gen(0))


def test_activation_norms_keys_shapes_and_values(tiny_llama, calib):
    model, _ = tiny_llama
    norms = lr.activation_norms(model, calib, batch_size=3, progress=False)  # batches of 3 + 1
    assert set(norms) == {f"model.layers.{i}.{n}" for i in range(2) for n in PROJ}
    lins = _decoder_linears(model)
    for key, v in norms.items():
        assert v.shape == (lins[key].in_features,)
        assert torch.isfinite(v).all() and (v > 0).all()
    # the value is ||X_j|| / sqrt(tokens) of that Linear's inputs: check one against a hook
    seen = []
    h = lins["model.layers.1.mlp.down_proj"].register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 128)))
    with torch.no_grad():
        model(calib, use_cache=False)
    h.remove()
    X = torch.cat(seen)
    torch.testing.assert_close(norms["model.layers.1.mlp.down_proj"], X.norm(dim=0) / math.sqrt(X.shape[0]),
                               rtol=1e-4, atol=1e-6)
    # q, k and v read the same normed hidden states
    assert torch.equal(norms["model.layers.0.self_attn.q_proj"], norms["model.layers.0.self_attn.v_proj"])
    assert not torch.allclose(norms["model.layers.0.self_attn.q_proj"], norms["model.layers.1.self_attn.q_proj"])


@pytest.fixture(scope="module")
def act_norms(tiny_llama, calib):
    return lr.activation_norms(tiny_llama[0], calib, progress=False)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_lowrank_model_replaces_every_decoder_linear(tiny_llama, calib, ratio):
    model, _ = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _decoder_linears(model)
    low, report = lr.lowrank_model(model, ratio, progress=False)
    assert low is not model
    assert set(report) == set(dense)
    saved = 0
    for key, lin in dense.items():
        new = low.get_submodule(key)
        assert isinstance(new, lr.LowRankLinear)
        rank = lr.rank_for_ratio(lin.out_features, lin.in_features, ratio)
        assert report[key] == new.rank == rank
        assert new.A.weight.shape == (lin.out_features, rank) and new.B.weight.shape == (rank, lin.in_features)
        saved += lin.weight.numel() - lr.lowrank_params(lin.out_features, lin.in_features, rank)
        assert lr.lowrank_params(lin.out_features, lin.in_features, rank) <= ratio * lin.weight.numel()
    assert _n_params(low) == _n_params(model) - saved
    assert saved > 0
    assert not _decoder_linears(low)  # no dense decoder Linear left
    assert isinstance(low.lm_head, nn.Linear)  # the head is not a decoder Linear
    # the original is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(_decoder_linears(model)) == 14  # all 14 projections still dense nn.Linear
    with torch.no_grad():
        logits = low(calib[:2]).logits
        ref = model(calib[:2]).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, ref, atol=1e-4)  # factorized: a different function


def test_lowrank_model_some_names_and_inplace(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    out, report = lr.lowrank_model(model, 0.5, names=("mlp.up_proj",), inplace=True, progress=False)
    assert out is model
    assert set(report) == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    assert isinstance(model.model.layers[1].mlp.up_proj, lr.LowRankLinear)
    assert isinstance(model.model.layers[1].mlp.gate_proj, nn.Linear)


def test_lowrank_model_asvd(tiny_llama, calib, act_norms):
    model, _ = tiny_llama
    svd, rep_svd = lr.lowrank_model(model, 0.5, progress=False)
    asvd, rep_asvd = lr.lowrank_model(model, 0.5, act_norms=act_norms, progress=False)
    assert rep_asvd == rep_svd  # the same budget
    key = "model.layers.1.mlp.down_proj"
    W = model.get_submodule(key).weight.data
    s = lr.activation_scale(act_norms[key])
    torch.testing.assert_close(asvd.get_submodule(key).weight, torch.matmul(*lr.svd_factors(W, rep_svd[key], s)),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(asvd.get_submodule(key).weight, svd.get_submodule(key).weight, atol=1e-4)
    with torch.no_grad():
        assert torch.isfinite(asvd(calib[:2]).logits).all()


def test_lowrank_model_rejects_unknown_names_and_factorizing_twice(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"unknown Linear 'mlp.fc1'; choose from"):
        lr.lowrank_model(model, 0.5, names=("mlp.fc1",), progress=False)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        lr.lowrank_model(model, 1.0, progress=False)
    low, _ = lr.lowrank_model(model, 0.5, names=("mlp.up_proj",), progress=False)
    with pytest.raises(TypeError, match="model.layers.0.mlp.up_proj is a LowRankLinear: factorize a dense model"):
        lr.lowrank_model(low, 0.5, progress=False)
    with pytest.raises(TypeError, match="decoder-only"):
        lr.lowrank_model(nn.Sequential(nn.Linear(4, 4)), 0.5, progress=False)


# ----------------------------------------------------------------------------- compensate_model


def _weight_errors(model, reference) -> dict:
    ref = _decoder_linears(reference)
    return {k: (ref[k].weight - m.weight).norm().item() for k, m in _decoder_linears(model).items()}


@pytest.mark.parametrize("bits", [3, 4])
def test_compensate_model_shrinks_the_quantization_error(tiny_llama, bits):
    model, _ = tiny_llama
    fq = quant.fake_quantize_model(model, bits=bits, group_size=32)
    before = _weight_errors(fq, model)
    assert all(e > 0 for e in before.values())
    errs = {}
    for rank in (1, 4, 16):
        q = copy.deepcopy(fq)
        added = lr.compensate_model(q, model, rank, progress=False)
        lins = _decoder_linears(model)
        assert set(added) == set(lins)
        assert all(added[k] == rank * (m.out_features + m.in_features) for k, m in lins.items())
        errs[rank] = _weight_errors(q, model)
        for k in before:  # every Linear is closer to the dense weights than the quantized one was
            assert errs[rank][k] < before[k], (rank, k)
    for k in before:  # a larger rank captures more of the residual
        assert errs[16][k] < errs[4][k] < errs[1][k], k
    # the correction is exactly the best rank-r approximation of the residual
    key = "model.layers.0.self_attn.q_proj"
    W, Wq = model.get_submodule(key).weight.data, fq.get_submodule(key).weight.data
    R = (W - Wq).double()
    S = torch.linalg.svdvals(R)
    assert errs[4][key] == pytest.approx(S[4:].pow(2).sum().sqrt().item(), rel=1e-3)


def test_compensate_model_asvd_and_output(tiny_llama, calib, act_norms):
    model, _ = tiny_llama
    fq = quant.fake_quantize_model(model, bits=3, group_size=32)
    comp = copy.deepcopy(fq)
    lr.compensate_model(comp, model, 8, act_norms=act_norms, progress=False)
    assert comp.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        ref, q_out, c_out = (m(calib[:2]).logits for m in (model, fq, comp))
    assert torch.isfinite(c_out).all()
    assert (c_out - ref).pow(2).mean() < (q_out - ref).pow(2).mean()


def test_compensate_model_rejects_mismatched_or_factorized_models(tiny_llama):
    model, _ = tiny_llama
    fq = quant.fake_quantize_model(model, bits=4, group_size=32)
    narrow = copy.deepcopy(model)
    narrow.model.layers[1].mlp.up_proj = nn.Linear(64, 120, bias=False)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj: reference \(120, 64\) vs quantized \(128, 64\)"
                                         r".*compensate against the model that was quantized"):
        lr.compensate_model(copy.deepcopy(fq), narrow, 2, progress=False)
    low, _ = lr.lowrank_model(model, 0.5, names=("mlp.up_proj",), progress=False)
    with pytest.raises(TypeError, match="compensation needs dense"):
        lr.compensate_model(low, model, 2, progress=False)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(d_out, d_in\)\] = \[1, 32\]"):
        lr.compensate_model(copy.deepcopy(fq), model, 33, progress=False)


# ----------------------------------------------------------------------------- the real model


class _Stop(Exception):
    pass


def _inputs_of(model, lin, ids) -> torch.Tensor:
    """(tokens, in_features) inputs of `lin` for the token windows ids, stopping the forward right after it."""
    seen = []

    def hook(m, inp, out):
        seen.append(inp[0].reshape(-1, inp[0].shape[-1]).detach().clone())
        raise _Stop

    h = lin.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(row[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(seen)


def test_asvd_beats_svd_on_a_real_projection(smollm):
    model, tok = smollm
    lin = model.model.layers[0].mlp.up_proj
    W = lin.weight.data  # (1536, 576)
    X_cal = _inputs_of(model, lin, data.calibration_batches(tok, n_samples=4, seq_len=128, seed=0))
    X_eval = _inputs_of(model, lin, data.calibration_batches(tok, n_samples=4, seq_len=128, seed=1))
    assert X_cal.shape == (512, 576) and not torch.equal(X_cal, X_eval)
    r = lr.rank_for_ratio(*W.shape, 0.5)
    assert r == 209
    act = X_cal.norm(dim=0) / math.sqrt(X_cal.shape[0])
    svd = torch.matmul(*lr.svd_factors(W, r))
    asvd = torch.matmul(*lr.svd_factors(W, r, scale=lr.activation_scale(act)))
    e_svd, e_asvd = lr.relative_error(W, svd, X_eval), lr.relative_error(W, asvd, X_eval)
    assert e_asvd < 0.97 * e_svd, (e_asvd, e_svd)  # measured: 0.674 vs 0.715 on held-out windows
    assert lr.relative_error(W, svd) < lr.relative_error(W, asvd)


def test_check_rank_takes_numpy_integers_and_names_the_type_otherwise():
    assert lr.validate_rank(np.int64(3), 8, 4) == 3 and type(lr.validate_rank(np.int64(3), 8, 4)) is int
    with pytest.raises(ValueError, match="rank must be an integer, got float"):
        lr.validate_rank(2.0, 8, 4)


def test_rank_for_energy_rejects_an_all_zero_spectrum():
    with pytest.raises(ValueError, match="all singular values are 0"):
        lr.rank_for_energy(torch.zeros(5), 0.9)


def test_compensate_model_checks_every_layer_before_changing_any(tiny_llama):
    model, _ = tiny_llama
    fq = quant.fake_quantize_model(model, bits=4, group_size=32)
    before = {k: v.clone() for k, v in fq.state_dict().items()}
    with pytest.raises(ValueError, match=r"\[1, 32\]"):  # q_proj (64 x 64) accepts rank 33, k_proj (32 x 64) not
        lr.compensate_model(fq, model, 33, progress=False)
    assert all(torch.equal(before[k], v) for k, v in fq.state_dict().items())
