"""compresslab.nvmodelopt: NVIDIA Model Optimizer's quantize and export on a CPU, and this package's own reader.

The offline SmolLM2-135M is quantized once per format (module-scoped fixtures, 4 x 64 calibration tokens) and
exported; read_export's weights are then compared, Linear by Linear, with ModelOpt's fake quantization.
Skipped where nvidia-modelopt is not installed (the rest of the package does not need it).
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from compresslab import formats, nvmodelopt

OK, WHY = nvmodelopt.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"NVIDIA Model Optimizer missing: {WHY}")

N_LINEARS = 30 * 7  # SmolLM2-135M: 30 layers x (q, k, v, o, gate, up, down); lm_head stays full precision
TIE_RATE = 1e-3  # largest share of weights one grid step apart (round-half ties); measured 2e-4 FP8, 6e-8 INT4


@pytest.fixture(scope="module")
def calib(smollm):
    from compresslab import data

    return data.calibration_batches(smollm[1], n_samples=4, seq_len=64, seed=0)


def _quantize_and_export(smollm, calib, name, tmp_path_factory):
    model = nvmodelopt.quantize(copy.deepcopy(smollm[0]), name, calib, batch_size=2, progress=False)
    path = nvmodelopt.export(model, tmp_path_factory.mktemp(name) / "export")
    return model, path, nvmodelopt.read_export(path)


@pytest.fixture(scope="module")
def fp8(smollm, calib, tmp_path_factory):
    return _quantize_and_export(smollm, calib, "fp8", tmp_path_factory)


@pytest.fixture(scope="module")
def int4_awq(smollm, calib, tmp_path_factory):
    return _quantize_and_export(smollm, calib, "int4_awq", tmp_path_factory)


def _stored(path, key):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(key)


# ----------------------------------------------------------------------------- availability and configs


def test_available_names_the_pinned_version():
    ok, why = nvmodelopt.available()
    assert ok and nvmodelopt.MODELOPT_VERSION == "0.47.0" and "0.47.0" in why


def test_config_sets_every_128_block_to_block_size_and_leaves_the_preset_alone():
    mtq = nvmodelopt._mtq()
    cfg = nvmodelopt.config("int4_awq")
    assert [a["block_sizes"][-1] for a in nvmodelopt._block_settings(cfg)] == [64]
    assert [a["block_sizes"][-1] for a in nvmodelopt._block_settings(mtq.INT4_AWQ_CFG)] == [128]  # a deep copy
    w4a8 = nvmodelopt.config("w4a8_awq", block_size=32)  # its weight cfg is a list: int4 blocks, then FP8
    assert [a["block_sizes"][-1] for a in nvmodelopt._block_settings(w4a8)] == [32]
    assert {a["block_sizes"][-1] for a in nvmodelopt._block_settings(nvmodelopt.config("nvfp4"))} == {16}
    fp8 = nvmodelopt.config("fp8")
    assert fp8 == mtq.FP8_DEFAULT_CFG and fp8 is not mtq.FP8_DEFAULT_CFG


def test_bad_names_and_block_sizes_say_what_to_use(smollm, calib):
    with pytest.raises(ValueError, match="int4_awq"):  # the error lists the names
        nvmodelopt.config("int3")
    with pytest.raises(ValueError, match="positive int"):
        nvmodelopt.config("int4_awq", block_size=0)
    model = copy.deepcopy(smollm[0])
    with pytest.raises(ValueError, match="choose from"):
        nvmodelopt.quantize(model, "fp4", calib)
    with pytest.raises(ValueError, match="calibration"):
        nvmodelopt.quantize(model, "fp8", None)
    with pytest.raises(ValueError, match=r"block_size=128 does not divide in_features \[576\]"):
        nvmodelopt.quantize(model, "int4_awq", calib, block_size=128)  # ModelOpt's own 128
    assert not nvmodelopt.is_quantized(model)  # every check runs before ModelOpt touches the model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nvfp4_on_cpu_says_it_needs_a_gpu_and_where_the_emulation_is(smollm, calib):
    with pytest.raises(RuntimeError, match="needs the model on a CUDA GPU") as e:
        nvmodelopt.quantize(copy.deepcopy(smollm[0]), "nvfp4", calib)
    assert "formats.nvfp4_quantize" in str(e.value)


def test_missing_modelopt_says_how_to_install_it(monkeypatch, smollm, calib):
    for name in ("modelopt", "modelopt.torch", "modelopt.torch.quantization"):
        monkeypatch.setitem(sys.modules, name, None)  # "import modelopt..." now raises ImportError
    ok, why = nvmodelopt.available()
    assert not ok and "pip install nvidia-modelopt==0.47.0" in why
    with pytest.raises(ImportError, match=r"pip install nvidia-modelopt==0\.47\.0"):
        nvmodelopt.quantize(copy.deepcopy(smollm[0]), "fp8", calib)


def test_the_module_and_the_reader_work_without_modelopt(fp8):
    _, path, _ = fp8
    code = ("import sys; sys.modules['modelopt'] = None\n"  # any import of modelopt would now fail
            "from compresslab import nvmodelopt\n"
            f"back = nvmodelopt.read_export({str(path)!r})\n"
            "print(nvmodelopt.available()[0], len(back['weights']), 'modelopt.torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", str(N_LINEARS), "False"]


def test_unpack_int4_nibble_order():
    codes = torch.tensor([[-8, 7, 0], [1, -1, 3], [5, -3, -2], [2, 4, -7]], dtype=torch.int8)  # (out 4, in 3)
    u = codes.to(torch.int16) & 0xF  # two's complement nibbles
    packed = (u[0::2] | (u[1::2] << 4)).to(torch.uint8)  # (2, 3): row 2r low nibble, row 2r + 1 high
    assert torch.equal(nvmodelopt.unpack_modelopt_int4(packed), codes)


# ----------------------------------------------------------------------------- quantize, export, read back


def test_quantize_refuses_a_model_quantized_before(fp8, calib):
    model, _, _ = fp8
    with pytest.raises(ValueError, match="fresh copy"):
        nvmodelopt.quantize(model, "fp8", calib)


def test_summary_counts_the_enabled_quantizers(fp8, int4_awq):
    s = nvmodelopt.summary(fp8[0])
    assert f"{2 * N_LINEARS} enabled" in s and f"weight_quantizer    {N_LINEARS} of" in s
    assert f"input_quantizer     {N_LINEARS} of" in s
    s = nvmodelopt.summary(int4_awq[0])
    assert f"{N_LINEARS} enabled" in s and "block_sizes={-1: 64" in s and "input_quantizer       0 of" in s
    assert "TensorQuantizers found in model" in nvmodelopt.summary(fp8[0], full=True)


def test_export_files_and_hf_quant_config(fp8, int4_awq):
    for (_, path, back), algo in ((fp8, "FP8"), (int4_awq, "W4A16_AWQ")):
        assert {"model.safetensors", "hf_quant_config.json", "config.json"} <= {p.name for p in path.iterdir()}
        quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
        assert back["quant_config"]["quantization"] == quant and quant["quant_algo"] == algo
        assert "lm_head" in quant["exclude_modules"]
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["quantization_config"]["quant_method"] == "modelopt"
    quant = int4_awq[2]["quant_config"]["quantization"]
    assert quant["group_size"] == 64 and quant["has_zero_point"] is False and quant["pre_quant_scale"] is True


def test_stored_dtypes_and_shapes(fp8, int4_awq):
    q = "model.layers.0.self_attn.q_proj"  # (576, 576)
    w, s = _stored(fp8[1], f"{q}.weight"), _stored(fp8[1], f"{q}.weight_scale")
    assert (w.dtype, w.shape, s.dtype, s.shape) == (torch.float8_e4m3fn, (576, 576), torch.float32, ())
    assert _stored(fp8[1], f"{q}.input_scale").shape == ()
    w, s = _stored(int4_awq[1], f"{q}.weight"), _stored(int4_awq[1], f"{q}.weight_scale")
    assert (w.dtype, w.shape, s.dtype, s.shape) == (torch.uint8, (288, 576), torch.float32, (576, 9))
    assert int4_awq[2]["weights"][q].shape == (576, 576)


def _grid_index(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest float8 e4m3 value."""
    grid = formats.grid("fp8_e4m3").float()
    return torch.bucketize(x, (grid[1:] + grid[:-1]) / 2)


def test_fp8_read_back_matches_the_fake_quant(fp8):
    """Exact e4m3 values times the scale; a few round-half ties land one e4m3 step apart (the fake quant multiplies
    by 448 / amax, the export divides by amax / 448: the last fp32 bit flips the tie)."""
    model, path, back = fp8
    fq = nvmodelopt.fake_quantized_weights(model)
    assert set(back["weights"]) == set(fq) and len(fq) == N_LINEARS
    ties = total = 0
    for name, ref in fq.items():
        s = _stored(path, f"{name}.weight_scale")
        a, b = back["weights"][name] / s, ref / s  # in e4m3 units: a is exactly a grid value
        step = (_grid_index(a) - _grid_index(b)).abs()
        assert step.max() <= 1, name
        same = step == 0
        assert torch.allclose(a[same], b[same], rtol=1e-6, atol=1e-6), name
        ties, total = ties + (~same).sum().item(), total + a.numel()
    assert ties / total < TIE_RATE
    assert set(back["input_scale"]) == set(fq) and back["pre_quant_scale"] == {}


def test_int4_awq_read_back_matches_the_fake_quant_as_exported(int4_awq):
    """Codes times group scales equal ModelOpt's fake quant of the exported state up to fp32 rounding, bar a few
    round-half ties one code apart. Against the model as calibrated, the Linears whose pre_quant_scale the export
    shares and folds into the RMSNorm (q/k/v, gate/up) differ: they were re-quantized."""
    model, path, back = int4_awq
    fq = nvmodelopt.fake_quantized_weights(model, as_exported=True)
    assert set(back["weights"]) == set(fq) and len(fq) == N_LINEARS
    ties = total = 0
    for name, ref in fq.items():
        scale = _stored(path, f"{name}.weight_scale").repeat_interleave(64, dim=1)  # (out, in)
        codes_apart = ((back["weights"][name] - ref) / scale).abs()
        assert codes_apart.max() < 1 + 1e-4, name
        ties, total = ties + (codes_apart > 1e-4).sum().item(), total + ref.numel()
    assert ties / total < TIE_RATE

    live = nvmodelopt.fake_quantized_weights(model)  # the calibrated model, as it computes
    unfused = [n for n in fq if n.endswith(("o_proj", "down_proj"))]
    assert sorted(back["pre_quant_scale"]) == sorted(unfused)  # the others went into the norms
    for name in unfused:
        assert torch.allclose(live[name], fq[name], rtol=0, atol=1e-6), name
        assert torch.equal(back["pre_quant_scale"][name],
                           model.get_submodule(name).input_quantizer.pre_quant_scale.float())
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(live[q], back["weights"][q], atol=1e-3)


def test_export_copies_so_the_model_stays_usable_and_exports_again(int4_awq, calib, tmp_path):
    model, path, back = int4_awq
    with torch.no_grad():
        assert torch.isfinite(model(calib[:1, :16]).logits).all()
    again = nvmodelopt.read_export(nvmodelopt.export(model, tmp_path / "again"))
    assert all(torch.equal(again["weights"][k], v) for k, v in back["weights"].items())


def test_export_with_the_tokenizer_is_what_an_engine_loads(int4_awq, smollm, tmp_path):
    """Lab 03 exports with tokenizer=: TensorRT-LLM's LLM(folder) reads the tokenizer from the checkpoint folder."""
    from transformers import AutoTokenizer

    model, _, _ = int4_awq
    path = nvmodelopt.export(model, tmp_path / "with-tokenizer", tokenizer=smollm[1])
    assert {"tokenizer_config.json", "model.safetensors", "hf_quant_config.json"} <= {p.name for p in path.iterdir()}
    text = "The quick brown fox"
    assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == smollm[1](text)["input_ids"]
