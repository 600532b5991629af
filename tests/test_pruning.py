"""Pruning (compresslab.pruning), lab 04: masks, Wanda's activation norms, SparseGPT, whole-model and structured
pruning, the 2:4 hardware helpers, and bad input.

Unit tests run on seeded random data (weights (out, in), inputs X with uneven column scales and correlated columns,
H = 2/N X^T X). Model tests use the `tiny_llama` fixture (a random 2-layer Llama, hidden 64, intermediate 128, with
SmolLM2's tokenizer) and random calibration ids; the real model is only used once, for a cheap magnitude mask.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn

from layer_testing import gen, hessian_of, layer, make_inputs, make_weight  # noqa: F401 (layer: fixture)

from compresslab import evaluation
from compresslab import gptq, pruning

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread for the module


def _groups_kept(keep: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in/m) number of kept entries in each run of m consecutive columns."""
    return keep.reshape(keep.shape[0], -1, m).sum(-1)


# ----------------------------------------------------------------------------- unstructured masks


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_magnitude_mask_prunes_exactly_k_below_one_threshold(sparsity):
    W = torch.randn(12, 20, generator=gen(3))
    keep = pruning.magnitude_mask(W, sparsity)
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert int((~keep).sum()) == int(sparsity * W.numel())
    if 0 < sparsity:
        # one threshold for the whole layer: every pruned |w| is below every kept |w|
        assert W.abs()[~keep].max() < W.abs()[keep].min()


def test_magnitude_mask_can_empty_a_row_of_small_weights():
    W = torch.randn(8, 16, generator=gen(4)).abs() + 1.0
    W[2] = torch.linspace(1e-3, 1e-2, 16)  # one row of tiny weights
    W[5, :4] = -1e-4  # and a few tiny (negative) weights elsewhere
    keep = pruning.magnitude_mask(W, 0.25)  # 32 of 128 pruned: row 2 (16) + W[5, :4] (4) + 12 more
    assert int((~keep).sum()) == 32
    assert not keep[2].any()  # the whole row is gone: the threshold is per layer, not per row
    assert not keep[5, :4].any()
    # Wanda compares within a row, so the same row keeps its largest half
    per_row = pruning.wanda_mask(W, torch.ones(16), 0.25)
    assert torch.equal(per_row.sum(1), torch.full((8,), 12))
    assert torch.equal(per_row[2], torch.arange(16) >= 4)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.95])
def test_row_and_wanda_masks_prune_exactly_k_per_row(sparsity):
    W = torch.randn(9, 10, generator=gen(5))
    act = torch.rand(10, generator=gen(6)) * 5 + 0.1
    k = int(sparsity * 10)
    for keep, score in [(pruning.row_mask(W.abs(), sparsity), W.abs()),
                        (pruning.wanda_mask(W, act, sparsity), W.abs() * act)]:
        assert keep.dtype == torch.bool and keep.shape == W.shape
        assert torch.equal((~keep).sum(1), torch.full((9,), k))
        if 0 < k < 10:  # the pruned scores of each row are its k lowest
            pruned_max = score.masked_fill(keep, -math.inf).amax(1)
            kept_min = score.masked_fill(~keep, math.inf).amin(1)
            assert (pruned_max < kept_min).all()


def test_layer_mask_is_magnitude_of_a_score():
    score = torch.rand(6, 7, generator=gen(7))
    W = score * torch.where(torch.rand(6, 7, generator=gen(8)) > 0.5, 1.0, -1.0)
    assert torch.equal(pruning.layer_mask(score, 0.4), pruning.magnitude_mask(W, 0.4))


def test_wanda_keeps_a_small_weight_on_a_loud_channel_that_magnitude_prunes():
    W = torch.full((4, 8), 1.0)
    W[:, 1::2] = 2.0  # quiet channels, large weights
    W[:, 0] = 0.05  # a small weight on channel 0 ...
    act = torch.ones(8)
    act[0] = 100.0  # ... whose activations are huge (an outlier channel)
    mag = pruning.magnitude_mask(W, 0.5)
    wanda = pruning.wanda_mask(W, act, 0.5)
    assert not mag[:, 0].any()  # magnitude: the smallest weights go first
    assert wanda[:, 0].all()  # Wanda: |w| * ||x|| = 5 beats the quiet 1.0 weights
    assert not torch.equal(mag, wanda)
    # with equal activation norms Wanda ranks exactly like magnitude within each row
    assert torch.equal(pruning.wanda_mask(W, torch.ones(8), 0.5), pruning.row_mask(W.abs(), 0.5))


def test_wanda_ignores_the_scale_of_act_norm():
    W = torch.randn(16, 32, generator=gen(9))
    act = torch.rand(32, generator=gen(10)) + 0.1
    assert torch.equal(pruning.wanda_mask(W, act, 0.5), pruning.wanda_mask(W, act * 37.0, 0.5))


@pytest.mark.parametrize("make", ["magnitude", "wanda", "row", "nm"])
def test_ties_still_prune_exactly_k(make):
    W = torch.full((6, 16), 0.5)  # every weight equal
    if make == "magnitude":
        keep = pruning.magnitude_mask(W, 0.5)
        assert int((~keep).sum()) == 48
    elif make == "wanda":
        keep = pruning.wanda_mask(W, torch.ones(16), 0.3)
        assert torch.equal((~keep).sum(1), torch.full((6,), 4))
    elif make == "row":
        keep = pruning.row_mask(W, 0.75)
        assert torch.equal((~keep).sum(1), torch.full((6,), 12))
    else:
        keep = pruning.magnitude_mask(W, n=2, m=4)
        assert (_groups_kept(keep, 4) == 2).all()
    assert keep.dtype == torch.bool


def test_apply_mask_zeroes_exactly_the_pruned_weights_and_returns_a_new_tensor():
    W = torch.randn(5, 8, generator=gen(11))
    W0 = W.clone()
    keep = pruning.magnitude_mask(W, 0.5)
    out = pruning.apply_mask(W, keep)
    assert torch.equal(W, W0)  # not in place
    assert torch.equal(out[keep], W[keep]) and (out[~keep] == 0).all()
    assert pruning.sparsity_of(out) == 0.5


# ----------------------------------------------------------------------------- N:M masks


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_keep_the_n_largest_of_every_m(n, m):
    W = torch.randn(10, 32, generator=gen(12))
    act = torch.rand(32, generator=gen(13)) * 3 + 0.1
    for keep, score in [(pruning.magnitude_mask(W, n=n, m=m), W.abs()),
                        (pruning.wanda_mask(W, act, n=n, m=m), W.abs() * act),
                        (pruning.nm_mask(W.abs(), n, m), W.abs())]:
        assert keep.dtype == torch.bool and keep.shape == W.shape
        assert (_groups_kept(keep, m) == n).all()  # exactly n kept in every group of m consecutive columns
        s, k = score.reshape(10, -1, m), keep.reshape(10, -1, m)
        assert (s.masked_fill(k, -math.inf).amax(-1) < s.masked_fill(~k, math.inf).amin(-1)).all()
        assert pruning.is_nm_sparse(pruning.apply_mask(W, keep), n, m)
        assert pruning.sparsity_of(pruning.apply_mask(W, keep)) == pytest.approx(1 - n / m)


def test_nm_mask_groups_run_along_consecutive_input_columns():
    # in each group of 4 the two largest sit at positions 1 and 3
    W = torch.tensor([[0.1, 5.0, 0.2, 6.0, 9.0, 8.0, 0.0, 0.1]])
    keep = pruning.magnitude_mask(W, n=2, m=4)
    assert keep.tolist() == [[False, True, False, True, True, True, False, False]]


def test_one_of_four_needs_no_sparsity_argument():
    # sparsity defaults to None, so 1:4 (75 %) does not clash with a default
    W = torch.randn(4, 16, generator=gen(14))
    assert (_groups_kept(pruning.magnitude_mask(W, n=1, m=4), 4) == 1).all()
    assert (_groups_kept(pruning.wanda_mask(W, torch.ones(16), n=1, m=4), 4) == 1).all()


def test_is_nm_sparse():
    W = torch.randn(4, 16, generator=gen(15))
    assert not pruning.is_nm_sparse(W, 2, 4)  # dense
    W24 = pruning.apply_mask(W, pruning.magnitude_mask(W, n=2, m=4))
    assert pruning.is_nm_sparse(W24, 2, 4)
    assert pruning.is_nm_sparse(W24, 4, 8)  # 2:4 implies 4:8
    assert not pruning.is_nm_sparse(W24, 1, 4)
    sparser = W24.clone()
    sparser[:, ::4] = 0
    assert pruning.is_nm_sparse(sparser, 2, 4)  # at most n nonzeros is enough
    one_off = W24.clone()
    one_off[3, 5:8] = 1.0  # three nonzeros in one group of row 3
    one_off[3, 4] = 0
    assert not pruning.is_nm_sparse(one_off, 2, 4)
    # 4:8 but not 2:4: four nonzeros in the first half of every group of 8
    W48 = W.clone()
    W48.view(4, 2, 8)[:, :, 4:] = 0
    assert pruning.is_nm_sparse(W48, 4, 8) and not pruning.is_nm_sparse(W48, 2, 4)
    assert pruning.is_nm_sparse(torch.zeros(3, 8), 2, 4)


# ----------------------------------------------------------------------------- ActNorm: Wanda's ||X_j||


@pytest.mark.parametrize("splits", [[96], [1, 95], [10, 20, 30, 36], [48, 48]])
def test_act_norm_is_the_mean_square_however_batches_are_split(splits):
    X = make_inputs(96, 24, seed=2)
    acc = pruning.ActNorm(24)
    for chunk in X.split(splits):
        acc.add_batch(chunk)
    assert acc.n == 96
    torch.testing.assert_close(acc.sq, (X**2).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.norm(), X.norm(dim=0) / math.sqrt(96), rtol=1e-5, atol=1e-6)


def test_act_norm_accepts_3d_half_batches_and_ranks_like_the_column_norm():
    X = make_inputs(64, 32, seed=3).half().float()  # exactly representable in half precision
    acc = pruning.ActNorm(32)
    acc.add_batch(X[:40].reshape(4, 10, 32).half())  # (batch, seq, in) in half precision
    acc.add_batch(X[40:].reshape(2, 12, 32))
    assert acc.n == 64 and acc.sq.dtype == torch.float32
    col = X.norm(dim=0)
    torch.testing.assert_close(acc.norm() * 8.0, col, rtol=1e-4, atol=1e-5)  # sqrt(64) = 8
    assert torch.equal(acc.norm().argsort(), col.argsort())
    W = torch.randn(8, 32, generator=gen(16))
    assert torch.equal(pruning.wanda_mask(W, acc.norm(), 0.5), pruning.wanda_mask(W, col, 0.5))


# ----------------------------------------------------------------------------- SparseGPT on one matrix


@pytest.mark.parametrize("block_size", [32, 128, 48])
@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_sparsegpt_reaches_the_sparsity_in_every_block(layer, block_size, sparsity):
    W, _, H = layer
    out = pruning.sparsegpt_prune(W, H, sparsity, block_size=block_size)
    assert out.shape == W.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    for i1 in range(0, W.shape[1], block_size):
        block = out[:, i1 : i1 + block_size]
        assert int((block == 0).sum()) == int(sparsity * block.numel()), i1


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_pattern_is_exact(layer, n, m):
    W, _, H = layer
    out = pruning.sparsegpt_prune(W, H, n=n, m=m, block_size=64)
    assert (_groups_kept(out != 0, m) == n).all()
    assert pruning.is_nm_sparse(out, n, m)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n=2, m=4)], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(layer, kw):
    W, X, H = layer
    err_sgpt = gptq.reconstruction_error(W, pruning.sparsegpt_prune(W, H, **kw), X).item()
    err_wanda = gptq.reconstruction_error(W, pruning.apply_mask(W, pruning.wanda_mask(W, X.norm(dim=0), **kw)),
                                          X).item()
    err_mag = gptq.reconstruction_error(W, pruning.apply_mask(W, pruning.magnitude_mask(W, **kw)), X).item()
    assert err_sgpt < 0.9 * err_wanda, (err_sgpt, err_wanda)
    assert err_wanda < 0.8 * err_mag, (err_wanda, err_mag)  # uneven column scales: the activations matter


@pytest.mark.parametrize("block_size", [128, 32])
def test_sparsegpt_with_an_identity_like_hessian_is_magnitude_pruning(block_size):
    W = make_weight(24, 128, seed=17)
    H = 3.0 * torch.eye(128)  # uncorrelated inputs of equal scale: no compensation, saliency proportional to w^2
    out = pruning.sparsegpt_prune(W, H, 0.5, block_size=block_size)
    expected = torch.cat([pruning.apply_mask(b, pruning.magnitude_mask(b, 0.5)) for b in W.split(block_size, 1)],
                         dim=1)  # one magnitude threshold per block of columns
    assert torch.equal(out, expected)
    if block_size == 128:
        assert torch.equal(out, pruning.apply_mask(W, pruning.magnitude_mask(W, 0.5)))
    out24 = pruning.sparsegpt_prune(W, H, n=2, m=4, block_size=block_size)
    assert torch.equal(out24, pruning.apply_mask(W, pruning.magnitude_mask(W, n=2, m=4)))


def test_sparsegpt_nm_with_a_diagonal_hessian_is_wanda_nm():
    # uncorrelated inputs of unequal scale: saliency w^2 (H_jj + damp), Wanda's |w| ||x_j|| squared; within
    # one group of m columns of one row the comparison is the same
    W = make_weight(24, 64, seed=18)
    d = torch.rand(64, generator=gen(19)) * 4 + 0.1
    out = pruning.sparsegpt_prune(W, torch.diag(d), n=2, m=4, damp=0.01)
    act = (d + 0.01 * d.mean()).sqrt()
    assert torch.equal(out, pruning.apply_mask(W, pruning.wanda_mask(W, act, n=2, m=4)))


def reference_sparsegpt(W, H, sparsity=None, n=None, m=None, block_size=128, damp=0.01):
    """An independent transcription of IST-DASLab/sparsegpt `fasterprune`, without lazy updates: after each column
    the error goes straight onto every later column of W. The unstructured mask is chosen per block of block_size
    columns from the weights as of the block's start and prunes exactly int(sparsity * numel) (the reference's
    `tmp <= thresh` prunes one more); N:M keeps the n largest w^2 / U_jj^2 of each m columns (reference: prunes
    prunen of prunem, the same for 2:4)."""
    W, H = W.clone().float(), H.clone().float()
    cols = W.shape[1]
    Hd = H.double() + damp * torch.mean(torch.diag(H)).item() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True).float()
    d = torch.diag(U)
    keep = torch.ones_like(W, dtype=torch.bool)
    for c in range(cols):
        if n is None and c % block_size == 0:
            tmp = (W[:, c : c + block_size] ** 2 / d[c : c + block_size] ** 2).flatten()
            k = int(tmp.numel() * sparsity)
            blk = torch.ones_like(tmp, dtype=torch.bool)
            blk[tmp.argsort(stable=True)[:k]] = False
            keep[:, c : c + block_size] = blk.reshape(W.shape[0], -1)
        if n is not None and c % m == 0:
            tmp = W[:, c : c + m] ** 2 / d[c : c + m] ** 2
            grp = torch.zeros_like(tmp, dtype=torch.bool)
            grp.scatter_(1, tmp.topk(n, dim=1).indices, True)
            keep[:, c : c + m] = grp
        w = W[:, c].clone()
        q = w * keep[:, c]
        W[:, c:] -= torch.outer((w - q) / U[c, c], U[c, c:])
        W[:, c] = q
    return W


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.5, block_size=32),
                                dict(sparsity=0.7, block_size=48), dict(n=2, m=4), dict(n=2, m=4, block_size=8),
                                dict(n=1, m=4, block_size=64)],
                         ids=["50%", "50%-block32", "70%-block48", "2:4", "2:4-block8", "1:4-block64"])
def test_sparsegpt_matches_the_reference_without_lazy_updates(layer, kw):
    W, _, H = layer
    out = pruning.sparsegpt_prune(W, H, **kw)
    ref = reference_sparsegpt(W, H, **kw)
    assert torch.equal(out == 0, ref == 0)  # the same mask
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-5)


def test_sparsegpt_nm_does_not_depend_on_the_block_size(layer):
    W, _, H = layer
    results = [pruning.sparsegpt_prune(W, H, n=2, m=4, block_size=b) for b in (4, 32, 128)]
    for r in results[1:]:
        assert torch.equal(r == 0, results[0] == 0)
        torch.testing.assert_close(r, results[0], rtol=1e-3, atol=1e-5)


def test_sparsegpt_zero_sparsity_changes_nothing(layer):
    W, _, H = layer
    assert torch.equal(pruning.sparsegpt_prune(W, H, 0.0), W)


def test_sparsegpt_compensates_the_survivors(layer):
    W, _, H = layer
    out = pruning.sparsegpt_prune(W, H, 0.5)
    kept = out != 0
    assert not torch.equal(out[kept], W[kept])  # the surviving weights moved (the OBS update) ...
    assert (out[:, -1][kept[:, -1]] != W[:, -1][kept[:, -1]]).any()


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n=2, m=4)], ids=["50%", "2:4"])
def test_sparsegpt_joint_4bit(layer, kw):
    W, X, H = layer
    out = pruning.sparsegpt_prune(W, H, bits=4, group_size=64, **kw)
    assert torch.isfinite(out).all()
    # pruned weights are exactly 0 (a survivor may also round to 0): at least the requested zeros per block
    assert int((out == 0).sum()) >= W.numel() // 2
    if "n" in kw:
        assert pruning.is_nm_sparse(out, 2, 4)
    # survivors lie on a 4-bit grid: at most 16 distinct values per (row, group of 64), 0 included
    for r in range(W.shape[0]):
        for g in range(0, W.shape[1], 64):
            assert out[r, g : g + 64].unique().numel() <= 16, (r, g)
    # and the result is still close to the sparse-only one: quantization adds a little error
    err_joint = gptq.reconstruction_error(W, out, X).item()
    err_sparse = gptq.reconstruction_error(W, pruning.sparsegpt_prune(W, H, **kw), X).item()
    err_mag = gptq.reconstruction_error(W, pruning.apply_mask(W, pruning.magnitude_mask(W, **kw)), X).item()
    assert err_sparse <= err_joint < err_mag


def test_sparsegpt_does_not_modify_its_inputs(layer):
    W, _, H = layer
    W0, H0 = W.clone(), H.clone()
    pruning.sparsegpt_prune(W, H, 0.5)
    pruning.sparsegpt_prune(W, H, n=2, m=4, bits=4)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_sparsegpt_half_precision_weight_returns_float32(layer):
    W, _, H = layer
    out = pruning.sparsegpt_prune(W.half(), H, 0.5)
    assert out.dtype == torch.float32 and pruning.sparsity_of(out) == 0.5


def test_sparsegpt_dead_input_columns():
    dead = [0, 7, 50, 99]
    X = make_inputs(512, 128, seed=4, dead=dead)
    H = hessian_of(X)
    assert (torch.diag(H)[dead] == 0).all()
    W = make_weight(16, 128, seed=20)
    for kw in [dict(sparsity=0.5), dict(n=2, m=4)]:
        out = pruning.sparsegpt_prune(W, H, **kw)
        assert torch.isfinite(out).all()
        assert (out[:, dead] == 0).all()  # nothing to preserve on inputs that are always zero
        assert pruning.sparsity_of(out) == 0.5
    all_dead = pruning.sparsegpt_prune(W, torch.zeros(128, 128), 0.5)
    assert torch.isfinite(all_dead).all() and (all_dead == 0).all()


# ----------------------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def calib(tiny_llama):
    _, tok = tiny_llama
    return torch.randint(0, len(tok), (8, 32), generator=gen(0))


def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


CASES = [(method, pattern) for method in pruning.METHODS for pattern in ("50%", "2:4")]


def _prune(model, calib, method, pattern, **kw):
    nm = dict(pattern="2:4") if pattern == "2:4" else dict(sparsity=0.5)
    return pruning.prune_model(model, None if method == "magnitude" else calib, method, progress=False, **nm, **kw)


@pytest.fixture(scope="module")
def pruned(tiny_llama, calib):
    """{(method, pattern): (model, report)} pruned from tiny_llama, which must stay as it was."""
    model, _ = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = {case: _prune(model, calib, *case) for case in CASES}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    return out


@pytest.mark.parametrize("method,pattern", CASES)
def test_prune_model_reaches_the_sparsity_in_every_decoder_linear(tiny_llama, pruned, method, pattern):
    model, _ = tiny_llama
    pmodel, report = pruned[(method, pattern)]
    assert pmodel is not model
    n_layers = model.config.num_hidden_layers
    assert sorted(report) == sorted(f"model.layers.{i}.{p}" for i in range(n_layers) for p in PROJ)
    linears = _decoder_linears(pmodel)
    assert set(linears) == set(report)
    for name, lin in linears.items():
        W = lin.weight.data
        assert report[name] == pruning.sparsity_of(W) == 0.5, name
        assert W.dtype == model.get_submodule(name).weight.dtype
        if pattern == "2:4":
            assert (_groups_kept(W != 0, 4) == 2).all(), name
        else:
            assert not pruning.is_nm_sparse(W, 2, 4), name
        if method == "wanda":  # Wanda only zeroes weights: the survivors are the original values
            orig = model.get_submodule(name).weight
            assert torch.equal(W[W != 0], orig[W != 0]), name
    # embeddings, norms and the (tied) head are not pruned
    assert torch.equal(pmodel.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(pmodel.lm_head.weight, model.lm_head.weight)
    assert torch.equal(pmodel.model.norm.weight, model.model.norm.weight)
    assert pruning.sparsity_of(pmodel.model.embed_tokens.weight) == pruning.sparsity_of(model.model.embed_tokens.weight)
    assert pmodel.config.use_cache == model.config.use_cache


@pytest.mark.parametrize("method,pattern", CASES)
def test_pruned_model_runs(tiny_llama, pruned, calib, method, pattern):
    model, _ = tiny_llama
    pmodel, _ = pruned[(method, pattern)]
    with torch.no_grad():
        ref, out = model(calib[:2]).logits, pmodel(calib[:2]).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)


def test_pruned_model_masks(pruned):
    pmodel, _ = pruned[("wanda", "50%")]
    masks = pruning.mask_of(pmodel)
    assert set(masks) == {f"{n}.weight" for n in _decoder_linears(pmodel)}
    for name, keep in masks.items():
        assert keep.dtype == torch.bool and keep.float().mean().item() == 0.5, name


def test_sparsegpt_in_the_model_reconstructs_its_layer_better_than_wanda(tiny_llama, pruned, calib):
    """The first Linears of layer 0 see the same inputs in every method: compare their output errors."""
    model, _ = tiny_llama
    name = "model.layers.0.self_attn.q_proj"
    Xq = _captured_inputs(model, calib, name)
    W = model.get_submodule(name).weight
    errs = {meth: gptq.reconstruction_error(W, pruned[(meth, "50%")][0].get_submodule(name).weight, Xq).item()
            for meth in pruning.METHODS}
    assert errs["sparsegpt"] < errs["wanda"] and errs["sparsegpt"] < errs["magnitude"], errs


def _captured_inputs(model, calib, name):
    """(tokens, in) inputs of the named Linear when the model runs on calib."""
    xs = []
    h = model.get_submodule(name).register_forward_hook(lambda mod, inp, out: xs.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model(calib, use_cache=False)
    finally:
        h.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def test_wanda_and_sparsegpt_use_the_layer_inputs(tiny_llama, pruned, calib):
    """Layer 0's q/k/v are pruned first, from the unpruned model's inputs: recompute them directly."""
    model, _ = tiny_llama
    name = "model.layers.0.self_attn.q_proj"
    X = _captured_inputs(model, calib, name)
    W = model.get_submodule(name).weight.data
    acc = pruning.ActNorm(X.shape[1])
    acc.add_batch(X)
    keep = pruning.wanda_mask(W, acc.norm(), 0.5)
    assert torch.equal(pruned[("wanda", "50%")][0].get_submodule(name).weight != 0, keep)
    assert not torch.equal(keep, pruning.magnitude_mask(W, 0.5))  # the calibration data mattered
    hess = gptq.Hessian(X.shape[1])
    hess.add_batch(X)
    torch.testing.assert_close(pruned[("sparsegpt", "50%")][0].get_submodule(name).weight,
                               pruning.sparsegpt_prune(W, hess.H, 0.5), rtol=1e-4, atol=1e-6)


def test_wanda_mask_depends_on_the_calibration(tiny_llama, pruned, calib):
    model, tok = tiny_llama
    other = torch.randint(0, len(tok), (8, 32), generator=gen(123))
    pmodel, _ = pruning.prune_model(model, other, "wanda", 0.5, progress=False)
    mag = pruned[("magnitude", "50%")][0]
    first = pruned[("wanda", "50%")][0]
    differs_from_calib = differs_from_mag = 0
    for name, lin in _decoder_linears(pmodel).items():
        keep = lin.weight != 0
        differs_from_mag += not torch.equal(keep, mag.get_submodule(name).weight != 0)
        differs_from_calib += not torch.equal(keep, first.get_submodule(name).weight != 0)
    assert differs_from_mag == 14 and differs_from_calib >= 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_model_is_deterministic(tiny_llama, pruned, calib, method):
    model, _ = tiny_llama
    again, report = _prune(model, calib, method, "50%")
    first, first_report = pruned[(method, "50%")]
    assert report == first_report
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("method,pattern", [("wanda", "50%"), ("sparsegpt", "50%"), ("sparsegpt", "2:4")])
def test_prune_model_not_sequential(tiny_llama, pruned, calib, method, pattern):
    model, _ = tiny_llama
    pmodel, report = _prune(model, calib, method, pattern, sequential=False)
    assert len(report) == 14 and all(v == 0.5 for v in report.values())
    for name, lin in _decoder_linears(pmodel).items():
        assert pruning.sparsity_of(lin.weight) == 0.5, name
        if pattern == "2:4":
            assert pruning.is_nm_sparse(lin.weight, 2, 4), name
    # the first group of layer 0 sees the same inputs either way; later groups (o_proj sees pruned q/k/v or not) differ
    seq = pruned[(method, pattern)][0]
    q = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(pmodel.get_submodule(q).weight, seq.get_submodule(q).weight, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(lin.weight, seq.get_submodule(n).weight)
               for n, lin in _decoder_linears(pmodel).items())


def test_prune_model_inplace(tiny_llama, calib):
    model = copy.deepcopy(tiny_llama[0])
    pmodel, report = pruning.prune_model(model, calib, "wanda", 0.5, inplace=True, progress=False)
    assert pmodel is model
    assert pruning.sparsity_of(model.model.layers[1].mlp.down_proj.weight) == 0.5
    assert report["model.layers.1.mlp.down_proj"] == 0.5
    assert model.config.use_cache == tiny_llama[0].config.use_cache


def test_prune_model_other_sparsities(tiny_llama, calib):
    model, _ = tiny_llama
    _, rep = pruning.prune_model(model, None, "magnitude", 0.3, progress=False)
    assert all(abs(v - 0.3) < 1e-3 for v in rep.values()), rep
    _, rep = pruning.prune_model(model, calib, "wanda", pattern="1:4", progress=False)
    assert all(v == 0.75 for v in rep.values()), rep
    _, rep = pruning.prune_model(model, None, "magnitude", 0.0, progress=False)
    assert all(v == 0.0 for v in rep.values()), rep


def test_finetune_masked_keeps_the_mask_and_trains_the_survivors(tiny_llama, calib):
    model = copy.deepcopy(tiny_llama[0])
    pruning.prune_model(model, None, "magnitude", pattern="2:4", inplace=True, progress=False)
    masks = pruning.mask_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    losses = pruning.finetune_masked(model, calib[:1], steps=5, lr=1e-3, batch_size=2, progress=False)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # one window, five steps: the loss goes down
    after = pruning.mask_of(model)
    assert set(after) == set(masks) and len(masks) == 14
    for name, keep in masks.items():
        W = model.get_submodule(name.removesuffix(".weight")).weight
        assert torch.equal(after[name], keep), name  # the pruned weights are exactly 0 again
        assert pruning.is_nm_sparse(W, 2, 4), name
        assert not torch.equal(W, before[name]), name  # the survivors were trained
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(model.state_dict()[name], before[name]), name  # frozen
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads  # restored


def test_magnitude_mask_on_the_real_model(smollm):
    model, _ = smollm
    W = model.model.layers[0].self_attn.q_proj.weight.data
    W0 = W.clone()
    keep = pruning.magnitude_mask(W, 0.5)
    assert keep.shape == W.shape and int((~keep).sum()) == W.numel() // 2
    assert W.abs()[~keep].max() <= W.abs()[keep].min()
    assert pruning.is_nm_sparse(pruning.apply_mask(W, pruning.magnitude_mask(W, n=2, m=4)), 2, 4)
    assert torch.equal(W, W0)


# ----------------------------------------------------------------------------- structured: MLP neurons


@pytest.fixture(scope="module")
def structured(tiny_llama, calib):
    model, _ = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = pruning.prune_mlp_neurons(model, calib, ratio=0.3, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    return small, report


def test_structured_shapes_config_and_parameter_count(tiny_llama, structured):
    model, _ = tiny_llama
    small, report = structured
    keep_n = 88  # 128 * 0.7 = 89.6 -> the nearest multiple of 8
    hidden = model.config.hidden_size
    assert small.config.intermediate_size == keep_n
    assert model.config.intermediate_size == 128  # the original's config is untouched
    assert sorted(report) == [0, 1]
    for li, layer in enumerate(small.model.layers):
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (keep_n, hidden)
        assert mlp.down_proj.weight.shape == (hidden, keep_n)
        assert mlp.intermediate_size == keep_n
        idx = report[li]
        assert idx.shape == (keep_n,) and torch.equal(idx, idx.sort().values) and idx.unique().numel() == keep_n
        orig = model.model.layers[li].mlp
        assert torch.equal(mlp.gate_proj.weight, orig.gate_proj.weight[idx])
        assert torch.equal(mlp.up_proj.weight, orig.up_proj.weight[idx])
        assert torch.equal(mlp.down_proj.weight, orig.down_proj.weight[:, idx])
        # attention is untouched
        assert torch.equal(layer.self_attn.q_proj.weight, model.model.layers[li].self_attn.q_proj.weight)
    removed = 2 * (128 - keep_n) * 3 * hidden
    assert pruning.count_parameters(model) - pruning.count_parameters(small) == removed


def test_structured_model_runs_forward_and_generate(tiny_llama, structured, calib):
    model, tok = tiny_llama
    small, _ = structured
    with torch.no_grad():
        out = small(calib[:2]).logits
    assert out.shape == (2, 32, model.config.vocab_size) and torch.isfinite(out).all()
    enc = tok(["The history of"], return_tensors="pt")
    gen = small.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, enc.input_ids.shape[1] + 4)


def _neuron_score(model, calib, li):
    acts = _captured_inputs(model, calib, f"model.layers.{li}.mlp.down_proj")
    acc = pruning.ActNorm(acts.shape[1])
    acc.add_batch(acts)
    return acc.norm() * model.model.layers[li].mlp.down_proj.weight.norm(dim=0)


def test_structured_keeps_the_highest_scoring_neurons(tiny_llama, structured, calib):
    model, _ = tiny_llama
    small, report = structured
    # layer 0: computed directly on the original model
    score = _neuron_score(model, calib, 0)
    assert torch.equal(report[0], score.topk(88).indices.sort().values)
    dropped = torch.ones(128, dtype=torch.bool)
    dropped[report[0]] = False
    assert score[report[0]].min() >= score[dropped].max()
    # layer 1 is scored on the outputs of the already-pruned layer 0: put its original MLP back and measure
    hybrid = copy.deepcopy(small)
    hybrid.model.layers[1].mlp = copy.deepcopy(model.model.layers[1].mlp)
    score1 = _neuron_score(hybrid, calib, 1)
    assert torch.equal(report[1], score1.topk(88).indices.sort().values)


def test_structured_ratio_zero_is_the_original_model(tiny_llama, calib):
    model, _ = tiny_llama
    same, report = pruning.prune_mlp_neurons(model, calib, ratio=0.0, progress=False)
    assert same.config.intermediate_size == 128
    assert all(torch.equal(idx, torch.arange(128)) for idx in report.values())
    assert pruning.count_parameters(same) == pruning.count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(same(calib[:2]).logits, model(calib[:2]).logits)


@pytest.mark.parametrize("ratio,multiple_of", [(0.0, 48), (0.1, 256)])
def test_structured_never_keeps_more_neurons_than_exist(tiny_llama, calib, ratio, multiple_of):
    model, _ = tiny_llama
    try:
        small, _ = pruning.prune_mlp_neurons(model, calib[:2], ratio=ratio, multiple_of=multiple_of, progress=False)
    except ValueError:  # a clear refusal would be fine too
        return
    assert small.config.intermediate_size <= model.config.intermediate_size
    assert all(layer.mlp.up_proj.out_features <= 128 for layer in small.model.layers)


@pytest.mark.parametrize("ratio,keep_n", [(0.25, 96), (0.5, 64), (0.97, 8)])
def test_structured_rounds_to_multiple_of(tiny_llama, calib, ratio, keep_n):
    model, _ = tiny_llama
    small, report = pruning.prune_mlp_neurons(model, calib[:2], ratio=ratio, progress=False)
    assert small.config.intermediate_size == keep_n
    assert all(layer.mlp.up_proj.out_features == keep_n for layer in small.model.layers)


def test_structured_inplace(tiny_llama, calib):
    model = copy.deepcopy(tiny_llama[0])
    small, _ = pruning.prune_mlp_neurons(model, calib[:2], ratio=0.5, multiple_of=16, inplace=True, progress=False)
    assert small is model and model.model.layers[0].mlp.down_proj.in_features == 64
    assert model.config.intermediate_size == 64


# ----------------------------------------------------------------------------- 2:4 on hardware, speed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_semi_structured_unavailable_on_cpu(tiny_llama):
    ok, reason = pruning.semi_structured_supported()
    assert ok is False and isinstance(reason, str)
    assert "sm80" in reason and "GPU" in reason
    model = copy.deepcopy(tiny_llama[0]).half()
    with pytest.raises(RuntimeError, match="2:4 semi-structured kernels unavailable.*sm80"):
        pruning.to_semi_structured(model)


def test_semi_structured_bytes_is_nine_sixteenths_of_fp16():
    W = torch.randn(128, 256).half()
    W = pruning.apply_mask(W, pruning.magnitude_mask(W, n=2, m=4))
    dense = W.numel() * W.element_size()
    assert pruning.semi_structured_bytes(W) * 16 == dense * 9


def test_matmul_seconds_and_prefill_seconds(tiny_llama):
    t = evaluation.matmul_seconds(torch.randn(64, 64), torch.randn(8, 64), repeats=5)
    assert isinstance(t, float) and t > 0
    model, tok = tiny_llama
    p = evaluation.prefill_seconds(model, tok, seq_len=64, repeats=2)
    assert isinstance(p, float) and 0 < p < 60


def test_count_parameters_counts_a_tied_head_once(tiny_llama):
    model, _ = tiny_llama
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert pruning.count_parameters(model) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert pruning.count_parameters(nn.Linear(4, 3)) == 15


# ----------------------------------------------------------------------------- bad input


BAD_SPARSITY = "sparsity is the fraction of weights removed and must be in \\[0, 1\\)"


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, None, "0.5"])
def test_bad_sparsity_raises(layer, sparsity):
    W, _, H = layer
    match = BAD_SPARSITY if sparsity is not None else "pass a sparsity"
    with pytest.raises(ValueError, match=match):
        pruning.magnitude_mask(W, sparsity)
    with pytest.raises(ValueError, match=match):
        pruning.wanda_mask(W, torch.ones(W.shape[1]), sparsity)
    with pytest.raises(ValueError, match=match):
        pruning.sparsegpt_prune(W, H, sparsity)
    if sparsity is not None:
        with pytest.raises(ValueError, match=BAD_SPARSITY):
            pruning.row_mask(W, sparsity)
        with pytest.raises(ValueError, match=BAD_SPARSITY):
            pruning.layer_mask(W, sparsity)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_prune_model_bad_sparsity_raises(tiny_llama, calib, sparsity):
    model, _ = tiny_llama
    for method in pruning.METHODS:
        with pytest.raises(ValueError, match=BAD_SPARSITY):
            pruning.prune_model(model, calib, method, sparsity, progress=False)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (-1, 4), (2, 0)])
def test_bad_n_m_raises(layer, n, m):
    W, _, H = layer
    match = "0 < N < M"
    with pytest.raises(ValueError, match=match):
        pruning.magnitude_mask(W, n=n, m=m)
    with pytest.raises(ValueError, match=match):
        pruning.wanda_mask(W, torch.ones(W.shape[1]), n=n, m=m)
    with pytest.raises(ValueError, match=match):
        pruning.nm_mask(W, n, m)
    with pytest.raises(ValueError, match=match):
        pruning.sparsegpt_prune(W, H, n=n, m=m)
    with pytest.raises(ValueError, match=match):
        pruning.is_nm_sparse(W, n, m)


def test_m_must_divide_in_features():
    W = torch.randn(4, 10)
    match = "M=4 must divide in_features=10"
    with pytest.raises(ValueError, match=match):
        pruning.magnitude_mask(W, n=2, m=4)
    with pytest.raises(ValueError, match=match):
        pruning.wanda_mask(W, torch.ones(10), n=2, m=4)
    with pytest.raises(ValueError, match=match):
        pruning.sparsegpt_prune(W, torch.eye(10), n=2, m=4)
    with pytest.raises(ValueError, match=match):
        pruning.is_nm_sparse(W, 2, 4)


@pytest.mark.parametrize("nm", [dict(n=2), dict(m=4), dict(n=2, m=None), dict(n=None, m=4)])
def test_only_one_of_n_and_m_raises(layer, nm):
    W, _, H = layer
    match = "pass both n and m"
    with pytest.raises(ValueError, match=match):
        pruning.magnitude_mask(W, **nm)
    with pytest.raises(ValueError, match=match):
        pruning.wanda_mask(W, torch.ones(W.shape[1]), **nm)
    with pytest.raises(ValueError, match=match):
        pruning.sparsegpt_prune(W, H, **nm)


def test_apply_mask_rejects_a_wrong_mask():
    W = torch.randn(4, 8)
    match = "the mask must be a bool tensor of the weight's shape"
    with pytest.raises(ValueError, match=match):
        pruning.apply_mask(W, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=match):
        pruning.apply_mask(W, torch.ones(8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=match):
        pruning.apply_mask(W, torch.ones(4, 8))  # float 0/1 mask
    with pytest.raises(ValueError, match=match):
        pruning.apply_mask(W, torch.ones(4, 8, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(7,), (9,), (1, 8), (8, 1)])
def test_wanda_rejects_act_norm_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match="act_norm must have one entry per input column"):
        pruning.wanda_mask(torch.randn(4, 8), torch.ones(shape), 0.5)


def test_3d_weight_raises():
    W = torch.randn(2, 4, 8)
    match = "expected a Linear weight of shape \\(out, in\\)"
    with pytest.raises(ValueError, match=match):
        pruning.magnitude_mask(W, 0.5)
    with pytest.raises(ValueError, match=match):
        pruning.wanda_mask(W, torch.ones(8), 0.5)
    with pytest.raises(ValueError, match=match):
        pruning.row_mask(W, 0.5)
    with pytest.raises(ValueError, match=match):
        pruning.nm_mask(W, 2, 4)
    with pytest.raises(ValueError, match=match):
        pruning.sparsegpt_prune(W, torch.eye(8), 0.5)
    with pytest.raises(ValueError, match=match):
        pruning.magnitude_mask(torch.randn(8), 0.5)


def test_prune_model_bad_inputs(tiny_llama, calib):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="method must be one of"):
        pruning.prune_model(model, calib, "random", 0.5, progress=False)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=f"{method} needs calibration data"):
            pruning.prune_model(model, None, method, 0.5, progress=False)
    with pytest.raises(TypeError, match="decoder-only"):
        pruning.prune_model(nn.Linear(64, 64), calib, "magnitude", 0.5, progress=False)
    with pytest.raises(TypeError, match="decoder-only"):
        pruning.prune_mlp_neurons(nn.Linear(64, 64), calib, 0.5, progress=False)
    with pytest.raises(ValueError, match="0 < N < M"):
        pruning.prune_model(model, None, "magnitude", pattern="4:4", progress=False)
    with pytest.raises(ValueError, match="must look like '2:4'"):
        pruning.prune_model(model, None, "magnitude", pattern="2", progress=False)
    with pytest.raises(TypeError, match="pattern='2:4', not n=, m="):  # the per-matrix spelling is not the model's
        pruning.prune_model(model, None, "magnitude", n=2, m=4, progress=False)
    with pytest.raises(ValueError, match="block_size=6 must be a multiple of M=4"):
        pruning.prune_model(model, calib[:2], "sparsegpt", pattern="2:4", block_size=6, progress=False)


@pytest.mark.parametrize("pattern,match", [("0:4", "0 < N < M"), (":4", "must look like '2:4'"), (None, "pass a sparsity")])
def test_prune_model_bad_pattern_without_sparsity_raises_a_clear_error(tiny_llama, pattern, match):
    with pytest.raises(ValueError, match=match):
        pruning.prune_model(tiny_llama[0], None, "magnitude", sparsity=None, pattern=pattern, progress=False)


def test_sparsegpt_bad_hessian_and_block_size(layer):
    W, _, H = layer
    with pytest.raises(ValueError, match="H must be \\(in, in\\)"):
        pruning.sparsegpt_prune(W, H[:64, :64], 0.5)
    with pytest.raises(ValueError, match="H must be \\(in, in\\)"):
        pruning.sparsegpt_prune(W, H[:, :64], 0.5)
    with pytest.raises(ValueError, match="H must be \\(in, in\\)"):
        pruning.sparsegpt_prune(W, torch.diag(H), 0.5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        Hb = H.clone()
        Hb[3, 5] = bad
        with pytest.raises(ValueError, match="NaN/inf"):
            pruning.sparsegpt_prune(W, Hb, 0.5)
    with pytest.raises(ValueError, match="block_size=6 must be a multiple of M=4"):
        pruning.sparsegpt_prune(W, H, n=2, m=4, block_size=6)
    with pytest.raises(ValueError, match="block_size=20 must be a multiple of M=8"):
        pruning.sparsegpt_prune(W, H, n=4, m=8, block_size=20)
    with pytest.raises(ValueError, match="group_size=48 must divide in_features=128"):
        pruning.sparsegpt_prune(W, H, 0.5, bits=4, group_size=48)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_structured_bad_ratio_raises(tiny_llama, calib, ratio):
    with pytest.raises(ValueError, match="ratio is the fraction of MLP neurons removed and must be in \\[0, 1\\)"):
        pruning.prune_mlp_neurons(tiny_llama[0], calib, ratio=ratio, progress=False)


# ----------------------------------------------------------------------------- sparsity and N:M together


def test_a_sparsity_that_contradicts_n_m_is_an_error():
    W = make_weight(8, 16)
    assert pruning.magnitude_mask(W, 0.5, n=2, m=4).equal(pruning.magnitude_mask(W, n=2, m=4))  # consistent: fine
    with pytest.raises(ValueError, match="contradicts"):
        pruning.magnitude_mask(W, 0.9, n=2, m=4)
    with pytest.raises(ValueError, match="contradicts"):
        pruning.wanda_mask(W, torch.ones(16), 0.3, n=4, m=8)
    with pytest.raises(ValueError, match="pass a sparsity"):
        pruning.wanda_mask(W, torch.ones(16))


def test_prune_model_refuses_sparsegpt_options_for_other_methods(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(TypeError, match="SparseGPT options"):
        pruning.prune_model(model, None, "magnitude", 0.5, bits=4, progress=False)
    with pytest.raises(ValueError, match="contradicts"):
        pruning.prune_model(model, None, "magnitude", 1.5, pattern="2:4", progress=False)


def test_decoder_sparsity_reads_what_the_report_says(tiny_llama, calib):
    model, report = pruning.prune_model(tiny_llama[0], calib, "wanda", pattern="2:4", progress=False)
    assert pruning.decoder_sparsity(model) == report
    assert set(pruning.decoder_sparsity(tiny_llama[0]).values()) == {0.0}  # the dense model: no zeros
