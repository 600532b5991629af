"""AWQ (compresslab.awq), lab 03.

Unit tests use seeded random weights and activations (tests/layer_testing.py); model tests use the `tiny_llama`
fixture (a random 2-layer Llama, hidden 64, grouped-query attention) and a multi-head twin of it, with random token
ids. The real-model tests take layer 0 of SmolLM2-135M and its inputs on 4 x 128 WikiText tokens, and never modify
the session's model (they work on copies of the layer).
"""

import copy

import pytest
import torch
import torch.nn as nn

import compresslab as cl
from compresslab import awq, layerwise, quant
from layer_testing import make_inputs, make_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: one torch thread for the module

GROUPS = [(prev, names) for prev, names in zip(awq.PREV_OPS, layerwise.SEQUENTIAL)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_ids(model, n=4, seq=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))


def distinct_per_group(w: torch.Tensor, group_size: int) -> int:
    """The largest number of distinct values in any quantization group of w (out, in)."""
    groups = quant.group_view(w, group_size)  # (n_groups, g)
    return max(len(torch.unique(g)) for g in groups)


@pytest.fixture(scope="module")
def tiny_mha(tiny_llama):
    """tiny_llama with as many key/value heads as query heads: there v_proj -> o_proj can be folded."""
    from transformers import LlamaForCausalLM

    model, _ = tiny_llama
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def real_layer(smollm):
    """Layer 0 of SmolLM2-135M, its inputs on 4 x 128 calibration tokens, and each group's input tokens (n, in)."""
    model, tok = smollm
    calib = cl.data.calibration_batches(tok, 4, 128, seed=0)
    inputs = layerwise.layer0_inputs(model, calib, 4)
    layer = model.model.layers[0]

    class Tokens:
        def __init__(self):
            self.xs = []

        def add_batch(self, x):
            self.xs.append(x.reshape(-1, x.shape[-1]).float())

    firsts = {names[0]: layer.get_submodule(names[0]) for names in layerwise.SEQUENTIAL}
    with torch.no_grad():
        caught = layerwise.collect_stats(layer, inputs, firsts, lambda m: Tokens())
    xs = {n: torch.cat(t.xs) for n, t in caught.items()}  # (512, in) per group
    config = awq.AWQConfig(grid=10)
    return layer, inputs, xs, config, awq.search_layer(layer, inputs, config)


# ----------------------------------------------------------------------------- configuration


def test_config_defaults():
    c = awq.AWQConfig()
    assert (c.bits, c.group_size, c.sym, c.clip, c.grid, c.skip) == (4, 64, True, False, 20, ("lm_head",))
    q = awq.AWQConfig(sym=False).quantization_config()
    assert q["quant_method"] == "compresslab" and q["method"] == "awq" and q["zero_point"] is True and q["bits"] == 4 and q["group_size"] == 64
    with pytest.raises(TypeError):
        awq.AWQConfig(4)  # keyword-only


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 1}, "bits must be an integer from 2 to 8"), ({"bits": 16}, "from 2 to 8"), ({"bits": 4.0}, "bits"),
    ({"group_size": 0}, "group_size must be a positive int"), ({"group_size": -1}, "positive"),
    ({"grid": 0}, "grid .* must be an int >= 1"), ({"sym": "yes"}, "sym must be True or False"),
    ({"skip": "lm_head"}, r"skip must be a tuple of name patterns"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        awq.AWQConfig(**kwargs)


# ----------------------------------------------------------------------------- the pieces


def test_gram_form_of_the_output_error():
    X, W = make_inputs(256, 64), make_weight(16, 64)
    D = W - quant.fake_quantize(W, 4, 32, sym=True)
    direct = ((X @ D.t()) ** 2).sum().item()
    assert awq.output_error(D, awq.ActStats.of(X).G.float()) == pytest.approx(direct, rel=1e-4)
    G = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(awq.group_blocks(G, 2), torch.stack([G[:2, :2], G[2:, 2:]]))


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_rtn_is_quant_fake_quantize(sym):
    W = make_weight(16, 128)
    w_hat, scales, zeros = awq.rtn(W, 4, 32, sym)
    assert torch.equal(w_hat, quant.fake_quantize(W, 4, 32, sym=sym))
    assert scales.shape == zeros.shape == (16, 4)
    if sym:
        assert torch.all(zeros == 0)
    else:
        assert torch.all((zeros >= 0) & (zeros <= 15)) and torch.equal(zeros, zeros.round())


def test_alphas_and_scale_normalisation():
    assert awq.alphas(4) == [0, 0.25, 0.5, 0.75]
    m = torch.tensor([0.01, 1.0, 100.0])
    assert torch.equal(awq.scale_for(m, 0.0), torch.ones(3))
    s = awq.scale_for(m, 0.5)
    assert (s.max() * s.min()).item() == pytest.approx(1.0)
    assert torch.all(awq.scale_for(torch.zeros(3), 0.5) > 0)  # a dead channel gets the floor, not s = 0


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_clip_search_is_never_worse_than_no_clip(sym):
    X = make_inputs(512, 128)
    W = make_weight(32, 128)
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.01] *= 8  # a few outlier weights
    w_hat, clip = awq.awq_clip_search(W, X, bits=4, group_size=32, sym=sym)
    absmax = W.reshape(32, 4, 32).abs().amax(-1)  # (out, n_groups)
    assert clip.shape == (32, 4) and torch.all(clip <= absmax) and torch.all(clip >= 0.5 * absmax - 1e-7)
    assert torch.any(clip < absmax)  # it does clip somewhere
    assert torch.equal(w_hat, awq.rtn(W, 4, 32, sym, clip)[0])

    def group_errors(w_q):  # (out, n_groups): the error of each group's share of the output, from the tokens
        d = (W - w_q).reshape(32, 4, 32)
        return torch.stack([((X[:, g * 32:(g + 1) * 32] @ d[:, g].t()) ** 2).sum(0) for g in range(4)], dim=1)

    with_clip, without = group_errors(w_hat), group_errors(quant.fake_quantize(W, 4, 32, sym=sym))
    assert torch.all(with_clip <= without * (1 + 1e-4) + 1e-6)
    assert with_clip.sum() < without.sum()
    with pytest.raises(ValueError, match="max_shrink must be in"):
        awq.awq_clip_search(W, X, bits=4, group_size=32, sym=sym, max_shrink=1.0)


def test_scale_search_errors_input_checks():
    lin = nn.Linear(64, 8)
    with pytest.raises(ValueError, match=r"x must be tokens \(n_tokens, in=64\)"):
        awq.awq_scale_search([lin], torch.randn(10, 32), bits=4, group_size=32, sym=True)
    with pytest.raises(TypeError, match="nn.Linear"):
        awq.awq_scale_search([], torch.randn(10, 64), bits=4, group_size=32, sym=True)


# ----------------------------------------------------------------------------- folding is exact


def fold_random(model, seed=0):
    """Fold a random positive scale into every foldable group of every layer (nothing quantized)."""
    g = torch.Generator().manual_seed(seed)
    folded = []
    for layer in model.model.layers:
        for prev, names in GROUPS:
            if awq.foldable(layer, prev, names):
                s = torch.exp(2 * torch.randn(layer.get_submodule(names[0]).in_features, generator=g))  # ~e^+-4
                awq.fold_scale(layer.get_submodule(prev), [layer.get_submodule(n) for n in names], s)
                folded.append(prev)
    return folded


@pytest.mark.parametrize("attention", ["gqa", "mha"])
def test_folding_leaves_the_logits_unchanged(tiny_llama, tiny_mha, attention):
    model = tiny_llama[0] if attention == "gqa" else tiny_mha
    ids = random_ids(model)
    folded_model = copy.deepcopy(model)
    folded = fold_random(folded_model)
    with torch.no_grad():
        ref, out = model(ids).logits, folded_model(ids).logits
    assert rel(out, ref) < 1e-4
    assert ("self_attn.v_proj" in folded) == (attention == "mha")  # o_proj is folded into v_proj only without GQA
    assert folded.count("mlp.up_proj") == 2 and folded.count("input_layernorm") == 2


def test_folding_the_searched_scales_is_exact_on_a_real_layer(real_layer):
    layer, inputs, _, _, searches = real_layer
    folded = copy.deepcopy(layer)
    for s in searches:
        if s.scales is not None:
            awq.fold_scale(folded.get_submodule(s.prev), [folded.get_submodule(n) for n in s.names], s.scales)
    with torch.no_grad():
        for (ref, _), (out, _) in zip(layerwise.run_layer(layer, inputs), layerwise.run_layer(folded, inputs)):
            assert rel(out, ref) < 1e-4


# ----------------------------------------------------------------------------- the search on real activations


def test_search_layer_on_a_real_layer(real_layer):
    layer, _, _, config, searches = real_layer
    assert [s.prev for s in searches] == awq.PREV_OPS
    for s in searches:
        if s.prev == "self_attn.v_proj":  # SmolLM2 has GQA: v_proj 192 outputs, o_proj 576 inputs
            assert s.scales is None and s.errors is None and s.alpha is None
            continue
        n_in = layer.get_submodule(s.names[0]).in_features
        assert s.scales.shape == (n_in,) and torch.all(s.scales > 0)
        assert len(s.errors) == config.grid and s.stats.n == 512
        assert min(s.errors) <= s.errors[0]  # alpha = 0 (RTN) is among the candidates
        assert s.alpha == awq.alphas(config.grid)[s.errors.index(min(s.errors))]
        assert s.alpha > 0  # real activations have outlier channels: scaling helps


@pytest.mark.parametrize("group", [0, 2, 3], ids=["qkv", "gate_up", "down"])
def test_awq_beats_rtn_on_real_inputs(real_layer, group):
    layer, _, xs, config, _ = real_layer
    names = layerwise.SEQUENTIAL[group]
    linears, x = [layer.get_submodule(n) for n in names], xs[names[0]]  # x (512, in)
    s, errors = awq.awq_scale_search(linears, x, bits=4, group_size=64, sym=True, grid=config.grid)
    rtn_err = awq_err = 0.0
    for m in linears:
        W = m.weight.detach()
        ref = x @ W.t()
        rtn_err += ((ref - x @ quant.fake_quantize(W, 4, 64, sym=True).t()) ** 2).sum().item()
        awq_err += ((ref - (x / s) @ quant.fake_quantize(W * s, 4, 64, sym=True).t()) ** 2).sum().item()
    assert errors[0] == pytest.approx(rtn_err, rel=1e-3)  # the Gram form equals the error on the tokens
    assert min(errors) == pytest.approx(awq_err, rel=1e-3)
    assert awq_err < rtn_err


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_a_quantized_real_layer_is_closer_than_rtn(real_layer, sym):
    layer, inputs, _, config, searches = real_layer
    cfg = awq.AWQConfig(grid=config.grid, sym=sym, clip=not sym)
    if not sym:
        searches = awq.search_layer(layer, inputs, cfg)
    quantized, rtn_layer = copy.deepcopy(layer), copy.deepcopy(layer)
    records = awq.quantize_layer(quantized, searches, cfg)
    for n in [n for names in layerwise.SEQUENTIAL for n in names]:
        m = rtn_layer.get_submodule(n)
        m.weight.data = quant.fake_quantize(m.weight.data, 4, 64, sym=sym)
    assert set(records) == {n for names in layerwise.SEQUENTIAL for n in names}
    for n, r in records.items():
        out_f, in_f = quantized.get_submodule(n).weight.shape
        assert r["scales"].shape == r["zeros"].shape == (out_f, in_f // 64)
        assert (r["clip"] is None) == (sym or n in awq.NO_CLIP)
        assert distinct_per_group(quantized.get_submodule(n).weight.data, 64) <= 16
    with torch.no_grad():
        ref = torch.cat([o for o, _ in layerwise.run_layer(layer, inputs)])
        err_awq = rel(torch.cat([o for o, _ in layerwise.run_layer(quantized, inputs)]), ref)
        err_rtn = rel(torch.cat([o for o, _ in layerwise.run_layer(rtn_layer, inputs)]), ref)
    assert err_awq < err_rtn


# ----------------------------------------------------------------------------- the whole model


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_apply_in_place(tiny_llama, sym):
    model = copy.deepcopy(tiny_llama[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = awq.AWQConfig(group_size=32, sym=sym, clip=not sym, grid=5)
    out = awq.apply(model, config, random_ids(model), progress=False)
    assert out is model
    assert model.config.quantization_config == config.quantization_config()
    assert model.config.quantization_config["zero_point"] == (not sym)
    for li, layer in enumerate(model.model.layers):
        for names in layerwise.SEQUENTIAL:
            for n in names:
                w = layer.get_submodule(n).weight.data
                assert not torch.equal(w, before[f"model.layers.{li}.{n}.weight"])
                assert distinct_per_group(w, 32) <= 16
    assert torch.equal(model.lm_head.weight, before["model.embed_tokens.weight"])  # tied, never quantized
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(model, seed=1)).logits).all()


def test_apply_is_search_then_quantize_layer_by_layer(tiny_llama):
    """apply == search_layer + quantize_layer per layer, each layer fed the quantized outputs of the one before."""
    config, ids = awq.AWQConfig(group_size=32, grid=5), random_ids(tiny_llama[0])
    applied = awq.apply(copy.deepcopy(tiny_llama[0]), config, ids, progress=False)
    manual = copy.deepcopy(tiny_llama[0])
    with torch.no_grad():
        inputs = layerwise.layer0_inputs(manual, ids, 8)
        for li, layer in enumerate(manual.model.layers):
            awq.quantize_layer(layer, awq.search_layer(layer, inputs, config, layer_index=li), config, layer_index=li)
            inputs = layerwise.run_layer(layer, inputs)
    for (n, a), (_, b) in zip(applied.named_parameters(), manual.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_apply_skip_leaves_a_linear_unquantized(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    awq.apply(model, awq.AWQConfig(group_size=32, grid=5, skip=("lm_head", "mlp.down_proj")), random_ids(model),
              progress=False)
    for layer in model.model.layers:
        assert distinct_per_group(layer.mlp.down_proj.weight.data, 32) > 16
        assert distinct_per_group(layer.mlp.up_proj.weight.data, 32) <= 16


def test_apply_errors(tiny_llama):
    model = tiny_llama[0]  # every call below fails before touching it
    ids = random_ids(model)
    with pytest.raises(ValueError, match="AWQ needs calibration token ids.*calibration_batches"):
        awq.apply(model, awq.AWQConfig(group_size=32), None)
    with pytest.raises(ValueError, match="use at least 32 tokens"):
        awq.apply(model, awq.AWQConfig(group_size=32), ids[:1, :8])
    with pytest.raises(ValueError, match=r"token ids of shape \(n_samples, seq_len\)"):
        awq.apply(model, awq.AWQConfig(group_size=32), ids.float())
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features \[64, 128\]"):
        awq.apply(model, awq.AWQConfig(group_size=48), ids)
    with pytest.raises(TypeError, match="must be an AWQConfig"):
        awq.apply(model, {"bits": 4}, ids)
    with pytest.raises(TypeError, match="decoder-only causal LM"):
        awq.apply(nn.Sequential(nn.Linear(64, 64)), awq.AWQConfig(group_size=32), ids)
    with pytest.raises(RuntimeError, match="received no calibration tokens"):
        awq.search_layer(model.model.layers[0], [], awq.AWQConfig(group_size=32))  # inputs that never reach it
    broken = copy.deepcopy(model)
    del broken.model.layers[1].post_attention_layernorm
    with pytest.raises(TypeError, match=r"Llama-style .* layer 1 .* no \['post_attention_layernorm'\]"):
        awq.apply(broken, awq.AWQConfig(group_size=32), ids)
