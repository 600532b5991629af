"""Lab 02's exports, read by the engines that serve them (issue 28), on a CPU.

compressed-tensors `pack-quantized` (checkpoint.save_compressed_tensors: what llm-compressor writes and vLLM serves)
is loaded by transformers + the `compressed-tensors` package, and its logits are compared with the in-memory GPTQ
model. The scales are fp16-exact and stored in the model's float32, so the load is exact up to float32 summation
order: the tolerance is atol 1e-5 (measured: 0.0). Symmetric checkpoints load plainly; asymmetric ones only with
CompressedTensorsConfig(dequantize=True): the plain load fails on the packed weight_zero_point's shape (transformers
5.23 + compressed-tensors 0.20 build the compressed model on the meta device without packing the zero point), which
test_transformers_plain_load_of_an_asymmetric_export_fails documents.

The GPTQ exports (save_gptq's v1 "gptq" and v2 "gptq_v2"; model.save_pretrained(path, format="gptq") after
cl.quantize, which writes v2) are checked here with load_gptq, and with GPTQModel.load (its CPU torch kernel) and
transformers' GPTQ integration (GPTQModel + optimum) where `gptqmodel` is importable. It is not in the lab venv:
gptqmodel 7.3.6 pins numpy==2.2.6 (the labs pin 2.4.6) and pulls torchao, maturin, pypcre and more. tools/gptq_env.sh
builds .venv-gptq for them (torch 2.13.0 CPU, GPTQModel 7.3.6, optimum 2.3.0, the labs' transformers 5.23.0, no
torchvision: PyPI only has CUDA builds, which do not load beside the CPU torch, and the script guards GPTQModel's one
import of it, in its InternVL definition); in the lab venv these tests skip:
    tools/gptq_env.sh && export OMP_NUM_THREADS=1
    .venv-gptq/bin/python -m pytest tests/test_checkpoint_engines.py -k "gptqmodel or transformers_gptq"

Models: the `tiny_llama` fixture (random 2-layer Llama, hidden 64, SmolLM2's tokenizer), group size 32, and in one test
the first two decoder layers of the real SmolLM2-135M (in_features 576 and 1536, group size 64). GPTQ over all 30
layers takes 30-50 s on one thread of a 2-core CPU, too long for the suite; run by hand (4-bit g64 asym act-order,
8 x 128 calibration tokens), its export loads (dequantize=True) in under a second with max |logit difference| 0.
"""

import copy
import json
import os

import pytest
import torch

from compresslab import checkpoint, gptq

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # CompressedTensorsConfig(dequantize=True) on a checkpoint that has its own quantization_config: expected
    pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning"),
]

GS = 32  # tiny_llama: 2 groups per 64 inputs; also the smallest group torch's CPU int4 kernel (GPTQ path) accepts
ATOL = 1e-5  # float32 checkpoint of fp16-exact scales: only summation order may differ

# (sym, act_order, static_groups) that compressed-tensors can express: act-order only with static groups
# (actorder "weight"); static groups without act-order are plain contiguous groups
CASES = {
    "asym-actorder": (False, True, True),
    "asym-plain": (False, False, False),
    "asym-static": (False, False, True),
    "sym-actorder": (True, True, True),
    "sym-plain": (True, False, False),
}


@pytest.fixture(scope="module")
def calib(tiny_llama):
    _, tok = tiny_llama
    return torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ct_exports(tiny_llama, calib, tmp_path_factory):
    """case -> (quantized model, report, compressed-tensors checkpoint path)."""
    model, tok = tiny_llama
    out = {}
    for case, (sym, act_order, static_groups) in CASES.items():
        qmodel, report = gptq.quantize_model(model, calib, bits=4, group_size=GS, sym=sym, act_order=act_order,
                                             static_groups=static_groups, progress=False)
        path = checkpoint.save_compressed_tensors(qmodel, report, tmp_path_factory.mktemp(case) / "ck", bits=4,
                                                  group_size=GS, sym=sym, act_order=act_order,
                                                  static_groups=static_groups, tokenizer=tok)
        out[case] = qmodel, report, path
    return out


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _load_ct(path, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


# ----------------------------------------------------------------------------- compressed-tensors: the layout


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dense_packing_is_compressed_tensors_pack_to_int32(bits):
    """Our packer (unsigned codes) == compressed-tensors' (signed int8 codes, offset 2^(bits-1) added back)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (6, 70), generator=g)  # 70: a partial last word, and 3-bit straddles words
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    ours = checkpoint._pack_dense(codes, bits)
    assert ours.dtype == torch.int32 and ours.shape == (6, -(-70 * bits // 32))
    assert torch.equal(ours, pack_to_int32(signed, bits))  # along in_features (weight_packed)
    assert torch.equal(checkpoint._pack_dense(codes.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("case", list(CASES))
def test_ct_tensors_hold_the_gptq_report(ct_exports, case):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    sym = CASES[case][0]
    _, report, path = ct_exports[case]
    tensors = _tensors(path)
    for name, res in report.items():
        out_f, in_f = res.codes.shape
        assert f"{name}.weight" not in tensors and f"{name}.weight_g_idx" not in tensors
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.int32 and packed.shape == (out_f, in_f * 4 // 32)
        assert torch.equal(unpack_from_int32(packed, 4, torch.Size([out_f, in_f])).long() + 8, res.codes.long())
        assert scale.dtype == torch.float32 and torch.equal(scale, res.scales)
        assert tensors[f"{name}.weight_shape"].tolist() == [out_f, in_f]
        if sym:
            assert f"{name}.weight_zero_point" not in tensors and (res.zeros == 8).all()
        else:
            zp = tensors[f"{name}.weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (out_f * 4 // 32, in_f // GS)  # packed along OUT
            zeros = unpack_from_int32(zp, 4, torch.Size([out_f, in_f // GS]), packed_dim=0).long() + 8
            assert torch.equal(zeros, res.zeros.long())
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied: stored once


@pytest.mark.parametrize("case", ["asym-actorder", "sym-actorder"])
def test_ct_tensors_equal_what_compressed_tensors_writes(ct_exports, case):
    """compressed-tensors' own PackedQuantizationCompressor, given the dequantized weights and our qparams (as
    llm-compressor holds them: signed int8 zero points), writes exactly our tensors."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qmodel, report, path = ct_exports[case]
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(cfg).config_groups["group_0"]
    tensors = _tensors(path)
    for name, res in report.items():
        state = {"weight": qmodel.get_submodule(name).weight.detach(), "weight_scale": res.scales,
                 "weight_zero_point": (res.zeros - 8).to(torch.int8)}
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        ours = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        assert sorted(theirs) == sorted(ours), name
        for k in ours:
            assert torch.equal(theirs[k], ours[k]), (name, k)


@pytest.mark.parametrize("case", list(CASES))
def test_ct_config(ct_exports, case):
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    sym, act_order, _ = CASES[case]
    _, _, path = ct_exports[case]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    q = cfg["quantization_config"]
    weights = {"dynamic": False, "group_size": GS, "num_bits": 4, "strategy": "group", "symmetric": sym,
               "type": "int", **({"actorder": "weight"} if act_order else {})}
    assert q == {
        "config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                      "output_activations": None, "targets": ["Linear"], "weights": weights}},
        "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
        "kv_cache_scheme": None, "moe_sparsity_config": None, "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "version": compressed_tensors.__version__,  # the pinned release (checkpoint.CT_VERSION)
    }
    # the same dict compressed-tensors' pydantic models produce (ModelCompressor.update_config dumps it this way)
    built = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], format="pack-quantized",
                                                     weights=QuantizationArgs(**weights))},
        format="pack-quantized", quantization_status="compressed", ignore=["lm_head"])
    dumped = built.model_dump(exclude=["quant_method"])
    assert {k: v for k, v in q.items() if k not in ("quant_method", "version", "sparsity_config",
                                                    "transform_config")} == json.loads(json.dumps(dumped))
    assert QuantizationConfig.model_validate(q).model_dump(exclude=["quant_method"]) == dumped


# ---------------------------------------------------------------------------- compressed-tensors: transformers reads it


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_ct_export_with_dequantize(ct_exports, calib, case):
    qmodel, _, path = ct_exports[case]
    loaded = _load_ct(path, dequantize=True)
    torch.testing.assert_close(_logits(loaded, calib[:2]), _logits(qmodel, calib[:2]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["sym-actorder", "sym-plain"])
def test_transformers_plain_load_of_a_symmetric_export(ct_exports, calib, case):
    """No zero point stored: the plain load (compressed modules, decompressed on the first forward) works."""
    qmodel, _, path = ct_exports[case]
    loaded = _load_ct(path, dequantize=False)
    torch.testing.assert_close(_logits(loaded, calib[:2]), _logits(qmodel, calib[:2]), rtol=0, atol=ATOL)


def test_transformers_plain_load_of_an_asymmetric_export_fails(ct_exports):
    """The known regression (transformers 5.23 + compressed-tensors 0.20): the model's weight_zero_point is created
    unpacked, (out, n_groups), the checkpoint's is packed, (out * bits / 32, n_groups). If this starts passing, the
    regression is fixed: drop dequantize=True from the lab text and turn this into a plain-load check."""
    _, _, path = ct_exports["asym-actorder"]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _load_ct(path, dequantize=False)


def test_bfloat16_export_rounds_only_the_scales(ct_exports, calib, tmp_path):
    """dtype=torch.bfloat16 (llm-compressor's dtype for SmolLM2): the codes are unchanged, the scales round."""
    qmodel, report, _ = ct_exports["asym-actorder"]
    path = checkpoint.save_compressed_tensors(qmodel, report, tmp_path / "bf16", bits=4, group_size=GS, sym=False,
                                              act_order=True, static_groups=True, dtype=torch.bfloat16)
    tensors = _tensors(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight_scale"].dtype == torch.bfloat16
    assert torch.equal(tensors[f"{name}.weight_scale"], report[name].scales.bfloat16())
    loaded = _load_ct(path, dequantize=True)
    assert loaded.dtype == torch.bfloat16
    ref = _logits(qmodel, calib[:2])
    err = (_logits(loaded, calib[:2]) - ref).norm() / ref.norm()
    assert err < 0.05, err  # bf16 weights and activations: about 1e-2 relative


@pytest.mark.parametrize("bits,group_size", [(2, GS), (3, GS), (8, GS), (4, -1)])
def test_other_widths_and_per_channel_scales_load(tiny_llama, calib, tmp_path, bits, group_size):
    """3-bit codes straddle int32 words; group_size=-1 is strategy "channel" (scales (out, 1))."""
    model, _ = tiny_llama
    qmodel, report = gptq.quantize_model(model, calib, bits=bits, group_size=group_size, sym=False, act_order=True,
                                         static_groups=True, progress=False)
    path = checkpoint.save_compressed_tensors(qmodel, report, tmp_path / "ck", bits=bits, group_size=group_size,
                                              sym=False, act_order=True, static_groups=True)
    weights = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["strategy"] == ("channel" if group_size == -1 else "group")
    loaded = _load_ct(path, dequantize=True)
    torch.testing.assert_close(_logits(loaded, calib[:2]), _logits(qmodel, calib[:2]), rtol=0, atol=ATOL)


def test_dynamic_act_order_groups_are_refused(tiny_llama, calib, tmp_path):
    model, _ = tiny_llama
    qmodel, report = gptq.quantize_model(model, calib, bits=4, group_size=GS, act_order=True, static_groups=False,
                                         progress=False)
    with pytest.raises(ValueError, match="static_groups=True"):
        checkpoint.save_compressed_tensors(qmodel, report, tmp_path / "ck", bits=4, group_size=GS, sym=False,
                                           act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="g_idx"):  # flags that lie about the report are caught too
        checkpoint.save_compressed_tensors(qmodel, report, tmp_path / "ck", bits=4, group_size=GS, sym=False,
                                           act_order=True, static_groups=True)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.tmp").exists()


def test_sym_flag_must_match_the_report(ct_exports, tmp_path):
    qmodel, report, _ = ct_exports["asym-plain"]
    with pytest.raises(ValueError, match="asymmetric"):
        checkpoint.save_compressed_tensors(qmodel, report, tmp_path / "ck", bits=4, group_size=GS, sym=True,
                                           act_order=False, static_groups=False)


def test_real_smollm_layers_through_transformers(smollm, tmp_path):
    """SmolLM2-135M cut to its first two decoder layers (real weights, vocabulary and tied embeddings; in_features
    576 and 1536), GPTQ 4-bit g64 asymmetric act-order (static groups) on 6 x 128 WikiText-2 tokens."""
    import compresslab as cl

    model, tok = smollm
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:2]
    calib = cl.data.calibration_batches(tok, n_samples=6, seq_len=128, seed=0)
    qmodel, report = gptq.quantize_model(small, calib, bits=4, group_size=64, sym=False, act_order=True,
                                         static_groups=True, progress=False)
    path = checkpoint.save_compressed_tensors(qmodel, report, tmp_path / "smol", bits=4, group_size=64, sym=False,
                                              act_order=True, static_groups=True, tokenizer=tok)
    tensors = _tensors(path)
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].shape == (576, 72)
    assert tensors["model.layers.0.mlp.down_proj.weight_zero_point"].shape == (72, 24)
    loaded = _load_ct(path, dequantize=True)
    window = cl.data.test_windows(tok, n_windows=1, seq_len=128)
    torch.testing.assert_close(_logits(loaded, window), _logits(qmodel, window), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- GPTQ v2


def _unpack_fields(words: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """int32 words -> fields, lowest bits first, expanded along `axis` (written independently of the package)."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    per = 32 // bits
    fields = torch.stack([(u >> (bits * k)) & (2**bits - 1) for k in range(per)], dim=axis + 1)
    shape = list(words.shape)
    shape[axis] *= per
    return fields.reshape(shape)


@pytest.fixture(scope="module")
def gptq_exports(tiny_llama, calib, tmp_path_factory):
    """(format, sym) -> (quantized model, report, path): dynamic act-order groups (desc_act), group size 32."""
    model, tok = tiny_llama
    out = {}
    for sym in (False, True):
        qmodel, report = gptq.quantize_model(model, calib, bits=4, group_size=GS, sym=sym, act_order=True,
                                             progress=False)
        for fmt in checkpoint.CHECKPOINT_FORMATS:
            path = checkpoint.save_gptq(qmodel, report, tmp_path_factory.mktemp(f"{fmt}-{sym}") / "ck", bits=4,
                                        group_size=GS, sym=sym, act_order=True, tokenizer=tok, checkpoint_format=fmt)
            out[fmt, sym] = qmodel, report, path
    return out


def test_gptq_v2_stores_zero_points_without_the_offset(gptq_exports):
    _, report, path = gptq_exports["gptq_v2", False]
    _, _, path_v1 = gptq_exports["gptq", False]
    tensors, tensors_v1 = _tensors(path), _tensors(path_v1)
    for name, res in report.items():
        stored = _unpack_fields(tensors[f"{name}.qzeros"], 4, axis=1)  # (n_groups, out)
        assert torch.equal(stored, res.zeros.t().long())
        assert torch.equal(tensors[f"{name}.qweight"], tensors_v1[f"{name}.qweight"])  # only the zeros differ
        assert torch.equal(tensors[f"{name}.g_idx"].long(), res.g_idx)


def test_gptq_v2_config(gptq_exports):
    cfg = json.loads((gptq_exports["gptq_v2", False][2] / "config.json").read_text())
    q = cfg["quantization_config"]
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq_v2" and q["format"] == "gptq_v2"
    assert q["sym"] is False and q["desc_act"] is True and q["bits"] == 4 and q["group_size"] == GS
    assert q["pack_dtype"] == "int32"
    (tool,) = q["meta"]["quantizer"]
    assert tool.startswith("compresslab:") and not tool.startswith("gptqmodel")  # we do not claim to be GPTQModel
    v1 = json.loads((gptq_exports["gptq", False][2] / "config.json").read_text())["quantization_config"]
    assert v1["checkpoint_format"] == "gptq" and "meta" not in v1


@pytest.mark.parametrize("sym", [False, True])
def test_load_gptq_reads_v2(gptq_exports, calib, sym, tmp_path):
    import shutil

    qmodel, _, path = gptq_exports["gptq_v2", sym]
    reloaded, _ = checkpoint.load_gptq(path)
    torch.testing.assert_close(_logits(reloaded, calib[:2]), _logits(qmodel, calib[:2]), rtol=1e-4, atol=1e-4)
    # the same files labelled v1: every zero point read one too high -> wrong weights
    wrong = tmp_path / "mislabelled"
    shutil.copytree(path, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = cfg["quantization_config"]["format"] = "gptq"
    (wrong / "config.json").write_text(json.dumps(cfg))
    misread, _ = checkpoint.load_gptq(wrong)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(misread.get_submodule(name).weight, qmodel.get_submodule(name).weight, atol=1e-3)


def test_save_gptq_rejects_an_unknown_format(gptq_exports, tmp_path):
    qmodel, report, _ = gptq_exports["gptq", False]
    with pytest.raises(ValueError, match="checkpoint_format"):
        checkpoint.save_gptq(qmodel, report, tmp_path / "ck", bits=4, group_size=GS, sym=False, act_order=True,
                             checkpoint_format="marlin")
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- GPTQ: GPTQModel and transformers


def _gptqmodel():
    if os.environ.get("COMPRESSLAB_REQUIRE_GPTQMODEL") == "1":  # make check-gptq: fail rather than skip
        import gptqmodel

        return gptqmodel
    return pytest.importorskip("gptqmodel", reason="GPTQModel is not in the lab venv: build .venv-gptq with "
                               "tools/gptq_env.sh and run these tests with .venv-gptq/bin/python (module docstring)")


def _rel_err(got, ref):
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("fmt,sym", [("gptq_v2", False), ("gptq_v2", True), ("gptq", True)])
def test_gptqmodel_loads_the_export(gptq_exports, calib, fmt, sym):
    """GPTQModel.load on the CPU torch kernel, in float16 (its torch kernel takes float16/bfloat16 only: float16
    keeps the fp16 scales exact; activations in fp16 give ~1e-3 relative error)."""
    gptqmodel = _gptqmodel()
    qmodel, _, path = gptq_exports[fmt, sym]
    m = gptqmodel.GPTQModel.load(str(path), device="cpu", backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16)
    err = _rel_err(_logits(m.model, calib[:2]), _logits(qmodel, calib[:2]))
    assert err < 1e-2, err


def test_gptqmodel_refuses_an_asymmetric_v1_export(gptq_exports):
    gptqmodel = _gptqmodel()
    _, _, path = gptq_exports["gptq", False]
    with pytest.raises(ValueError, match="sym=False model with format=FORMAT.GPTQ"):
        gptqmodel.GPTQModel.load(str(path), device="cpu", backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16)


@pytest.mark.parametrize("fmt,sym", [("gptq_v2", False), ("gptq", False), ("gptq_v2", True), ("gptq", True)])
def test_transformers_gptq_integration_loads_the_export(gptq_exports, calib, fmt, sym, tmp_path):
    """AutoModelForCausalLM.from_pretrained through GPTQModel + optimum (CPU: torch's int4 kernel, bf16 inside)."""
    _gptqmodel()
    pytest.importorskip("optimum", reason="transformers' GPTQ integration needs optimum")
    import shutil

    from transformers import AutoModelForCausalLM

    qmodel, _, path = gptq_exports[fmt, sym]
    ref = _logits(qmodel, calib[:2])
    loaded = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
    err = _rel_err(_logits(loaded, calib[:2]), ref)
    assert err < 2e-2, err
    if fmt == "gptq_v2":  # the same files labelled v1 read every zero point one too high: the check has teeth
        wrong = tmp_path / "mislabelled"
        shutil.copytree(path, wrong)
        cfg = json.loads((wrong / "config.json").read_text())
        cfg["quantization_config"]["checkpoint_format"] = cfg["quantization_config"]["format"] = "gptq"
        (wrong / "config.json").write_text(json.dumps(cfg))
        misread = AutoModelForCausalLM.from_pretrained(wrong, device_map="cpu", dtype=torch.float32)
        assert _rel_err(_logits(misread, calib[:2]), ref) > 5 * err


@pytest.mark.parametrize("sym,act_order", [(False, True), (True, True), (False, False)])
def test_gptqmodel_loads_what_save_pretrained_writes(tiny_llama, calib, sym, act_order, tmp_path):
    """cl.quantize(model, cl.GPTQConfig(...)); model.save_pretrained(path, format="gptq") writes GPTQ v2, and
    GPTQModel.load (CPU torch kernel, float16) dequantizes exactly our weights: the scales are fp16 and each weight
    (q - z) * s is the exact product rounded once to fp16 on both sides, so the check is bit-exact. The logits differ
    only by fp16 activations: relative error < 5e-3 (measured 7e-4). transformers' GPTQ integration reads the same
    folder (torch's int4 kernel, bf16 inside): < 2e-2 (measured 2.5e-3). GPTQModel.load also loads the tokenizer
    from the folder (it fails without one), hence tokenizer=tok."""
    import compresslab as cl

    gptqmodel = _gptqmodel()
    pytest.importorskip("optimum", reason="transformers' GPTQ integration needs optimum")
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama
    q = cl.quantize(copy.deepcopy(model), cl.GPTQConfig(bits=4, group_size=GS, sym=sym, act_order=act_order),
                    calibration=calib, progress=False)
    path = q.save_pretrained(tmp_path / "ck", format="gptq", tokenizer=tok)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "gptq_v2"
    ref = _logits(q, calib[:2])

    m = gptqmodel.GPTQModel.load(str(path), device="cpu", backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16)
    ours = {name: mod for name, mod in q.named_modules() if hasattr(mod, "dequantized_weight")}
    assert len(ours) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for name, mod in ours.items():
        theirs = m.model.get_submodule(name)
        assert type(theirs).__name__ == "TorchLinear", (name, type(theirs))  # BACKEND.TORCH: GPTQModel's own kernel
        w = theirs.dequantize_weight().t()  # GPTQ layout (in, out) -> (out, in)
        assert w.dtype == torch.float16 and torch.equal(w, mod.dequantized_weight().half()), name
    err = _rel_err(_logits(m.model, calib[:2]), ref)
    assert err < 5e-3, err

    loaded = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
    err = _rel_err(_logits(loaded, calib[:2]), ref)
    assert err < 2e-2, err
