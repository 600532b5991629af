"""The layer-by-layer calibration harness (compresslab.layerwise): collect_stats stops each forward as soon as the
watched Linears have seen their inputs, and the statistics are those of a full forward, to the bit."""

import pytest
import torch

import compresslab as cl
from compresslab import gptq, layerwise


class Tokens:
    def __init__(self):
        self.xs = []

    def add_batch(self, x):
        self.xs.append(x.detach().clone())


def _full_forward_stats(layer, inputs, linears):
    """What collect_stats did before it stopped early: the whole layer runs, forward hooks take the inputs."""
    stats = {n: Tokens() for n in linears}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: stats[n].add_batch(inp[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            layerwise.run_layer(layer, inputs)
    finally:
        for h in hooks:
            h.remove()
    return stats


@pytest.fixture(scope="module")
def layer_inputs(smollm):
    model, tok = smollm
    calib = cl.data.calibration_batches(tok, 4, 64, seed=0)
    return model, layerwise.layer0_inputs(model, calib, 2)  # two micro-batches


@pytest.mark.parametrize("step", range(len(layerwise.SEQUENTIAL)))
def test_collect_stats_equals_a_full_forward_bit_for_bit(layer_inputs, step):
    model, inputs = layer_inputs
    layer = model.model.layers[3]
    linears = layerwise.decoder_linears(layer, layerwise.SEQUENTIAL[step], 3, "test")
    early = layerwise.collect_stats(layer, inputs, linears, lambda m: Tokens())
    full = _full_forward_stats(layer, inputs, linears)
    for n in linears:
        assert len(early[n].xs) == len(full[n].xs) == len(inputs)
        for a, b in zip(early[n].xs, full[n].xs):
            assert torch.equal(a, b), n


def test_collect_stats_stops_the_forward_after_the_last_watched_linear(layer_inputs):
    """Watching q/k/v must not run the MLP (the saving: ~1.8 layer forwards for the four steps, not 4)."""
    model, inputs = layer_inputs
    layer = model.model.layers[0]
    calls = []
    hooks = [layer.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: calls.append(n))  # after computing
             for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    try:
        layerwise.collect_stats(layer, inputs, layerwise.decoder_linears(layer, layerwise.SEQUENTIAL[0], 0, "t"),
                                lambda m: Tokens())
        assert calls == []
        layerwise.collect_stats(layer, inputs, layerwise.decoder_linears(layer, ["mlp.down_proj"], 0, "t"),
                                lambda m: Tokens())
        assert calls == ["self_attn.o_proj", "mlp.gate_proj"] * len(inputs)  # down_proj itself never computes
    finally:
        for h in hooks:
            h.remove()


def test_the_hooks_are_removed_and_the_layer_still_runs_whole(layer_inputs):
    model, inputs = layer_inputs
    layer = model.model.layers[1]
    linears = layerwise.decoder_linears(layer, ["self_attn.q_proj"], 1, "t")
    layerwise.collect_stats(layer, inputs, linears, lambda m: gptq.Hessian(m.in_features))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in layer.modules())
    out = layerwise.run_layer(layer, inputs)
    assert out[0][0].shape == inputs[0][0].shape


def test_a_stat_that_fails_still_removes_the_hooks(layer_inputs):
    model, inputs = layer_inputs
    layer = model.model.layers[2]

    class Broken:
        def add_batch(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        layerwise.collect_stats(layer, inputs, layerwise.decoder_linears(layer, ["mlp.up_proj"], 2, "t"),
                                lambda m: Broken())
    assert all(not m._forward_pre_hooks for m in layer.modules())


def test_the_linears_of_one_sequential_step_read_one_tensor(layer_inputs):
    """GPTQ and AWQ compute one statistic per SEQUENTIAL step from its first Linear: that is exact only because
    every Linear of the step reads the very same tensor."""
    model, inputs = layer_inputs
    layer = model.model.layers[5]
    for names in layerwise.SEQUENTIAL:
        seen = {}
        hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0]))
                 for n in names]
        try:
            layerwise.run_layer(layer, inputs[:1])
        finally:
            for h in hooks:
                h.remove()
        assert all(seen[n] is seen[names[0]] for n in names), names


def test_step_stats_shares_one_statistic_per_step_equal_to_each_linears_own(layer_inputs):
    """GPTQ's Hessians and Wanda/SparseGPT's statistics: one object per SEQUENTIAL step (accumulated once), holding
    exactly what collect_stats gives each Linear of the step; a whole layer at once (Wanda's one-pass mode) too."""
    model, inputs = layer_inputs
    layer = model.model.layers[4]
    names = [n for step in layerwise.SEQUENTIAL for n in step]
    linears = layerwise.decoder_linears(layer, names, 4, "test")
    shared = layerwise.step_stats(layer, inputs, linears, lambda m: gptq.Hessian(m.in_features))
    own = layerwise.collect_stats(layer, inputs, linears, lambda m: gptq.Hessian(m.in_features))
    assert set(shared) == set(names)
    assert len({id(s) for s in shared.values()}) == len(layerwise.SEQUENTIAL)
    for n in names:
        assert torch.equal(shared[n].H, own[n].H) and shared[n].n == own[n].n, n
    part = layerwise.step_stats(layer, inputs, {n: linears[n] for n in ("self_attn.k_proj", "mlp.up_proj")},
                                lambda m: gptq.Hessian(m.in_features))
    assert torch.equal(part["mlp.up_proj"].H, own["mlp.up_proj"].H)
    assert part["self_attn.k_proj"] is not part["mlp.up_proj"]
