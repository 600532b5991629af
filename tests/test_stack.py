"""Stacking recipes (compresslab.stack), lab 08: which step orders `plan` accepts and why it rejects the others, the
bytes a recipe stores, the recipe card, and `build` on the `tiny_llama` fixture (a random 2-layer Llama, hidden 64,
intermediate 128, with SmolLM2's tokenizer) with random calibration ids: each recipe's result, the memo of shared
prefixes, and loading a lab 02-style GPTQ checkpoint written for the tiny model.
"""

import copy
import hashlib

import pytest
import torch
import torch.nn as nn

from layer_testing import gen

from compresslab import deploy, pruning, stack
from compresslab import lowrank as lr
from compresslab.kvcompress import KVConfig

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny model: one torch thread for the module


def _decoder_linears(model) -> dict:
    return {f"model.layers.{i}.{n}": layer.get_submodule(n) for i, layer in enumerate(model.model.layers) for n in PROJ}


def _checksum(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("steps", [
    [],
    [("gptq", 4)],
    [("student", 1), ("distill", 2), ("gptq", 4), ("lowrank", 4), ("kv", KVConfig())],
    [("prune", "2:4"), ("gptq", 4)],
    [("prune", "4:8")],
    [("student", 3), ("prune", "2:4"), ("gptq", 3), ("kv", KVConfig(method="kivi"))],
    [("gptq", 4), ("lowrank", 8)],
    [("kv", KVConfig())],
])
def test_plan_accepts_valid_recipes(steps):
    assert stack.plan(steps) == [tuple(s) for s in steps]


def test_plan_normalises_lists_to_tuples():
    assert stack.plan([["gptq", 4], ["lowrank", 2]]) == [("gptq", 4), ("lowrank", 2)]


@pytest.mark.parametrize("steps,err,match", [
    ([("awq", 4)], ValueError, r"unknown step 'awq'; steps are \('student', 'distill', 'prune', 'gptq'"),
    ([("gptq", 4), ("gptq", 3)], ValueError, r"step 'gptq' appears 2 times; each step once per recipe"),
    ([("gptq", 4), ("prune", "2:4")], ValueError,
     r"step 'prune' cannot follow 'gptq': prune before quantizing.*SparseGPT's joint prune-and-quantize pass"),
    ([("gptq", 4), ("student", 2)], ValueError, r"step 'student' cannot follow 'gptq': 'student' must come first"),
    ([("prune", "2:4"), ("distill", 2)], ValueError, r"step 'distill' cannot follow 'prune': 'distill' must come"),
    ([("distill", 2)], ValueError, r"'distill' trains a student: put \('student', n_layers\) directly before it"),
    ([("distill", 2), ("gptq", 4)], ValueError, r"put \('student', n_layers\) directly before it"),
    ([("lowrank", 4)], ValueError, r"'lowrank' compensates quantization error: put it directly after \('gptq', bits\)"),
    ([("prune", "2:4"), ("lowrank", 4)], ValueError, r"put it directly after \('gptq', bits\)"),
    ([("gptq", 4), ("kv", KVConfig()), ("lowrank", 4)], ValueError,
     r"step 'lowrank' cannot follow 'kv': 'kv' configures the cache at run time: put it last"),
    ([("kv", KVConfig()), ("gptq", 4)], ValueError, r"cannot follow 'kv'.*put it last"),
    ([("prune", "2:4"), ("gptq", 4), ("lowrank", 4)], ValueError,
     r"'lowrank' compensation would fill the N:M zeros with dense corrections: use one or the other"),
    ([("prune", "50%")], ValueError, r"\('prune', '50%'\): use '2:4' or '4:8'"),
    ([("prune", None)], ValueError, r"use '2:4' or '4:8'"),
    ([("kv", "gear")], TypeError, r"\('kv', \.\.\.\) takes a compresslab.kvcompress.KVConfig, got str"),
])
def test_plan_rejects_with_the_fix(steps, err, match):
    with pytest.raises(err, match=match):
        stack.plan(steps)


# ----------------------------------------------------------------------------- recipe_weight_bytes


@pytest.fixture(scope="module")
def teacher(tiny_llama):
    return tiny_llama[0]


def _counts(model) -> tuple[int, int]:
    """(decoder Linear weights, everything else stored once) counted independently of compresslab.deploy."""
    linear = sum(m.weight.numel() for m in _decoder_linears(model).values())
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    return linear, total - linear


def test_tiny_llama_counts(teacher):
    # 2 layers x (q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128); embeddings tied to the head
    linear, other = _counts(teacher)
    assert linear == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) == 73728
    assert other == 49152 * 64 + 2 * 2 * 64 + 64
    assert deploy.linear_and_other_params(teacher) == (linear, other)


def test_recipe_weight_bytes_dense(teacher):
    linear, other = _counts(teacher)
    assert stack.recipe_weight_bytes(teacher) == 2.0 * (linear + other)
    assert stack.recipe_weight_bytes(teacher) < 2.0 * (linear + other + teacher.lm_head.weight.numel())  # tied once
    b4 = stack.recipe_weight_bytes(teacher, 4)
    assert b4 == deploy.weight_bytes_at(*deploy.linear_and_other_params(teacher), 4, 64)
    assert b4 == linear * 4 / 8 + linear / 64 * (2 + 4 / 8) + 2.0 * other  # codes, fp16 scale + 4-bit zero per 64
    assert stack.recipe_weight_bytes(teacher, 3) == linear * 3 / 8 + linear / 64 * (2 + 3 / 8) + 2.0 * other
    assert stack.recipe_weight_bytes(teacher, 8) > b4 > stack.recipe_weight_bytes(teacher, 2)


def test_recipe_weight_bytes_semi_structured(teacher):
    linear, other = _counts(teacher)
    sparse16 = stack.recipe_weight_bytes(teacher, 16, (2, 4))
    per_linear = sum(pruning.semi_structured_bytes(m.weight.data.half()) for m in _decoder_linears(teacher).values())
    assert sparse16 == per_linear + 2.0 * other
    assert sparse16 - 2.0 * other == 9 / 16 * 2.0 * linear
    # 4:8 keeps the same share of values
    assert stack.recipe_weight_bytes(teacher, 16, (4, 8)) == sparse16
    # 2:4 at 4 bits: half the codes, 2 bits of position each, and the group scales of the dense layout
    sparse4 = stack.recipe_weight_bytes(teacher, 4, (2, 4))
    assert sparse4 == linear / 2 * (4 + 2) / 8 + linear / 64 * (2 + 4 / 8) + 2.0 * other
    assert sparse4 < stack.recipe_weight_bytes(teacher, 4) < sparse16


@pytest.mark.parametrize("bits,nm", [(16, None), (4, None), (16, (2, 4)), (4, (2, 4))])
def test_extra_params_cost_two_bytes_each(teacher, bits, nm):
    base = stack.recipe_weight_bytes(teacher, bits, nm)
    assert stack.recipe_weight_bytes(teacher, bits, nm, extra_params=1000) == base + 2000
    assert stack.recipe_weight_bytes(teacher, bits, nm, extra_params=1) == base + 2


def test_recipe_weight_bytes_rejects_bad_bits(teacher):
    with pytest.raises(ValueError, match="weight bits must be one of 2, 3, 4, 8, 16"):
        stack.recipe_weight_bytes(teacher, 5)


# ----------------------------------------------------------------------------- recipe_card


def _row(method, weight_mb, kv_mb, ppl, probe_acc, bound_tok_s):
    return dict(method=method, weight_mb=weight_mb, kv_mb=kv_mb, ppl=ppl, probe_acc=probe_acc, bound_tok_s=bound_tok_s)


ROWS = [
    _row("dense", 270.0, 20.0, 10.0, 0.50, 100.0),
    _row("gptq4", 80.0, 20.0, 11.0, 0.45, 300.0),
    _row("gptq4+kv", 80.0, 4.0, 12.0, 0.40, 330.0),  # usable (< 12.5) and the smallest usable
    _row("student", 150.0, 10.0, 12.4, 0.20, 180.0),
    _row("2:4+gptq3", 40.0, 4.0, 30.0, 0.05, 600.0),  # smallest and fastest, but far past the threshold
]


def _picks(card):
    assert [c["constraint"].split()[0] for c in card] == ["memory-bound", "latency-bound", "reasoning-sensitive"]
    assert all(c["why"] for c in card)
    return [c["recipe"] for c in card]


def test_recipe_card_picks_per_constraint():
    assert _picks(stack.recipe_card(ROWS)) == ["gptq4+kv", "gptq4+kv", "dense"]
    # order of the rows does not matter
    assert _picks(stack.recipe_card(ROWS[::-1])) == ["gptq4+kv", "gptq4+kv", "dense"]


def test_recipe_card_threshold_decides_what_is_usable():
    assert _picks(stack.recipe_card(ROWS, max_ppl_increase=2.0)) == ["2:4+gptq3", "2:4+gptq3", "dense"]
    # with a 15 % budget only dense (10) and gptq4 (11) count
    assert _picks(stack.recipe_card(ROWS, max_ppl_increase=0.15)) == ["gptq4", "gptq4", "dense"]
    # latency and memory can disagree
    rows = ROWS[:3] + [_row("fast-but-big", 200.0, 20.0, 10.5, 0.3, 400.0)]
    assert _picks(stack.recipe_card(rows)) == ["gptq4+kv", "fast-but-big", "dense"]


def test_recipe_card_reasoning_tie_prefers_the_smaller():
    rows = [_row("big", 200.0, 10.0, 10.0, 0.5, 100.0), _row("small", 60.0, 10.0, 10.2, 0.5, 90.0),
            _row("worse", 50.0, 10.0, 10.1, 0.4, 80.0)]
    assert _picks(stack.recipe_card(rows)) == ["worse", "big", "small"]


def test_recipe_card_needs_rows():
    with pytest.raises(ValueError, match="no measured rows: run the variants first"):
        stack.recipe_card([])


# ----------------------------------------------------------------------------- build (tiny Llama)


@pytest.fixture(scope="module")
def calib(tiny_llama):
    _, tok = tiny_llama
    return torch.randint(0, len(tok), (4, 64), generator=gen(0))  # 256 tokens >= hidden 64 for GPTQ


@pytest.fixture(scope="module")
def built(teacher, calib, tiny_llama):
    """Every build of the module, with the teacher's checksum before and after all of them."""
    _, tok = tiny_llama
    before = _checksum(teacher)
    train_ids = torch.randint(0, len(tok), (4, 32), generator=gen(2))
    recipes = {
        "gptq4": [("gptq", 4)],
        "gptq4+lr2": [("gptq", 4), ("lowrank", 2)],
        "2:4+gptq4": [("prune", "2:4"), ("gptq", 4)],
        "2:4": [("prune", "2:4")],
        "student1": [("student", 1)],
        "student1+kd": [("student", 1), ("distill", 2)],
        "kv": [("kv", KVConfig(method="kivi"))],
    }
    out = {name: stack.build(name, steps, teacher, calib, train_ids=train_ids, progress=False)
           for name, steps in recipes.items()}
    return out, before, _checksum(teacher)


def test_build_leaves_the_teacher_untouched(teacher, built):
    out, before, after = built
    assert before == after
    for b in out.values():
        assert b.model is not teacher
        assert not any(p.data_ptr() == q.data_ptr() for p in b.model.parameters() for q in teacher.parameters())
    assert len(teacher.model.layers) == 2
    assert all(isinstance(m, nn.Linear) for m in _decoder_linears(teacher).values())


def _logits_mse(model, teacher, ids):
    with torch.no_grad():
        return (model(ids).logits - teacher(ids).logits).pow(2).mean().item()


def test_build_gptq_with_lowrank_compensation_is_closer(teacher, calib, built, tiny_llama):
    out, _, _ = built
    g4, lr2 = out["gptq4"], out["gptq4+lr2"]
    assert (g4.bits, g4.nm, g4.extra_params) == (4, None, 0)
    assert (lr2.bits, lr2.nm) == (4, None)
    assert lr2.steps == [("gptq", 4), ("lowrank", 2)] and lr2.name == "gptq4+lr2"
    lins = _decoder_linears(teacher)
    assert lr2.extra_params == sum(lr.lowrank_params(m.out_features, m.in_features, 2) for m in lins.values()) == 4096
    assert lr2.weight_bytes() == g4.weight_bytes() + 2 * 4096
    assert g4.weight_bytes() == stack.recipe_weight_bytes(teacher, 4)
    # both stay dense nn.Linear (fake-quantized), and differ from each other and from the teacher
    for key, m in lins.items():
        q, c = g4.model.get_submodule(key), lr2.model.get_submodule(key)
        assert isinstance(q, nn.Linear) and isinstance(c, nn.Linear)
        assert not torch.equal(q.weight, m.weight) and not torch.equal(c.weight, q.weight)
    # exactly GPTQ's weights + the activation-aware rank-2 correction of their residual against the teacher
    expected = copy.deepcopy(g4.model)
    lr.compensate_model(expected, teacher, 2, lr.activation_norms(teacher, calib, progress=False), progress=False)
    for key in lins:
        torch.testing.assert_close(lr2.model.get_submodule(key).weight, expected.get_submodule(key).weight)
    ids = torch.randint(0, len(tiny_llama[1]), (2, 48), generator=gen(3))  # not the calibration ids
    assert _logits_mse(lr2.model, teacher, ids) < _logits_mse(g4.model, teacher, ids)


def test_build_gptq_weights_are_on_a_4_bit_grid(built):
    out, _, _ = built
    W = out["gptq4"].model.model.layers[1].self_attn.q_proj.weight  # in_features 64: one group per row
    assert max(len(torch.unique(row)) for row in W) <= 16
    assert min(len(torch.unique(row)) for row in W) > 4
    # the low-rank correction moves the weights off the grid
    Wc = out["gptq4+lr2"].model.model.layers[1].self_attn.q_proj.weight
    assert max(len(torch.unique(row)) for row in Wc) > 16


def test_build_sparse_gptq_is_2_4_and_quantized(built, teacher):
    out, _, _ = built
    b = out["2:4+gptq4"]
    assert b.bits == 4 and b.nm == (2, 4) and b.extra_params == 0
    for key, m in _decoder_linears(b.model).items():
        assert isinstance(m, nn.Linear)
        assert pruning.is_nm_sparse(m.weight, 2, 4), key
        assert pruning.sparsity_of(m.weight) >= 0.5 - 1e-6, key
    # quantized: at most 16 values in every group of 64 consecutive columns of every row (down_proj: 2 groups)
    W = b.model.model.layers[0].mlp.down_proj.weight  # (64, 128)
    groups = W.reshape(64, 2, 64)
    counts = [len(torch.unique(groups[r, g])) for r in range(64) for g in range(2)]
    assert max(counts) <= 16 and min(counts) > 4
    assert b.weight_bytes() == stack.recipe_weight_bytes(teacher, 4, (2, 4))
    # pruning alone keeps 16-bit values: far more than 16 distinct per group
    p = out["2:4"]
    assert p.bits == 16 and p.nm == (2, 4)
    Wp = p.model.model.layers[0].mlp.down_proj.weight
    assert pruning.is_nm_sparse(Wp, 2, 4)
    assert max(len(torch.unique(Wp[r, :64])) for r in range(64)) > 16
    assert p.weight_bytes() == stack.recipe_weight_bytes(teacher, 16, (2, 4)) > b.weight_bytes()


def test_build_student(built, teacher):
    out, _, _ = built
    s = out["student1"]
    assert len(s.model.model.layers) == 1 and s.model.config.num_hidden_layers == 1
    assert len(s.info["dropped"]) == 1 and s.info["dropped"][0] in (0, 1)
    assert (s.bits, s.nm, s.extra_params) == (16, None, 0)
    linear, other = _counts(teacher)
    assert s.weight_bytes() == 2.0 * (linear / 2 + other - 2 * 64)  # one layer: half the Linears, two norms fewer
    # the kept layer holds the teacher's weights
    kept = 1 - s.info["dropped"][0]
    assert torch.equal(s.model.model.layers[0].mlp.up_proj.weight, teacher.model.layers[kept].mlp.up_proj.weight)
    # distillation trained the student: its layer moved, its (frozen, tied) embeddings did not
    kd = out["student1+kd"]
    assert len(kd.model.model.layers) == 1 and "distill_loss" in kd.info
    assert not torch.equal(kd.model.model.layers[0].mlp.up_proj.weight, s.model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(kd.model.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not kd.model.training


def test_build_kv_only_configures_the_cache(built, teacher):
    out, _, _ = built
    b = out["kv"]
    assert isinstance(b.kv, KVConfig) and b.kv.method == "kivi"
    assert (b.bits, b.nm, b.extra_params) == (16, None, 0)
    assert _checksum(b.model) == _checksum(teacher)
    # a recipe without a "kv" step runs with (and is counted as) the fp16 cache a deployment stores, not the fp32
    # DynamicCache of the CPU model, which doubled the capstone's "KV MB @4k" (issue 24, item 1)
    assert out["gptq4"].kv == KVConfig("fp16") and stack.Built("x", teacher, []).kv == KVConfig("fp16")


def test_a_recipe_without_kv_counts_the_fp16_cache_bytes(built, tiny_llama):
    """Issue 24, item 1: the capstone's "KV MB @4k" is kv_bytes_per_token x context x the measured ratio; a recipe
    without a "kv" step measured through the CPU model's fp32 DynamicCache gave ratio 2.0 (188.7 MB, not 94.4)."""
    from compresslab import kvcache

    out, _, _ = built
    _, tok = tiny_llama
    b = out["gptq4"]
    r = kvcache.kv_perplexity(b.model, tok, b.kv, n_windows=1, prefix=32, scored=16, progress=False)
    assert r["ratio"] == 1.0 and r["parts"] == {"fp16 buffer": r["fp16_bytes"]}
    assert kvcache.kv_perplexity(b.model, tok, None, n_windows=1, prefix=32, scored=16, progress=False)["ratio"] == 2.0


def test_build_needs_train_ids_to_distill(teacher, calib):
    with pytest.raises(ValueError, match="a 'distill' step needs train_ids"):
        stack.build("kd", [("student", 1), ("distill", 2)], teacher, calib, progress=False)


def test_build_rejects_a_bad_plan_before_any_work(teacher, calib):
    with pytest.raises(ValueError, match="SparseGPT's joint"):
        stack.build("bad", [("gptq", 4), ("prune", "2:4")], teacher, calib[:0], progress=False)


# ----------------------------------------------------------------------------- build: the memo and lab 02's checkpoint


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_memo_reuses_a_prefix(teacher, calib, built):
    out, _, _ = built
    memo = {}
    g4 = stack.build("g4", [("gptq", 4)], teacher, calib, memo=memo, progress=False)
    assert _same_weights(g4.model, out["gptq4"].model)  # GPTQ is deterministic: the same as without a memo
    g4_state = {k: v.clone() for k, v in g4.model.state_dict().items()}
    assert ((("gptq", 4),) in memo) and memo[(("gptq", 4),)] is g4
    # extending it: starts from a copy of the quantized model, compensates against the teacher
    ext = stack.build("g4+lr2", [("gptq", 4), ("lowrank", 2)], teacher, calib, memo=memo, progress=False)
    assert ext.info["reused"] == "('gptq', 4)"
    assert ext.model is not g4.model
    assert (ext.bits, ext.nm, ext.extra_params) == (4, None, 4096)
    ref = out["gptq4+lr2"].model.state_dict()
    assert all(torch.allclose(v, ref[k], atol=1e-6) for k, v in ext.model.state_dict().items())
    assert all(torch.equal(v, g4_state[k]) for k, v in g4.model.state_dict().items())  # the memo's model kept
    # a runtime-only extension shares the weights
    kv = stack.build("g4+kv", [("gptq", 4), ("kv", KVConfig(method="kivi"))], teacher, calib, memo=memo,
                     progress=False)
    assert kv.model is g4.model and kv.kv.method == "kivi" and kv.bits == 4 and kv.info["reused"] == "('gptq', 4)"


def test_build_memo_reuses_a_student(teacher, calib, built):
    out, _, _ = built
    memo = {}
    s = stack.build("s", [("student", 1)], teacher, calib, memo=memo, progress=False)
    sg = stack.build("s+g4", [("student", 1), ("gptq", 4)], teacher, calib, memo=memo, progress=False)
    assert sg.info["reused"] == "('student', 1)" and sg.info["dropped"] == s.info["dropped"]
    assert len(sg.model.model.layers) == 1 and sg.bits == 4
    assert _same_weights(s.model, out["student1"].model)  # the student in the memo was not quantized in place


def test_build_memo_extends_a_student_gptq_recipe_with_lowrank(teacher, calib):
    memo = {}
    stack.build("s+g4", [("student", 1), ("gptq", 4)], teacher, calib, memo=memo, progress=False)
    ext = stack.build("s+g4+lr", [("student", 1), ("gptq", 4), ("lowrank", 2)], teacher, calib, memo=memo,
                      progress=False)
    assert ext.extra_params == 2 * 1024  # one layer: rank 2 x 1024 per layer


@pytest.fixture(scope="module")
def lab02_dir(teacher, tiny_llama, tmp_path_factory):
    """A lab 02-style 4-bit group-64 act-order checkpoint of the teacher, calibrated on other ids than `calib`."""
    from compresslab import checkpoint, gptq

    other = torch.randint(0, len(tiny_llama[1]), (4, 64), generator=gen(9))
    q, report = gptq.quantize_model(teacher, other, bits=4, group_size=64, act_order=True, progress=False)
    return checkpoint.save_gptq(q, report, tmp_path_factory.mktemp("lab02") / "gptq4", bits=4, group_size=64,
                                sym=False, act_order=True)


def test_build_loads_lab02s_checkpoint(teacher, calib, built, lab02_dir, tmp_path):
    from compresslab import checkpoint

    out, _, _ = built
    loaded = checkpoint.load_gptq(lab02_dir)[0]
    b = stack.build("g4", [("gptq", 4)], teacher, calib, gptq_dir=lab02_dir, progress=False)
    assert str(lab02_dir) in b.info["gptq"] and b.bits == 4
    assert _same_weights(b.model, loaded)
    assert not _same_weights(b.model, out["gptq4"].model)  # not quantized again on `calib`
    # compensation of the loaded weights, against the teacher
    c = stack.build("g4+lr", [("gptq", 4), ("lowrank", 2)], teacher, calib, gptq_dir=lab02_dir, progress=False)
    assert c.extra_params == 4096
    key = "model.layers.0.mlp.up_proj"
    W = teacher.get_submodule(key).weight
    assert (c.model.get_submodule(key).weight - W).norm() < (loaded.get_submodule(key).weight - W).norm()
    # not a 4-bit request, or no checkpoint there: GPTQ runs as usual
    b3 = stack.build("g3", [("gptq", 3)], teacher, calib, gptq_dir=lab02_dir, progress=False)
    assert "gptq" not in b3.info and b3.bits == 3
    b4 = stack.build("g4", [("gptq", 4)], teacher, calib, gptq_dir=tmp_path / "missing", progress=False)
    assert "gptq" not in b4.info and _same_weights(b4.model, out["gptq4"].model)


@pytest.mark.parametrize("steps, match", [
    (["gptq"], "bits must be one of"),
    ([("gptq", 5)], "bits must be one of"),
    ([("student", 0)], "layers the student keeps"),
    ([("student", 1), ("distill", 0)], "training steps"),
    ([("gptq", 4), ("lowrank", 0)], "the rank"),
    ([("gptq", 4), ("lowrank", 2.5)], "the rank"),
    ([("gptq", 4, "x")], r"\(kind, argument\) pair"),
])
def test_plan_rejects_bad_step_arguments_before_any_work(steps, match):
    with pytest.raises(ValueError, match=match):
        stack.plan(steps)


@pytest.mark.parametrize("bits, nm, match", [(5, (2, 4), "weight bits"), (4, (5, 4), "0 < n < m"),
                                             (4, (0, 4), "0 < n < m")])
def test_recipe_weight_bytes_rejects_bad_bits_and_patterns(teacher, bits, nm, match):
    with pytest.raises(ValueError, match=match):
        stack.recipe_weight_bytes(teacher, bits, nm)


def test_build_reuses_the_teachers_activation_norms_only_against_the_teacher(teacher, calib):
    norms = lr.activation_norms(teacher, calib, progress=False)
    flat = {k: torch.ones_like(v) for k, v in norms.items()}  # plain SVD: a visibly different compensation
    steps = [("gptq", 4), ("lowrank", 2)]
    computed = stack.build("c", steps, teacher, calib, progress=False)
    given = stack.build("g", steps, teacher, calib, act_norms=norms, progress=False)
    wrong = stack.build("w", steps, teacher, calib, act_norms=flat, progress=False)
    assert _same_weights(given.model, computed.model)
    assert not _same_weights(wrong.model, computed.model)  # the statistics passed in are the ones used
    student = [("student", 1), ("gptq", 4), ("lowrank", 2)]
    s_computed = stack.build("sc", student, teacher, calib, progress=False)
    s_given = stack.build("sg", student, teacher, calib, act_norms=flat, progress=False)
    assert _same_weights(s_given.model, s_computed.model)  # the student's own statistics, not the teacher's
