"""Knowledge distillation (compresslab.distill), lab 05: the softened distributions and divergences, the KD loss against
a plain float64 computation, the top-k teacher cache, the pruned student (block influence, layer dropping), the
training loop, the training windows (compresslab.data) and bad input.

Loss tests run on seeded random logits of a small vocabulary, against float64 sums written out by hand. Model tests
use the `tiny_llama` fixture (a random 2-layer Llama, hidden 64, SmolLM2's tokenizer and 49152-token vocabulary) or
smaller random Llamas built here; whatever trains or edits a model works on a copy, never on the session's fixture.
The real model is never run (its tokenizer is, for the training windows).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from layer_testing import gen

from compresslab import data
from compresslab import distill as D

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread for the module

KINDS = ["forward", "reverse", "skew"]


def rand_logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def rand_labels(*shape, vocab, seed=0, ignore=()):
    labels = torch.randint(0, vocab, shape, generator=gen(seed))
    for pos in ignore:
        labels[pos] = -100
    return labels


def manual_kd(student, teacher, labels, T, alpha, kind, skew=0.1):
    """The KD loss, position by position in float64 with explicit sums: no torch softmax, no masking tricks."""
    s = student.detach().double().reshape(-1, student.shape[-1])
    t = teacher.detach().double().reshape(-1, teacher.shape[-1])
    lab = None if labels is None else labels.reshape(-1).tolist()
    ce_sum, soft_sum, n = 0.0, 0.0, 0
    for i in range(s.shape[0]):
        if lab is not None and lab[i] == -100:
            continue
        n += 1
        es, et = [math.exp(v / T) for v in s[i].tolist()], [math.exp(v / T) for v in t[i].tolist()]
        q = [v / sum(es) for v in es]  # student at T
        p = [v / sum(et) for v in et]  # teacher at T
        if kind == "forward":
            d = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        elif kind == "reverse":
            d = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        else:
            d = sum(pi * math.log(pi / (skew * pi + (1 - skew) * qi)) for pi, qi in zip(p, q))
        soft_sum += d
        if lab is not None:
            e1 = [math.exp(v) for v in s[i].tolist()]  # the hard loss is at T = 1
            ce_sum += -math.log(e1[lab[i]] / sum(e1))
    soft = T**2 * soft_sum / n
    ce = ce_sum / n
    return alpha * ce + (1 - alpha) * soft


def tiny_model(vocab=256, layers=2, hidden=32, inter=64, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- softened distributions, divergences


def test_softmax_T_and_log_softmax_T_match_the_definition():
    z = rand_logits(3, 7, seed=1)
    for T in (0.5, 1.0, 3.0):
        manual = torch.exp(z / T) / torch.exp(z / T).sum(-1, keepdim=True)
        assert torch.allclose(D.softmax_T(z, T), manual, atol=1e-12)
        assert torch.allclose(D.log_softmax_T(z, T), manual.log(), atol=1e-12)
    entropy = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    # T > 1 flattens (more entropy), T < 1 sharpens
    assert (entropy(D.softmax_T(z, 3.0)) > entropy(D.softmax_T(z, 1.0))).all()
    assert (entropy(D.softmax_T(z, 0.5)) < entropy(D.softmax_T(z, 1.0))).all()


def test_log_softmax_T_is_stable_for_huge_logits():
    z = torch.tensor([[1e4, 0.0, -1e4], [3e4, 3e4, 0.0]])
    out = D.log_softmax_T(z, 1e-3)
    assert torch.isfinite(out).all()  # log(softmax) would give -inf
    assert out[0, 0] == 0 and out[0, 1] == -1e7
    assert torch.allclose(out[1, :2], torch.full((2,), -math.log(2)))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2", None])
def test_softmax_T_rejects_a_bad_temperature(bad):
    for fn in (D.softmax_T, D.log_softmax_T):
        with pytest.raises(ValueError, match="temperature T must be a finite number > 0"):
            fn(torch.zeros(2, 3), bad)


def test_divergence_kinds_match_their_formulas():
    lp, lq = D.log_softmax_T(rand_logits(4, 6, seed=2)), D.log_softmax_T(rand_logits(4, 6, seed=3))
    p, q = lp.exp(), lq.exp()
    assert torch.allclose(D.divergence(lp, lq, "forward"), (p * (p / q).log()).sum(-1))
    assert torch.allclose(D.divergence(lp, lq, "reverse"), (q * (q / p).log()).sum(-1))
    for s in (0.0, 0.1, 0.7):
        m = s * p + (1 - s) * q
        assert torch.allclose(D.divergence(lp, lq, "skew", skew=s), (p * (p / m).log()).sum(-1))
    assert torch.allclose(D.divergence(lp, lq, "skew", skew=0.0), D.divergence(lp, lq, "forward"))


def test_divergences_are_nonnegative_zero_on_equal_inputs_and_asymmetric():
    for seed in range(5):
        lp = D.log_softmax_T(rand_logits(8, 11, seed=seed, scale=3.0))
        lq = D.log_softmax_T(rand_logits(8, 11, seed=100 + seed, scale=3.0))
        for kind in KINDS:
            assert (D.divergence(lp, lq, kind) >= 0).all()
            assert torch.allclose(D.divergence(lp, lp, kind), torch.zeros(8, dtype=torch.float64), atol=1e-12)
        # KL is not symmetric: reverse(p, q) = forward(q, p) != forward(p, q)
        assert torch.allclose(D.divergence(lp, lq, "reverse"), D.divergence(lq, lp, "forward"))
        assert not torch.allclose(D.divergence(lp, lq, "forward"), D.divergence(lp, lq, "reverse"), rtol=1e-2)
    # skew KL is bounded by log(1 / skew) even where the student has (almost) no mass
    lp = torch.log(torch.tensor([0.5, 0.5, 1e-30], dtype=torch.float64))
    lq = torch.log(torch.tensor([1e-30, 1e-30, 1.0], dtype=torch.float64))
    assert D.divergence(lp, lq, "skew", skew=0.1) <= math.log(10) + 1e-9
    assert D.divergence(lp, lq, "forward") > 10 * math.log(10)


# ----------------------------------------------------------------------------- the KD loss against a manual computation


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kd_loss_matches_a_manual_computation(kind, alpha, T):
    s, t = rand_logits(2, 4, 6, seed=1), rand_logits(2, 4, 6, seed=2)
    labels = rand_labels(2, 4, vocab=6, seed=3, ignore=[(0, 1), (1, 0), (1, 3)])  # 5 of 8 positions counted
    got = D.kd_loss(s, t, labels, T=T, alpha=alpha, kind=kind, skew=0.2)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(manual_kd(s, t, labels, T, alpha, kind, skew=0.2), rel=1e-10)


def test_ignored_positions_count_in_neither_term():
    s, t = rand_logits(2, 4, 6, seed=1), rand_logits(2, 4, 6, seed=2)
    labels = rand_labels(2, 4, vocab=6, seed=3, ignore=[(0, 1), (1, 0)])
    for alpha in (0.0, 0.4, 1.0):
        ref = D.kd_loss(s, t, labels, alpha=alpha)
        s2, t2 = s.clone(), t.clone()
        s2[0, 1] += 50 * torch.randn(6, dtype=torch.float64)  # whatever happens at an ignored position...
        t2[1, 0] = -t2[1, 0] * 10
        assert D.kd_loss(s2, t2, labels, alpha=alpha).item() == pytest.approx(ref.item(), rel=1e-12)  # ...is unseen
    # the average is over the counted positions only (6), not all 8
    keep = labels != -100
    soft = D.kd_loss(s, t, labels, alpha=0.0)
    per_pos = 4.0 * D.divergence(D.log_softmax_T(t, 2.0), D.log_softmax_T(s, 2.0))
    assert soft.item() == pytest.approx(per_pos[keep].mean().item(), rel=1e-12)
    assert soft.item() != pytest.approx(per_pos.mean().item(), rel=1e-3)


def test_alpha_zero_without_labels_averages_every_position():
    s, t = rand_logits(3, 5, 7, seed=4), rand_logits(3, 5, 7, seed=5)
    for kind in KINDS:
        got = D.kd_loss(s, t, None, T=1.5, alpha=0.0, kind=kind)
        assert got.item() == pytest.approx(manual_kd(s, t, None, 1.5, 0.0, kind), rel=1e-10)
        ce, soft = D.kd_terms(s, t, None, T=1.5, kind=kind)
        assert ce is None and soft.item() == pytest.approx(got.item(), rel=1e-12)


def test_kd_terms_are_the_two_parts_of_kd_loss():
    s, t = rand_logits(2, 3, 5, seed=6), rand_logits(2, 3, 5, seed=7)
    labels = rand_labels(2, 3, vocab=5, seed=8, ignore=[(1, 2)])
    ce, soft = D.kd_terms(s, t, labels, T=3.0, kind="reverse")
    assert ce.item() == pytest.approx(manual_kd(s, t, labels, 3.0, 1.0, "reverse"), rel=1e-10)
    assert soft.item() == pytest.approx(manual_kd(s, t, labels, 3.0, 0.0, "reverse"), rel=1e-10)
    loss = D.kd_loss(s, t, labels, T=3.0, alpha=0.25, kind="reverse")
    assert loss.item() == pytest.approx(0.25 * ce.item() + 0.75 * soft.item(), rel=1e-12)


def test_the_soft_term_is_scaled_by_T_squared():
    s, t = rand_logits(2, 3, 8, seed=9), rand_logits(2, 3, 8, seed=10)
    for T in (1.0, 4.0):
        kl = manual_kd(s, t, None, T, 0.0, "forward") / T**2  # the plain mean KL at T
        assert D.kd_loss(s, t, T=T, alpha=0.0).item() == pytest.approx(T**2 * kl, rel=1e-10)
    # why T^2: at high T the gradient of T^2 KL tends to (z_s - z_t - mean) / V per position, whatever T is
    s_small, t_small = rand_logits(1, 1, 8, seed=11, scale=0.1), rand_logits(1, 1, 8, seed=12, scale=0.1)
    grads = []
    for T in (4.0, 40.0):
        x = s_small.clone().requires_grad_(True)
        D.kd_loss(x, t_small, T=T, alpha=0.0).backward()
        grads.append(x.grad)
    diff = (s_small - t_small)[0, 0]
    limit = (diff - diff.mean()) / 8
    assert torch.allclose(grads[1][0, 0], limit, rtol=0.02, atol=1e-5)
    assert torch.allclose(grads[0][0, 0], limit, rtol=0.1, atol=1e-4)  # without T^2: limit / T


def test_alpha_one_is_plain_cross_entropy_over_counted_positions():
    s, t = rand_logits(3, 4, 9, seed=13, dtype=torch.float32), rand_logits(3, 4, 9, seed=14, dtype=torch.float32)
    labels = rand_labels(3, 4, vocab=9, seed=15, ignore=[(0, 0), (2, 3)])
    expected = F.cross_entropy(s.reshape(-1, 9), labels.reshape(-1), ignore_index=-100)
    got = D.kd_loss(s, t, labels, alpha=1.0)
    assert torch.allclose(got, expected)
    # the teacher plays no part at alpha = 1 (it only has to have the right shape)
    assert torch.allclose(D.kd_loss(s, torch.zeros_like(t), labels, alpha=1.0), expected)
    keep = labels != -100
    assert torch.allclose(got, F.cross_entropy(s[keep], labels[keep]))


def test_alpha_one_needs_no_teacher():
    s = rand_logits(2, 3, 5, seed=16)
    labels = rand_labels(2, 3, vocab=5, seed=17)
    assert torch.allclose(D.kd_loss(s, None, labels, alpha=1.0), F.cross_entropy(s.reshape(-1, 5), labels.reshape(-1)))


def test_forward_and_reverse_differ_and_vanish_when_student_equals_teacher():
    s, t = rand_logits(2, 3, 6, seed=18, scale=3.0), rand_logits(2, 3, 6, seed=19, scale=3.0)
    fwd, rev = (D.kd_loss(s, t, alpha=0.0, kind=k).item() for k in ("forward", "reverse"))
    assert fwd > 0 and rev > 0 and abs(fwd - rev) > 1e-3 * max(fwd, rev)
    for kind in KINDS:
        assert D.kd_loss(s, s.clone(), alpha=0.0, kind=kind).item() == pytest.approx(0.0, abs=1e-12)
        for seed in range(4):
            a, b = rand_logits(3, 5, seed=seed, scale=4.0), rand_logits(3, 5, seed=50 + seed, scale=4.0)
            assert D.kd_loss(a, b, alpha=0.0, kind=kind, T=0.7) >= 0


# ----------------------------------------------------------------------------- numerics, gradients


@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_is_finite_for_huge_logits_and_tiny_temperature(kind):
    s = rand_logits(2, 3, 10, seed=20, scale=1e4, dtype=torch.float32).requires_grad_(True)
    t = rand_logits(2, 3, 10, seed=21, scale=1e4, dtype=torch.float32)
    labels = rand_labels(2, 3, vocab=10, seed=22)
    for T in (1e-3, 1.0, 100.0):
        loss = D.kd_loss(s, t, labels, T=T, alpha=0.5, kind=kind)
        s.grad = None
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), (T, loss)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    s = rand_logits(2, 5, 50, seed=23, scale=8.0, dtype=dtype).requires_grad_(True)
    t = rand_logits(2, 5, 50, seed=24, scale=8.0, dtype=dtype)
    labels = rand_labels(2, 5, vocab=50, seed=25, ignore=[(0, 0)])
    for kind in KINDS:
        loss = D.kd_loss(s, t, labels, T=0.5, alpha=0.3, kind=kind)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        ref = D.kd_loss(s.detach().float(), t.float(), labels, T=0.5, alpha=0.3, kind=kind)  # same rounded inputs
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        s.grad = None
        loss.backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_gradcheck(kind):
    s = rand_logits(2, 3, 5, seed=26).requires_grad_(True)
    t = rand_logits(2, 3, 5, seed=27)
    labels = rand_labels(2, 3, vocab=5, seed=28, ignore=[(1, 1)])
    assert torch.autograd.gradcheck(lambda x: D.kd_loss(x, t, labels, T=1.7, alpha=0.3, kind=kind, skew=0.2), (s,))
    assert torch.autograd.gradcheck(lambda x: D.kd_loss(x, t, None, T=0.8, alpha=0.0, kind=kind), (s,))
    cache = D.topk_logits(t, k=2, T=1.7)
    assert torch.autograd.gradcheck(lambda x: D.kd_loss(x, cache, labels, T=1.7, alpha=0.3, kind=kind), (s,))


def test_the_teacher_gets_no_gradient():
    s = rand_logits(2, 3, 5, seed=29).requires_grad_(True)
    labels = rand_labels(2, 3, vocab=5, seed=30)
    for kind in KINDS:
        t = rand_logits(2, 3, 5, seed=31).requires_grad_(True)
        D.kd_loss(s, t, labels, alpha=0.5, kind=kind).backward()
        assert t.grad is None or not t.grad.any()
        assert s.grad is not None and s.grad.abs().sum() > 0
        s.grad = None


# ----------------------------------------------------------------------------- bad input


BAD_KD = [
    (dict(t_shape=(2, 3, 6)), "differ in vocabulary"),
    (dict(t_shape=(1, 3, 5)), "differ in batch/sequence"),
    (dict(t_shape=(2, 4, 5)), "differ in batch/sequence"),
    (dict(T=0), "temperature T must be a finite number > 0"),
    (dict(T=-2.0), "temperature T must be a finite number > 0"),
    (dict(T=float("nan")), "temperature T must be a finite number > 0"),
    (dict(T=float("inf")), "temperature T must be a finite number > 0"),
    (dict(T=True), "temperature T must be a finite number > 0"),
    (dict(alpha=-0.1), r"alpha .* must be in \[0, 1\]"),
    (dict(alpha=1.5), r"alpha .* must be in \[0, 1\]"),
    (dict(alpha=True), r"alpha .* must be in \[0, 1\]"),
    (dict(alpha=0.5, labels=None), "pass labels, or use alpha = 0"),
    (dict(kind="js"), "kind must be one of"),
    (dict(labels_shape=(2, 4)), "must have the logits' leading shape"),
    (dict(labels_shape=(6,)), "must have the logits' leading shape"),
    (dict(all_ignored=True), "nothing to learn from"),
    (dict(kind="skew", skew=1.0), r"skew .* must be in \[0, 1\)"),
    (dict(kind="skew", skew=-0.1), r"skew .* must be in \[0, 1\)"),
    (dict(kind="skew", skew=1.5), r"skew .* must be in \[0, 1\)"),
]


@pytest.mark.parametrize("bad,match", BAD_KD, ids=[f"{i}-{next(iter(b))}" for i, (b, _) in enumerate(BAD_KD)])
def test_kd_loss_rejects_bad_input(bad, match):
    s = rand_logits(2, 3, 5, seed=32)
    t = rand_logits(*bad.get("t_shape", (2, 3, 5)), seed=33)
    labels = rand_labels(*bad.get("labels_shape", (2, 3)), vocab=5, seed=34)
    if bad.get("all_ignored"):
        labels[:] = -100
    if "labels" in bad:
        labels = bad["labels"]
    kw = {k: bad[k] for k in ("T", "alpha", "kind", "skew") if k in bad}
    with pytest.raises(ValueError, match=match):
        D.kd_loss(s, t, labels, **kw)


def test_kd_terms_and_divergence_reject_bad_input():
    with pytest.raises(ValueError, match="student_logits must be a tensor"):
        D.kd_terms(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="kind must be one of"):
        D.divergence(torch.zeros(2, 3), torch.zeros(2, 3), kind="backward")
    with pytest.raises(ValueError, match="nothing to learn from"):
        D.kd_terms(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.full((1, 2), 7), ignore_index=7)


# ----------------------------------------------------------------------------- the top-k teacher cache


def test_topk_logits_keeps_the_k_largest_and_the_exact_normaliser():
    z = rand_logits(2, 3, 20, seed=35, dtype=torch.float32)
    c = D.topk_logits(z, k=4, T=2.0)
    assert c.values.shape == c.indices.shape == (2, 3, 4) and c.log_z.shape == (2, 3)
    assert c.values.dtype == torch.float16 and c.shape == (2, 3, 20) and c.T == 2.0 and c.vocab_size == 20
    ref = z.topk(4, dim=-1)
    assert torch.equal(c.indices.long(), ref.indices)
    top = ref.values[..., :1]
    assert (c.values[..., 0] == 0).all(), "values are stored relative to the largest logit (exact 0 in float16)"
    assert torch.allclose(c.values.float(), ref.values - top, atol=2e-3)
    assert torch.allclose(c.log_z, torch.logsumexp((z - top) / 2.0, -1))
    assert torch.allclose(c.log_probs()[..., :4], torch.log_softmax(z / 2.0, -1).gather(-1, ref.indices), atol=2e-3)
    rows = c.rows(torch.tensor([1, 0, 1]))
    assert rows.values.shape == (3, 3, 4) and torch.equal(rows.indices[0], c.indices[1]) and rows.T == 2.0


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_topk_log_probs_sum_to_one_and_rest_mass_shrinks_with_k(T):
    z = rand_logits(3, 4, 30, seed=36, dtype=torch.float32)  # the cache keeps z - max z in float16: ~1e-3 error
    previous = torch.ones(3, 4)
    p = torch.softmax(z / T, -1)
    for k in (1, 3, 10, 29):
        c = D.topk_logits(z, k=k, T=T)
        lp = c.log_probs()
        assert lp.shape == (3, 4, k + 1)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
        rest = c.rest_mass()
        assert ((rest >= 0) & (rest <= 1)).all() and (rest < previous).all()
        assert torch.allclose(rest, 1 - p.topk(k, -1).values.sum(-1), atol=2e-3)
        assert torch.allclose(lp[..., :-1].exp(), p.topk(k, -1).values, atol=2e-3)
        previous = rest


@pytest.mark.parametrize("kind", KINDS)
def test_cached_loss_is_close_to_the_full_loss_when_almost_everything_is_kept(kind):
    s, t = rand_logits(3, 5, 40, seed=37, dtype=torch.float32), rand_logits(3, 5, 40, seed=38, dtype=torch.float32)
    labels = rand_labels(3, 5, vocab=40, seed=39, ignore=[(0, 0)])
    full = D.kd_loss(s, t, labels, T=2.0, alpha=0.3, kind=kind)
    cached = D.kd_loss(s, D.topk_logits(t, k=39, T=2.0), labels, T=2.0, alpha=0.3, kind=kind)
    assert cached.item() == pytest.approx(full.item(), rel=2e-3)
    # a rough cache gives a clearly smaller soft loss: the k + 1 buckets hide the differences inside the rest
    rough = D.kd_loss(s, D.topk_logits(t, k=2, T=2.0), labels, T=2.0, alpha=0.0, kind=kind)
    assert rough < 0.8 * D.kd_loss(s, t, labels, T=2.0, alpha=0.0, kind=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_soft_loss_is_a_lower_bound_of_the_full_one(kind):
    """Data-processing inequality: merging tokens into one bucket can only lose divergence."""
    for seed in range(4):
        s = rand_logits(4, 6, 25, seed=40 + seed, scale=3.0, dtype=torch.float32)
        t = rand_logits(4, 6, 25, seed=60 + seed, scale=3.0, dtype=torch.float32).half().float()
        for T in (1.0, 2.0):
            per_pos_full = T**2 * D.divergence(D.log_softmax_T(t, T), D.log_softmax_T(s, T), kind, 0.1)
            for k in (1, 5, 20):
                c = D.topk_logits(t, k=k, T=T)
                cached = D.kd_loss(s, c, None, T=T, alpha=0.0, kind=kind)
                full = D.kd_loss(s, t, None, T=T, alpha=0.0, kind=kind)
                assert cached <= full + 1e-5, (seed, T, k)
                for b, i in ((0, 0), (3, 5)):  # and position by position
                    one = c.rows(torch.tensor([b]))
                    one = D.TopKLogits(one.values[:, i], one.indices[:, i], one.log_z[:, i], T, c.vocab_size)
                    assert D.kd_loss(s[b : b + 1, i], one, T=T, alpha=0.0, kind=kind) <= per_pos_full[b, i] + 1e-5


def test_cache_is_only_valid_at_its_temperature_and_k_must_fit():
    s, t = rand_logits(2, 3, 10, seed=41), rand_logits(2, 3, 10, seed=42)
    c = D.topk_logits(t, k=3, T=2.0)
    with pytest.raises(ValueError, match=r"made at T = 2.0; rebuild the cache for T = 1.0"):
        D.kd_loss(s, c, None, T=1.0, alpha=0.0)
    D.kd_loss(s, c, None, T=2.0, alpha=0.0)  # the right T works
    for k in (0, -1, 10, 11):
        with pytest.raises(ValueError, match=r"k must be in \[1, vocab size 10\)"):
            D.topk_logits(t, k=k)
    with pytest.raises(ValueError, match="temperature"):
        D.topk_logits(t, k=3, T=0)
    with pytest.raises(ValueError, match="differ in vocabulary"):
        D.kd_loss(rand_logits(2, 3, 12, seed=43), c, None, T=2.0, alpha=0.0)
    with pytest.raises(ValueError, match="differ in batch/sequence"):
        D.kd_loss(rand_logits(2, 2, 10, seed=43), c, None, T=2.0, alpha=0.0)


# ----------------------------------------------------------------------------- cache_teacher on a model


def test_cache_teacher_runs_the_teacher_once_and_reuses_the_file(tiny_llama, tmp_path, monkeypatch):
    model, _ = tiny_llama
    V = model.config.vocab_size
    ids = torch.randint(0, V, (5, 12), generator=gen(44))
    path = tmp_path / "cache" / "teacher.pt"
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    c = D.cache_teacher(model, ids, k=8, T=2.0, batch_size=2, path=path, progress=False)  # batches of 2, 2, 1
    assert c.values.shape == c.indices.shape == (5, 12, 8) and c.log_z.shape == (5, 12)
    assert c.values.dtype == torch.float16 and c.shape == (5, 12, V) and c.T == 2.0
    ref = D.topk_logits(logits, k=8, T=2.0)
    assert torch.equal(c.indices, ref.indices) and torch.allclose(c.log_z, ref.log_z, atol=1e-5)
    assert torch.allclose(c.values.float(), ref.values.float(), atol=1e-2)
    assert path.exists() and not model.training

    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: calls.append(1) or real_forward(*a, **kw))
    again = D.cache_teacher(model, ids, k=8, T=2.0, batch_size=2, path=path, progress=False)
    assert calls == []  # loaded from the file
    assert torch.equal(again.values, c.values) and torch.equal(again.indices, c.indices)

    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % V
    D.cache_teacher(model, other, k=8, T=2.0, batch_size=5, path=path, progress=False)
    assert len(calls) == 1  # different ids: recomputed (and saved over the old file)
    c4 = D.cache_teacher(model, other, k=4, T=2.0, batch_size=5, path=path, progress=False)
    assert len(calls) == 2 and c4.values.shape == (5, 12, 4)
    D.cache_teacher(model, other, k=4, T=1.0, batch_size=5, path=path, progress=False)
    assert len(calls) == 3
    D.cache_teacher(model, other, k=4, T=1.0, batch_size=5, path=path, progress=False)
    assert len(calls) == 3


def test_cache_teacher_restores_the_training_mode():
    model = tiny_model(vocab=64)
    model.train()
    D.cache_teacher(model, torch.randint(0, 64, (2, 6), generator=gen(45)), k=4, progress=False)
    assert model.training


def test_cache_teacher_recomputes_for_reshaped_ids(tmp_path):
    model = tiny_model(vocab=64)
    ids = torch.randint(0, 64, (4, 6), generator=gen(46))
    path = tmp_path / "c.pt"
    D.cache_teacher(model, ids, k=4, path=path, progress=False)
    c = D.cache_teacher(model, ids.reshape(8, 3), k=4, path=path, progress=False)
    assert c.values.shape == (8, 3, 4)


# ----------------------------------------------------------------------------- tokenizers


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_check_same_tokenizer():
    vocab = {"a": 0, "b": 1, "<eos>": 2}
    D.validate_same_tokenizer(FakeTokenizer(vocab), FakeTokenizer(dict(vocab)))
    with pytest.raises(ValueError, match=r"tokenizers differ \(3 vs 3 tokens.*same tokenizer"):
        D.validate_same_tokenizer(FakeTokenizer(vocab), FakeTokenizer({"a": 0, "b": 2, "<eos>": 1}))  # same strings
    with pytest.raises(ValueError, match=r"tokenizers differ \(3 vs 4 tokens"):
        D.validate_same_tokenizer(FakeTokenizer(vocab), FakeTokenizer({**vocab, "c": 3}))


def test_check_same_tokenizer_on_the_real_tokenizer(tiny_llama):
    _, tok = tiny_llama
    D.validate_same_tokenizer(tok, tok)


# ----------------------------------------------------------------------------- block influence, drop_layers, students


def test_block_influence_is_one_finite_value_per_layer(tiny_llama):
    model, _ = tiny_llama
    calib = torch.randint(0, model.config.vocab_size, (3, 16), generator=gen(47))
    bi = D.block_influence(model, calib, batch_size=2, progress=False)
    assert bi.shape == (len(model.model.layers),) and torch.isfinite(bi).all()
    assert ((bi > 0) & (bi <= 2)).all()  # 1 - cosine


def test_block_influence_is_zero_for_a_layer_that_does_nothing():
    model = tiny_model(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: out = in
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    calib = torch.randint(0, 256, (4, 10), generator=gen(48))
    bi = D.block_influence(model, calib, progress=False)
    assert bi[2].abs() < 1e-5 and (bi[[0, 1, 3]] > 1e-3).all()
    _, info = D.make_student(model, calib, n_layers=3, progress=False)
    assert info["dropped"] == [2]
    assert len(model.model.layers) == 4  # the teacher is untouched


def _manual_forward(model, layer_ids, x):
    """Logits of model through only the decoder layers layer_ids: a fresh model with those layers' weights."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(layer_ids)
    ref = LlamaForCausalLM(cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            if int(i) in layer_ids:
                sd[f"model.layers.{layer_ids.index(int(i))}.{rest}"] = v
        else:
            sd[k] = v
    ref.load_state_dict(sd)
    with torch.no_grad():
        return ref(x, use_cache=False).logits


def test_drop_layers_renumbers_and_leaves_the_original_alone():
    model = tiny_model(layers=4)
    before = params_of(model)
    x = torch.randint(0, 256, (2, 9), generator=gen(49))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
    small = D.drop_layers(model, [2, 0])
    assert small is not model and len(small.model.layers) == 2 and small.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    # the original: 4 layers, numbered 0..3, same weights, same config
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the kept layers are copies of layers 1 and 3
    assert torch.equal(small.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    with torch.no_grad():
        small.model.layers[0].mlp.up_proj.weight.add_(1.0)  # not shared storage
        out = small(x, use_cache=False).logits
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, before["model.layers.1.mlp.up_proj.weight"])
    assert torch.allclose(out, _manual_forward(small, [0, 1], x), atol=1e-5)
    small = D.drop_layers(model, [2, 0])
    with torch.no_grad():
        out = small(x, use_cache=False).logits
    assert torch.allclose(out, _manual_forward(model, [1, 3], x), atol=1e-5)
    assert not torch.allclose(out, full, atol=1e-3)
    assert D.drop_layers(model, []) is not model  # nothing dropped: still a copy


def test_dropped_model_decodes_with_a_kv_cache():
    model = tiny_model(layers=3)
    small = D.drop_layers(model, [0])
    x = torch.randint(0, 256, (2, 7), generator=gen(50))
    with torch.no_grad():
        full = small(x, use_cache=False).logits
        prefix = small(x[:, :5], use_cache=True)
        step = small(x[:, 5:6], past_key_values=prefix.past_key_values, use_cache=True)
        step2 = small(x[:, 6:7], past_key_values=step.past_key_values, use_cache=True)
    assert torch.allclose(step.logits[:, -1], full[:, 5], atol=1e-5)
    assert torch.allclose(step2.logits[:, -1], full[:, 6], atol=1e-5)
    small.generation_config.eos_token_id = None  # always 4 new tokens
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = small.generate(x, use_cache=True, **kw)
    uncached = small.generate(x, use_cache=False, **kw)
    assert cached.shape == (2, 11) and torch.equal(cached, uncached)
    # generate's greedy tokens are the manual argmax of the kept layers
    ref = x
    for _ in range(4):
        ref = torch.cat([ref, _manual_forward(model, [1, 2], ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, ref)


def test_drop_layers_inplace_and_layer_types():
    model = tiny_model(layers=3)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    same = D.drop_layers(model, [1], inplace=True)
    assert same is model and len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention", "full_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


@pytest.mark.parametrize("drop,match", [([-1], "layer indices must be in"), ([3], "layer indices must be in"),
                                        ([0, 5], "layer indices must be in"), ([0, 1, 2], "cannot drop all 3"),
                                        ([2, 1, 0, 1], "cannot drop all 3")])
def test_drop_layers_rejects_bad_indices(drop, match):
    model = tiny_model(layers=3)
    with pytest.raises(ValueError, match=match):
        D.drop_layers(model, drop)
    assert len(model.model.layers) == 3


def test_decoder_only_models_are_required():
    with pytest.raises(TypeError, match="decoder-only causal LM"):
        D.drop_layers(torch.nn.Linear(2, 2), [0])
    with pytest.raises(TypeError, match="decoder-only causal LM"):
        D.distill(torch.nn.Linear(2, 2), torch.zeros(2, 3, dtype=torch.long), alpha=1.0)


def test_make_student_drops_the_lowest_block_influence():
    model = tiny_model(layers=5, seed=3)
    calib = torch.randint(0, 256, (4, 12), generator=gen(51))
    bi = D.block_influence(model, calib, progress=False)
    for n_layers in (1, 3, 5):
        student, info = D.make_student(model, calib, n_layers=n_layers, progress=False)
        assert info["dropped"] == sorted(bi.argsort()[: 5 - n_layers].tolist())
        assert torch.allclose(info["influence"], bi)
        assert len(student.model.layers) == n_layers == student.config.num_hidden_layers
        kept = [i for i in range(5) if i not in info["dropped"]]
        assert all(torch.equal(student.model.layers[j].self_attn.q_proj.weight,
                               model.model.layers[i].self_attn.q_proj.weight) for j, i in enumerate(kept))
        if n_layers < 5:
            assert min(bi[kept]) >= max(bi[info["dropped"]])
    assert len(D.make_student(model, calib, progress=False)[0].model.layers) == 5  # n_layers=None keeps all
    for bad in (0, 6, -1):
        with pytest.raises(ValueError, match=r"n_layers must be in \[1, 5\]"):
            D.make_student(model, calib, n_layers=bad, progress=False)
    assert len(model.model.layers) == 5


def test_make_student_with_mlp_ratio_also_shrinks_the_mlp(tiny_llama):
    model, _ = tiny_llama
    calib = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen(52))
    student, info = D.make_student(model, calib, n_layers=1, mlp_ratio=0.5, progress=False)
    assert len(student.model.layers) == 1 and student.config.intermediate_size == 64
    mlp = student.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (64, 64) and mlp.down_proj.weight.shape == (64, 64)
    assert model.config.intermediate_size == 128 and model.config.num_hidden_layers == 2
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (128, 64)
    with torch.no_grad():
        assert torch.isfinite(student(calib, use_cache=False).logits).all()


# ----------------------------------------------------------------------------- the training loop


@pytest.fixture(scope="module")
def windows(tiny_llama):
    model, _ = tiny_llama
    return torch.randint(0, model.config.vocab_size, (16, 32), generator=gen(53))


@pytest.fixture
def student(tiny_llama):
    """A fresh copy of the session's tiny_llama: distill trains in place."""
    return copy.deepcopy(tiny_llama[0])


def _first_last(values, n=3):
    return sum(values[:n]) / n, sum(values[-n:]) / n


def test_ce_only_training_reduces_the_loss(student, windows):
    hist = D.distill(student, windows, teacher=None, steps=20, lr=1e-3, batch_size=4, alpha=1.0, progress=False)
    assert hist["step"] == list(range(1, 21)) and len(hist["loss"]) == len(hist["ce"]) == 20
    assert hist["loss"] == hist["ce"] and all(v == 0.0 for v in hist["soft"])
    first, last = _first_last(hist["loss"])
    assert last < first - 0.05, (first, last)
    assert all(math.isfinite(v) for v in hist["loss"])


def noisy_teacher(student):
    """The student with noise on its decoder weights: a different teacher that the student can reach."""
    teacher = copy.deepcopy(student)
    g = gen(56)
    with torch.no_grad():
        for p in teacher.model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return teacher


def soft_loss_on(windows, teacher, T=2.0):
    """eval_fn: the soft loss of a model on fixed windows (unlike the history, not a different batch each step)."""
    with torch.no_grad():
        target = teacher(windows, use_cache=False).logits

    def eval_fn(model):
        with torch.no_grad():
            return D.kd_loss(model(windows, use_cache=False).logits, target, T=T, alpha=0.0).item()

    return eval_fn


def test_kd_training_reduces_the_soft_loss(student, windows):
    teacher = noisy_teacher(student).train()
    hist = D.distill(student, windows, teacher=teacher, steps=15, lr=1e-3, batch_size=4, alpha=0.0, T=2.0,
                     eval_fn=soft_loss_on(windows[:8], teacher), progress=False)
    first, last = _first_last(hist["soft"])
    assert last < 0.7 * first, (first, last)
    assert hist["eval"][-1] < 0.6 * hist["eval"][0], hist["eval"]
    assert hist["loss"] == hist["soft"]
    assert not teacher.training


def test_self_distillation_starts_at_zero(student, windows):
    teacher = copy.deepcopy(student)
    hist = D.distill(student, windows, teacher=teacher, steps=2, lr=1e-3, alpha=0.5, kind="reverse", progress=False)
    assert hist["soft"][0] == pytest.approx(0.0, abs=1e-6)
    assert hist["loss"][0] == pytest.approx(0.5 * hist["ce"][0], rel=1e-5)
    assert hist["ce"][0] > 5  # a random model on random tokens: about log(49152) = 10.8


def test_distill_is_deterministic_given_the_seed(tiny_llama, windows):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        model = copy.deepcopy(tiny_llama[0])
        hist = D.distill(model, windows, steps=3, lr=1e-3, batch_size=2, grad_accum=2, alpha=1.0, seed=seed,
                         warmup=1, progress=False)
        runs[name] = hist, model.model.layers[0].mlp.up_proj.weight.detach().clone()
    assert runs["a"][0] == runs["b"][0] and torch.equal(runs["a"][1], runs["b"][1])
    assert runs["a"][0]["loss"] != runs["c"][0]["loss"]


def test_distill_freezes_embeddings_and_restores_flags(student, windows):
    before = params_of(student)
    student.model.layers[1].mlp.gate_proj.weight.requires_grad_(False)  # a flag of the caller's
    student.train()
    D.distill(student, windows, steps=2, lr=1e-2, alpha=1.0, progress=False)
    after = params_of(student)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed
    assert not student.training
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    assert flags.pop("model.layers.1.mlp.gate_proj.weight") is False and all(flags.values())
    assert all(p.grad is None for p in student.parameters())


def test_distill_can_train_the_embeddings(student, windows):
    before = student.model.embed_tokens.weight.detach().clone()
    D.distill(student, windows, steps=2, lr=1e-2, alpha=1.0, train_embeddings=True, progress=False)
    assert not torch.equal(student.model.embed_tokens.weight, before)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied


def test_distill_restores_the_flags_when_it_fails(student, windows):
    def broken(model):
        raise RuntimeError("eval failed")

    student.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="eval failed"):
        D.distill(student, windows, steps=2, alpha=1.0, eval_fn=broken, progress=False)
    assert not student.training and not student.model.embed_tokens.weight.requires_grad
    assert student.model.layers[0].self_attn.q_proj.weight.requires_grad


@pytest.mark.parametrize("steps,every,expected", [(5, 2, [0, 2, 4, 5]), (4, 2, [0, 2, 4]), (3, 0, [0, 3]),
                                                  (1, 0, [0, 1])])
def test_eval_fn_schedule(tiny_llama, steps, every, expected):
    model = tiny_model(vocab=tiny_llama[0].config.vocab_size, hidden=16, inter=32)  # fast: only the schedule matters
    ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=gen(54))
    seen = []

    def eval_fn(m):
        assert m is model
        seen.append(m.training)
        return 10.0 + len(seen)

    hist = D.distill(model, ids, steps=steps, alpha=1.0, eval_fn=eval_fn, eval_every=every, batch_size=2,
                     progress=False)
    assert hist["eval_step"] == expected and hist["eval"] == [11.0 + i for i in range(len(expected))]
    assert seen == [False] * len(expected)  # evaluated in eval mode


def test_distill_with_a_cached_teacher(student, windows, tiny_llama):
    teacher = noisy_teacher(student)
    cache = D.cache_teacher(teacher, windows, k=64, T=2.0, batch_size=8, progress=False)
    hist = D.distill(student, windows, teacher=cache, steps=15, lr=1e-3, batch_size=4, alpha=0.0, T=2.0,
                     eval_fn=soft_loss_on(windows[:8], teacher), progress=False)
    first, last = _first_last(hist["soft"])
    assert last < 0.7 * first, (first, last)
    assert hist["eval"][-1] < 0.6 * hist["eval"][0], hist["eval"]  # the full soft loss goes down too
    with pytest.raises(ValueError, match="made at T = 2.0"):
        D.distill(copy.deepcopy(tiny_llama[0]), windows, teacher=cache, steps=1, alpha=0.0, T=1.0, progress=False)


def test_distill_rejects_bad_input(student, windows):
    V = student.config.vocab_size
    cache = D.topk_logits(torch.randn(8, 32, V), k=4)
    with pytest.raises(ValueError, match=r"teacher cache covers windows \(8, 32\), the training ids are \(16, 32\)"):
        D.distill(student, windows, teacher=cache, steps=1, alpha=0.0, progress=False)
    with pytest.raises(ValueError, match="needs a teacher"):
        D.distill(student, windows, teacher=None, steps=1, alpha=0.5, progress=False)
    with pytest.raises(ValueError, match=f"teacher vocabulary 300 != student {V}"):
        D.distill(student, windows, teacher=tiny_model(vocab=300), steps=1, alpha=0.5, progress=False)
    for kw in (dict(steps=0), dict(batch_size=0), dict(grad_accum=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            D.distill(student, windows, alpha=1.0, progress=False, **kw)


def test_distill_rejects_alpha_out_of_range():
    model, teacher = tiny_model(vocab=64), tiny_model(vocab=64, seed=1)
    ids = torch.randint(0, 64, (4, 8), generator=gen(55))
    with pytest.raises(ValueError, match="alpha"):
        D.distill(model, ids, teacher=teacher, steps=1, alpha=1.5, progress=False)


# ----------------------------------------------------------------------------- training windows (data.py)


def test_training_windows(tiny_llama):
    _, tok = tiny_llama
    w = data.training_windows(tok, 6, seq_len=64, seed=0)
    assert w.shape == (6, 64) and w.dtype == torch.long
    assert torch.equal(w, data.training_windows(tok, 6, seq_len=64, seed=0))
    assert not torch.equal(w, data.training_windows(tok, 6, seq_len=64, seed=1))
    # disjoint: each window is a different aligned slice of the <unk>-free token stream
    stream = data._unk_free_ids(tok)
    available = stream.numel() // 64
    slices = stream[: available * 64].view(available, 64)
    where = [int((slices == row).all(1).nonzero()[0]) for row in w]
    assert len(set(where)) == 6
    text = tok.decode(w.flatten())
    assert "<unk>" not in text and "unk>" not in text
    assert "<unk>" not in tok.decode(stream[:20000])
    with pytest.raises(ValueError, match=f"has {available} windows of 64 tokens; asked for {available + 1}"):
        data.training_windows(tok, available + 1, seq_len=64)
    with pytest.raises(ValueError, match="asked for 0"):
        data.training_windows(tok, 0, seq_len=64)
    everything = data.training_windows(tok, available, seq_len=64, seed=3)  # a permutation of all the windows
    assert everything.shape == (available, 64)
    assert set(map(tuple, everything.tolist())) == set(map(tuple, slices.tolist()))
