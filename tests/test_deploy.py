"""compresslab.deploy (lab 07): the roofline arithmetic, latency bookkeeping, bad input, and the pinned ONNX Runtime
GenAI path on the real model (export, generate, teacher-forced perplexity equal to PyTorch's for the fp32 export)."""

import math

import pytest
import torch

import compresslab as cl
from compresslab import deploy


# ----------------------------------------------------------------------------- arithmetic


def test_weight_bytes_at_counts_codes_scales_zeros_and_fp16_rest():
    assert deploy.weight_bytes_at(1000, 10, 16) == 2 * 1010
    # 4-bit g64 on 6400 params: 3200 B codes + 100 groups x (2 B scale + 0.5 B zero) + 2 x 1000 others
    assert deploy.weight_bytes_at(6400, 1000, 4, 64) == 3200 + 250 + 2000
    assert deploy.weight_bytes_at(6400, 0, 3, 64) == 2400 + 100 * (2 + 3 / 8)


def test_decode_bound_shares_weights_across_the_batch_but_not_the_cache():
    one = deploy.decode_bound(1e9, 0, 0, 1, 1000)
    assert one == pytest.approx(1000)  # 1 GB per step at 1000 GB/s: 1000 steps/s
    assert deploy.decode_bound(1e9, 0, 0, 8, 1000) == pytest.approx(8000)  # weights shared: 8x the tokens
    with_kv = deploy.decode_bound(1e9, 1e6, 1000, 8, 1000)  # 8 sequences x 1000 tokens x 1 MB = 8 GB more
    assert with_kv == pytest.approx(8 * 1000 / 9)


def test_latency_stats_separates_prefill_from_decode():
    ttft, itl, tps = deploy.latency_stats(1.0, [1.5, 1.6, 1.7, 1.8])
    assert ttft == pytest.approx(0.5) and itl == pytest.approx(0.1) and tps == pytest.approx(10)
    with pytest.raises(ValueError, match="at least two"):
        deploy.latency_stats(0.0, [0.1])


def test_token_agreement():
    assert deploy.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert deploy.token_agreement([1, 2], [1, 2, 3]) == (1.0, 2)


def test_linear_and_other_params_of_the_real_model(smollm):
    model, _ = smollm
    linear, other = deploy.linear_and_other_params(model)
    assert linear == cl.checks.SMOLLM_LINEAR and other == cl.checks.SMOLLM_OTHER
    assert linear + other == sum(p.numel() for p in model.parameters())  # tied head counted once


def test_a_quantized_model_counts_the_linears_it_stores(tiny_llama):
    """After cl.quantize the Linears hold codes in buffers (no weight parameter); they still count as Linear
    parameters, so results.describe gives a GPTQ row the bytes of its deployed format (lab 02's rows)."""
    import copy

    model, _ = tiny_llama
    q = cl.quantize(copy.deepcopy(model), cl.RTNConfig(bits=4, group_size=32))
    assert deploy.linear_and_other_params(q) == deploy.linear_and_other_params(model)
    assert cl.results.describe(q, 4, 32) == cl.results.describe(model, 4, 32)


def test_token_clock_skips_the_prompt_and_stamps_each_token(smollm):
    model, tok = smollm
    t = deploy.timed_generate(model, tok, "One, two, three,", new_tokens=5)
    assert len(t.tokens) == 5 and t.ttft_s > 0 and t.itl_s > 0 and t.total_s >= t.ttft_s
    assert t.tokens_per_s == pytest.approx(1 / t.itl_s)
    assert t.runs == deploy.TIMING_REPEATS == 5 and len(t.itl_runs) == 5 and t.itl_s == sorted(t.itl_runs)[2]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [0, 5, 32, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="weight bits must be one of"):
        deploy.weight_bytes_at(100, 0, bits, 64)


def test_bad_precision_and_missing_model(tmp_path):
    with pytest.raises(ValueError, match="precision must be"):
        deploy.build_onnx(tmp_path / "x", "int3")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        deploy.build_onnx(tmp_path / "x", "int4", model_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="genai_config.json"):
        deploy.OnnxLM(tmp_path)


def test_hf_folder_adds_architectures(tmp_path):
    folder = deploy.hf_folder(tmp_path / "hf")
    import json

    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (folder / "model.safetensors").is_symlink()


@pytest.mark.skipif(torch.cuda.is_available(), reason="explains the CPU case")
def test_trtllm_status_says_why_and_how_on_cpu():
    ok, why = deploy.trtllm_status()
    assert not ok and "no CUDA GPU" in why and "nvcr.io/nvidia/tensorrt-llm" in why


# ----------------------------------------------------------------------------- ONNX Runtime GenAI (pinned)


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {p: deploy.build_onnx(root / p, p) for p in ("fp32", "int4")}


def test_int4_export_is_matmulnbits_and_much_smaller(onnx_exports):
    import onnx

    graph = onnx.load(str(onnx_exports["int4"] / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops  # every projection reads 4-bit words
    assert deploy.onnx_bytes(onnx_exports["int4"]) < deploy.onnx_bytes(onnx_exports["fp32"]) / 5


def test_fp32_export_scores_like_pytorch(onnx_exports, smollm):
    """The same 48 WikiText-2 tokens, teacher-forced one at a time through ONNX Runtime's KV cache, give PyTorch's
    perplexity: the export, the cache and the scoring loop are right."""
    model, tok = smollm
    windows = cl.data.test_windows(tok, 1, 48)
    ref = cl.evaluation.perplexity(model, tok, n_windows=1, seq_len=48, batch_size=1, progress=False)
    got = deploy.onnx_perplexity(deploy.OnnxLM(onnx_exports["fp32"]), windows)
    assert got == pytest.approx(ref, rel=1e-3)


def test_int4_generates_and_stays_close(onnx_exports, smollm):
    model, tok = smollm
    lm = deploy.OnnxLM(onnx_exports["int4"])
    ids = tok("The history of the transistor").input_ids
    t = lm.timed_generate(ids, 6)
    assert len(t.tokens) == 6 and all(0 <= x < model.config.vocab_size for x in t.tokens)
    windows = cl.data.test_windows(tok, 1, 48)
    ref = cl.evaluation.perplexity(model, tok, n_windows=1, seq_len=48, batch_size=1, progress=False)
    ppl = deploy.onnx_perplexity(lm, windows)
    assert math.isfinite(ppl) and ref < ppl < 2 * ref  # 4-bit RTN costs something, not everything
    again = deploy.build_onnx(onnx_exports["int4"], "int4")  # a complete export is reused, not rebuilt
    assert again == onnx_exports["int4"]


def test_decode_read_bytes_counts_what_each_path_stores(tiny_llama):
    """Issue 24, item 2: PyTorch's dynamic int8 quantizes the tied LM head too; the lab counted it (and every other
    non-decoder tensor) as fp32, ~220 MB instead of the ~135 MB one step reads. Counted here independently."""
    import copy

    model, _ = tiny_llama
    cfg = model.config
    # fp32, tied: everything once, the embedding table through the LM head
    assert deploy.decode_read_bytes(model) == cl.evaluation.stored_bytes(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n_linear = sum(m.weight.numel() for m in linears)  # includes the LM head (vocab x hidden)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    bufs = sum(b.numel() * b.element_size() for b in model.buffers())
    q8 = deploy.dynamic_int8(copy.deepcopy(model))
    assert deploy.decode_read_bytes(q8) == n_linear * 1 + norms * 4 + bufs + cfg.hidden_size * 4  # + 1 embedding row
    # the LM head kept fp32: its vocab x hidden weights at 4 bytes, the decoder Linears at 1
    head = model.lm_head.weight.numel()
    q8h = deploy.dynamic_int8(copy.deepcopy(model), lm_head=False)
    assert isinstance(q8h.lm_head, torch.nn.Linear)
    assert deploy.decode_read_bytes(q8h) == (n_linear - head) * 1 + head * 4 + norms * 4 + bufs
    with torch.no_grad():
        ids = torch.randint(0, cfg.vocab_size, (1, 8))
        assert torch.isfinite(q8h(ids).logits).all()


def test_median_seconds_times_only_the_step_not_its_setup():
    """Issue 24, item 5: lab 07 timed a deepcopy of the cache inside the decode step. setup runs untimed."""
    import time

    calls = []
    t = cl.evaluation.median_seconds(lambda x: calls.append(x), repeats=5, warmup=1,
                                     setup=lambda: time.sleep(0.05) or len(calls))
    assert t < 0.01 and calls == [0, 1, 2, 3, 4, 5]  # 6 calls (1 warm-up), each handed its own setup result
    assert cl.evaluation.median_seconds(lambda: time.sleep(0.02), repeats=3, warmup=0) >= 0.02


def test_median_timed_warms_up_then_takes_medians_of_every_run():
    seq = iter([9.0, 9.0, 1.0, 3.0, 2.0, 5.0, 4.0])  # the first (warm-up) run is slow and not counted
    fake = lambda: (lambda v: deploy.Timed([1, 2], v, v / 10, 10 / v, v))(next(seq))  # noqa: E731
    t = deploy.median_timed(fake, repeats=5, warmup=2)
    assert t.runs == 5 and t.ttft_runs == [1.0, 3.0, 2.0, 5.0, 4.0] and t.ttft_s == 3.0
    assert t.itl_s == pytest.approx(0.3) and t.tokens_per_s == pytest.approx(1 / 0.3) and t.itl_spread == "100.0–500.0 ms"
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        deploy.median_timed(fake, repeats=0)
    other = iter([[1], [1], [2]])
    with pytest.raises(RuntimeError, match="different tokens"):
        deploy.median_timed(lambda: deploy.Timed(next(other), 1, 1, 1, 1), repeats=2, warmup=1)


@pytest.mark.parametrize("cap, kv, gemm", [((7, 5), False, False), ((8, 0), True, False), ((8, 6), True, False),
                                           ((8, 9), True, True), ((9, 0), True, True), ((10, 0), True, True)])
def test_fp8_kv_cache_is_not_gated_to_fp8_tensor_cores(cap, kv, gemm):
    """Issue 24, item 10: the FP8 KV cache was gated to sm89+, so an A100 silently skipped it."""
    assert deploy.fp8_support(cap) == {"kv_cache": kv, "gemm": gemm}
    with pytest.raises(ValueError, match="capability must be"):
        deploy.fp8_support("sm80")
