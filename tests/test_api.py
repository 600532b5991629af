"""compresslab.quantize / compresslab.prune (issue 28): one entry point per family, configs as frozen dataclasses,
the quantized state in the model, and model.save_pretrained writing a checkpoint that transformers loads.

Models: the `tiny_llama` fixture (random 2-layer Llama, hidden 64, group 32) for the paths, and SmolLM2-135M cut to
two decoder layers for the real-shape round trip through transformers + compressed-tensors."""

import copy
import dataclasses
import json

import pytest
import torch

import compresslab as cl
from compresslab import checkpoint, gptq, pruning, quant

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")]

GS = 32
ATOL = 1e-5  # float32 checkpoint of fp16-exact scales: only summation order may differ


@pytest.fixture(scope="module")
def calib(tiny_llama):
    _, tok = tiny_llama
    return torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _load_ct(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def test_entry_points_and_configs_resolve_from_the_package():
    assert cl.quantize is cl.api.quantize and cl.prune is cl.api.prune
    assert cl.GPTQConfig().group_size == cl.RTNConfig().group_size == cl.AWQConfig().group_size == 64
    assert cl.stack.__name__ == "compresslab.stack"  # submodules resolve as attributes on first use
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        cl.nonsense


def test_configs_are_frozen_and_keyword_only():
    cfg = cl.GPTQConfig(bits=4, sym=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 3
    with pytest.raises(TypeError):
        cl.GPTQConfig(4)  # positional options are refused


@pytest.mark.parametrize("make, match", [
    (lambda: cl.GPTQConfig(bits=5), "bits must be one of"),
    (lambda: cl.GPTQConfig(group_size=0), "group_size must be a positive int"),
    (lambda: cl.GPTQConfig(damp=1.5), "damp"),
    (lambda: cl.GPTQConfig(sym=True, clip=True), "clip=True"),
    (lambda: cl.RTNConfig(bits=1), "bits"),
    (lambda: cl.WandaConfig(), "exactly one of them"),
    (lambda: cl.WandaConfig(sparsity=0.5, pattern="2:4"), "exactly one of them"),
    (lambda: cl.SparseGPTConfig(pattern="4:2"), "0 < N < M"),
    (lambda: cl.SparseGPTConfig(sparsity=0.5, bits=5), "bits must be None or one of"),
    (lambda: cl.MagnitudeConfig(pattern="2-4"), "must look like '2:4'"),
    (lambda: cl.MagnitudeConfig(sparsity=1.0), "sparsity"),
])
def test_bad_configs_name_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_gptq_entry_point_equals_the_layer_loop_and_keeps_the_state_in_the_model(tiny_llama, calib):
    model, _ = tiny_llama
    ref, report = gptq.quantize_model(model, calib, bits=4, group_size=GS, progress=False)
    q = cl.quantize(copy.deepcopy(model), cl.GPTQConfig(group_size=GS), calibration=calib, progress=False)
    lin = q.model.layers[0].self_attn.q_proj
    assert isinstance(lin, quant.QuantLinear) and lin.qweight.dtype == torch.uint8
    assert lin.scales.dtype == torch.float16 and hasattr(lin, "g_idx")  # act-order, dynamic groups: g_idx stored
    for name, res in report.items():  # the figures cannot move: the stored codes dequantize to GPTQ's weights
        torch.testing.assert_close(q.get_submodule(name).dequantized_weight(), res.dequantized, rtol=0, atol=0)
    ids = calib[:2]
    torch.testing.assert_close(_logits(q, ids), _logits(ref, ids), rtol=0, atol=ATOL)
    qc = q.config.quantization_config
    assert qc["quant_method"] == "compresslab" and qc["method"] == "gptq" and qc["act_order"] and qc["group_size"] == GS
    assert type(q.lm_head) is torch.nn.Linear  # the head stays full precision


def test_the_model_passed_in_is_quantized_in_place(tiny_llama):
    model, _ = tiny_llama
    m = copy.deepcopy(model)
    assert cl.quantize(m, cl.RTNConfig(group_size=GS)) is m
    assert isinstance(m.model.layers[1].mlp.down_proj, quant.QuantLinear)
    with pytest.raises(ValueError, match="already quantized"):
        cl.quantize(m, cl.RTNConfig(group_size=GS))


@pytest.mark.parametrize("sym, act_order, static_groups", [(False, True, True), (True, False, False),
                                                          (False, False, False), (True, True, True)])
def test_save_pretrained_writes_compressed_tensors_that_transformers_loads(tiny_llama, calib, tmp_path, sym,
                                                                           act_order, static_groups):
    model, tok = tiny_llama
    q = cl.quantize(copy.deepcopy(model), cl.GPTQConfig(group_size=GS, sym=sym, act_order=act_order,
                                                        static_groups=static_groups), calibration=calib,
                    progress=False)
    path = q.save_pretrained(tmp_path / "ck", tokenizer=tok)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    loaded = _load_ct(path)
    torch.testing.assert_close(_logits(loaded, calib[:2]), _logits(q, calib[:2]), rtol=0, atol=ATOL)


def test_save_pretrained_after_dynamic_act_order_writes_gptq_v2(tiny_llama, calib, tmp_path):
    """Dynamic act-order groups have no compressed-tensors form: save_pretrained writes GPTQ v2 (what GPTQModel
    loads; tests/test_checkpoint_engines.py loads that layout with GPTQModel where it is installed)."""
    model, tok = tiny_llama
    q = cl.quantize(copy.deepcopy(model), cl.GPTQConfig(group_size=GS), calibration=calib, progress=False)
    path = q.save_pretrained(tmp_path / "ck")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2" and qc["desc_act"]
    loaded, _ = checkpoint.load_gptq(path)
    torch.testing.assert_close(_logits(loaded, calib[:2]), _logits(q, calib[:2]), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="dynamic groups"):
        q.save_pretrained(tmp_path / "ct", format="compressed-tensors")


def test_rtn_on_real_smollm_layers_round_trips_through_transformers(smollm, tmp_path):
    """SmolLM2-135M cut to two decoder layers (real shapes: 576 and 1536 inputs, tied embeddings), RTN 4-bit g64."""
    model, tok = smollm
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:2]
    ref, _ = gptq.rtn_quantize_model(small)  # RTN with fp16 scales (what is stored), as lab 07 serves it
    q = cl.quantize(small, cl.RTNConfig())
    window = cl.data.test_windows(tok, n_windows=1, seq_len=64)
    torch.testing.assert_close(_logits(q, window), _logits(ref, window), rtol=0, atol=1e-4)
    path = q.save_pretrained(tmp_path / "smol", tokenizer=tok)
    torch.testing.assert_close(_logits(_load_ct(path), window), _logits(q, window), rtol=0, atol=ATOL)


def test_transformers_own_save_is_not_what_runs(tiny_llama, tmp_path):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="no compresslab-quantized Linear"):
        checkpoint.save_quantized(copy.deepcopy(model), tmp_path / "x")


def test_missing_calibration_and_unknown_configs_are_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        cl.quantize(copy.deepcopy(model), cl.GPTQConfig())
    with pytest.raises(ValueError, match="wanda needs calibration data"):
        cl.prune(copy.deepcopy(model), cl.WandaConfig(sparsity=0.5))
    with pytest.raises(TypeError, match="unknown config"):
        cl.quantize(model, {"bits": 4})
    with pytest.raises(TypeError, match="unknown config"):
        cl.prune(model, cl.GPTQConfig())


@pytest.mark.parametrize("config, method, kw", [
    (cl.api.MagnitudeConfig(sparsity=0.5), "magnitude", {"sparsity": 0.5}),
    (cl.api.WandaConfig(pattern="2:4"), "wanda", {"pattern": "2:4"}),
    (cl.api.SparseGPTConfig(sparsity=0.5), "sparsegpt", {"sparsity": 0.5}),
    (cl.api.SparseGPTConfig(pattern="2:4", bits=4, group_size=32), "sparsegpt",  # joint: 2:4 + 4-bit survivors
     {"pattern": "2:4", "bits": 4, "group_size": 32}),
])
def test_prune_entry_point_equals_prune_model(tiny_llama, calib, config, method, kw):
    model, _ = tiny_llama
    ref, _ = pruning.prune_model(model, calib, method, progress=False, **kw)
    got = cl.prune(copy.deepcopy(model), config, calibration=calib, progress=False)
    for (n, a), (_, b) in zip(got.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n


def test_one_default_group_size_everywhere():
    """Issue 28: the entry point's configs, lab 01's storage and the W4A16 kernel agree on 64 (576 = 9 x 64)."""
    import inspect

    from compresslab import quant
    from compresslab.kernels import w4a16

    assert quant.DEFAULT_GROUP_SIZE == 64
    defaults = {"RTNConfig": cl.RTNConfig().group_size, "GPTQConfig": cl.GPTQConfig().group_size,
                "SparseGPTConfig": cl.SparseGPTConfig(sparsity=0.5).group_size}
    for fn in (quant.quantize_model, quant.fake_quantize_model, w4a16.rtn_gptq, w4a16.QuantLinear.from_linear,
               w4a16.quantize_model):
        defaults[fn.__qualname__] = inspect.signature(fn).parameters["group_size"].default
    assert set(defaults.values()) == {quant.DEFAULT_GROUP_SIZE}, defaults
