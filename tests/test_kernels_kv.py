"""The fused KIVI kernels (compresslab.kernels.kv_quant) against their PyTorch reference, kvcompress.quantize_groups.

quantize_kv must give the same QuantizedGroups bit for bit (packed codes, fp16 scales and minima) for keys (grouped
along tokens, per channel) and values (grouped along channels, per token), for every bit width, group size and input
dtype, whatever the input's strides; dequantize_kv must give the same floats as QuantizedGroups.dequantize. Then the
backends are swapped inside gear_compress and inside a compressed cache on a tiny random Llama: same reconstruction,
same logits, same bytes. Without a GPU the kernels run in Triton's interpreter (slow), so shapes stay small.
"""

import dataclasses

import pytest
import torch

from compresslab import kernels
from compresslab import kvcache, kvformat
from compresslab import kvcompress as kv
from compresslab.kernels import dequantize_kv, kv_quant, quantize_kv
from layer_testing import gen

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")

DIM = {"key": -2, "value": -1}


def states(b=2, h=3, t=64, d=64, seed=0, dtype=torch.float32):
    """KV-like states: Gaussian, one loud channel and a few spikes, so groups have different ranges."""
    g = gen(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 3] *= 8
    spikes = torch.randint(0, x.numel(), (10,), generator=g)
    x.view(-1)[spikes] += 20
    return x.to(dtype)


def assert_same_groups(q: kvformat.QuantizedGroups, r: kvformat.QuantizedGroups):
    assert q.codes.dtype == r.codes.dtype == torch.uint8
    assert q.scale.dtype == r.scale.dtype == q.minimum.dtype == r.minimum.dtype == torch.float16
    assert q.codes.shape == r.codes.shape and q.scale.shape == r.scale.shape
    assert (q.bits, q.dim, tuple(q.shape)) == (r.bits, r.dim, tuple(r.shape))
    assert torch.equal(q.scale, r.scale)
    assert torch.equal(q.minimum, r.minimum)
    assert torch.equal(q.codes, r.codes), f"{(q.codes != r.codes).sum().item()} packed bytes differ"


def torch_copy(q: kvformat.QuantizedGroups) -> kvformat.QuantizedGroups:
    return dataclasses.replace(q, backend="torch")


# ----------------------------------------------------------------------------- quantize_kv == quantize_groups


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_quantize_kv_is_bit_exact_with_the_reference(kind, bits, group, dtype):
    t = 128 if (kind, bits, group) == ("key", 2, 64) else 64  # one case with two key groups of 64 tokens
    x = states(t=t, seed=bits + group, dtype=dtype)
    q = quantize_kv(x, kind, bits, group)
    # the plain dataclass: kvcompress.quantize_groups marks the kernel's output "triton"
    assert isinstance(q, kvformat.QuantizedGroups) and q.backend == "torch"
    assert q.codes.shape == ((2, 3, 64, t // group, group * bits // 8) if kind == "key"
                             else (2, 3, t, 64 // group, group * bits // 8))
    assert_same_groups(q, kv.quantize_groups(x, bits, group, DIM[kind]))


@pytest.mark.parametrize("bits", [2, 4])
def test_values_with_rows_not_a_multiple_of_the_block(bits):
    """Values: rows are tokens, 40 of them = one full block of 32 rows and a masked one of 8."""
    x = states(t=40, seed=bits)
    assert x.shape[-2] % kv_quant.BLOCK_R
    assert_same_groups(quantize_kv(x, "value", bits, 32), kv.quantize_groups(x, bits, 32, -1))


def test_keys_with_fewer_channels_than_the_block():
    """Keys: rows are channels; head_dim 16 < BLOCK_R = 32 leaves half the row block masked."""
    x = states(b=1, h=2, t=64, d=16, seed=3)
    assert_same_groups(quantize_kv(x, "key", 2, 32), kv.quantize_groups(x, 2, 32, -2))


@pytest.mark.parametrize("kind", ["key", "value"])
def test_non_contiguous_inputs_give_the_same_result(kind):
    x = states(t=128, seed=5, dtype=torch.float16)
    ref = quantize_kv(x, kind, 4, 32)
    heads_inner = x.transpose(1, 2).contiguous().transpose(1, 2)  # (b, h, t, d) with heads interleaved in memory
    assert not heads_inner.is_contiguous()
    assert_same_groups(quantize_kv(heads_inner, kind, 4, 32), ref)

    window = x[:, :, 32:96]  # a slice along tokens: a storage offset and the parent's strides
    assert not window.is_contiguous() and window.storage_offset() > 0
    assert_same_groups(quantize_kv(window, kind, 4, 32), quantize_kv(window.contiguous(), kind, 4, 32))
    assert_same_groups(quantize_kv(window, kind, 4, 32), kv.quantize_groups(window, 4, 32, DIM[kind]))

    wide = states(b=1, h=2, t=64, d=128, seed=6)
    strided = wide[..., ::2]  # head_dim with stride 2: values' grouped axis, keys' row axis
    assert_same_groups(quantize_kv(strided, kind, 2, 32), kv.quantize_groups(strided.contiguous(), 2, 32, DIM[kind]))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_ties_round_half_to_even_like_torch_round(kind, bits):
    """Groups spanning exactly [0, 2^b - 1] have scale 1 and minimum 0, so (x - min) / scale = k + 0.5 is a true tie:
    torch.round sends it to the even neighbour (0.5 -> 0, 1.5 -> 2, 2.5 -> 2), floor(v + 0.5) would not."""
    maxq = 2**bits - 1
    halves = [k + 0.5 for k in range(maxq)]  # 0.5 .. maxq - 0.5
    pattern = torch.tensor([0.0, float(maxq)] + halves)
    group = 32
    base = pattern.repeat(group // len(pattern) + 1)[:group]  # one group: contains 0, maxq and the halves
    rows = torch.stack([base.roll(i) for i in range(8)])  # (8, 32): every row a rotation of the group
    x = rows.reshape(1, 1, 8, 32)
    if kind == "key":
        x = x.transpose(-1, -2).contiguous()  # (1, 1, 32 tokens, 8 channels): each channel's tokens are the group
    q = quantize_kv(x, kind, bits, group)
    r = kv.quantize_groups(x, bits, group, DIM[kind])
    assert torch.all(q.scale == 1.0) and torch.all(q.minimum == 0.0)
    assert_same_groups(q, r)
    expected = torch.tensor([round(v) for v in x.flatten().tolist()]).reshape(x.shape).float()  # Python: banker's
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(dequantize_kv(q), expected)
    assert (expected != torch.floor(x + 0.5)).any()  # the case is a real tie test


# ----------------------------------------------------------------------------- dequantize_kv == dequantize


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_dequantize_kv_equals_the_pytorch_path_in_fp32(kind, bits):
    x = states(t=64, seed=11 + bits)
    q = quantize_kv(x, kind, bits, 32)
    out = dequantize_kv(q)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.is_contiguous()
    ref = torch_copy(q).dequantize(torch.float32)
    assert torch.equal(out, ref)
    # and the kernel really reconstructs x (not just the same garbage): half a step plus fp16 slack
    step = (x.amax(DIM[kind], keepdim=True) - x.amin(DIM[kind], keepdim=True)) / (2**bits - 1)  # per vector, >= group
    assert ((out - x).abs() <= step / 2 * 1.01 + 2e-3 * x.abs().max()).all()


@pytest.mark.parametrize("kind", ["key", "value"])
def test_dequantize_kv_equals_the_pytorch_path_in_fp16(kind):
    """dequantize_kv's docstring promises the same values as q.dequantize(dtype), in fp16 too."""
    x = states(t=64, seed=21)
    q = quantize_kv(x, kind, 4, 32)
    out = dequantize_kv(q, torch.float16)
    ref = torch_copy(q).dequantize(torch.float16)
    assert out.dtype == ref.dtype == torch.float16
    diff = (out.float() - ref.float()).abs()
    same = torch.equal(out, ref)
    assert same, (f"{(diff > 0).sum().item()} of {diff.numel()} elements differ, by up to "
                                   f"{diff.max().item()} (torch rounds q * scale to fp16 before adding the minimum)")


def test_quantizedgroups_with_the_triton_backend_dequantizes_with_the_kernel(monkeypatch):
    x = states(t=64, seed=2)
    q = kv.quantize_groups(x, 2, 32, -1, backend="triton")
    assert q.backend == "triton"
    assert_same_groups(q, kv.quantize_groups(x, 2, 32, -1))
    calls = []
    real = kv_quant.dequantize_kv
    monkeypatch.setattr(kv_quant, "dequantize_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(q.dequantize(), torch_copy(q).dequantize())
    assert calls == [1]


# ----------------------------------------------------------------------------- GEAR with the triton backend


@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("method", ["kivi", "gear"])
def test_gear_compress_triton_backend_reconstructs_like_torch(kind, method):
    x = states(b=1, h=2, t=64, d=64, seed=31)
    args = dict(bits=2, group_size=32, rank=0, outlier_ratio=0.0) if method == "kivi" else \
        dict(bits=2, group_size=32, rank=4, outlier_ratio=0.02)
    a = kv.gear_compress(x, kind, backend="triton", **args)
    b = kv.gear_compress(x, kind, backend="torch", **args)
    assert a.D.backend == "triton" and b.D.backend == "torch"
    assert_same_groups(a.D, b.D)
    assert torch.equal(a.reconstruct(), b.reconstruct())
    assert a.nbytes() == b.nbytes()
    if method == "gear":
        assert torch.equal(a.L[0], b.L[0]) and torch.equal(a.L[1], b.L[1])
        assert torch.equal(a.S.values, b.S.values) and torch.equal(a.S.index, b.S.index)


def test_kvconfig_auto_backend_is_torch_for_cpu_states(monkeypatch):
    seen = []
    real = kv.gear_compress
    monkeypatch.setattr(kv, "gear_compress", lambda *a, **k: seen.append(k["backend"]) or real(*a, **k))
    x = states(b=1, h=1, t=64, d=64)
    kv.KVConfig("kivi", group_size=32).compress(x, "key", True)
    kv.KVConfig("kivi", group_size=32, backend="triton").compress(x, "key", True)
    assert seen == ["torch", "triton"]


# ----------------------------------------------------------------------------- inside a compressed cache


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval().to(dtype)  # head_dim 16


@torch.no_grad()
def run_cache(model, backend, dtype):
    """Prefill 45 tokens (one block of 32 compressed, 13 buffered), then 3 single-token steps; the third fills the
    16-token buffer, so a second (decode) block is compressed. -> (logits of every step, the cache)."""
    ids = torch.randint(0, 128, (2, 48), generator=gen(7))
    cache = kvcache.make_cache(model, kv.KVConfig("kivi", bits=2, group_size=16, residual_length=16, backend=backend))
    logits = [model(ids[:, :45], past_key_values=cache, use_cache=True).logits]
    for s in range(45, 48):
        logits.append(model(ids[:, s : s + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_compressed_cache_with_triton_matches_torch(dtype):
    model = tiny_llama(dtype)
    (lt, ct), (lp, cp) = run_cache(model, "triton", dtype), run_cache(model, "torch", dtype)
    for cache, backend in ((ct, "triton"), (cp, "torch")):
        assert cache.get_seq_length() == 48
        for layer in cache.layers:
            assert [b.D.shape for b in layer.key_blocks] == [(2, 2, 32, 16), (2, 2, 16, 16)]
            assert all(b.D.backend == backend for b in layer.key_blocks + layer.value_blocks)
            assert layer.keys.shape[-2] == 0
    for layer_t, layer_p in zip(ct.layers, cp.layers):  # the prefill block: same states in, same codes out
        assert_same_groups(layer_t.key_blocks[0].D, layer_p.key_blocks[0].D)
        assert_same_groups(layer_t.value_blocks[0].D, layer_p.value_blocks[0].D)
    assert lt.dtype == lp.dtype == dtype and torch.isfinite(lt).all()
    assert torch.equal(lt[:, :45], lp[:, :45])  # prefill attends to its own states in full precision
    same = torch.equal(lt, lp)  # decode steps attend to the reconstructed blocks
    assert same, f"decode logits differ by up to {(lt.float() - lp.float()).abs().max().item()}"
    for layer_t, layer_p in zip(ct.layers, cp.layers):
        for bt, bp in zip(layer_t.key_blocks + layer_t.value_blocks, layer_p.key_blocks + layer_p.value_blocks):
            assert_same_groups(bt.D, bp.D)
    assert kvcache.cache_nbytes(ct) == kvcache.cache_nbytes(cp)


def test_kv_perplexity_through_the_triton_cache_equals_torch(smollm):
    """The real SmolLM2-135M (30 layers, 3 KV heads, head_dim 64), one window, KIVI 2-bit, g64, residual 64."""
    model, tok = smollm
    args = dict(n_windows=1, prefix=64, scored=16, progress=False)
    rt = kvcache.kv_perplexity(model, tok, kv.KVConfig("kivi", bits=2, backend="triton"), **args)
    rp = kvcache.kv_perplexity(model, tok, kv.KVConfig("kivi", bits=2, backend="torch"), **args)
    assert rt["ppl"] == rp["ppl"] and rt["parts"] == rp["parts"] and rt["kv_bytes"] == rp["kv_bytes"]
    assert 1 < rt["ppl"] < 1000 and rt["parts"]["codes"] == 30 * 2 * 3 * 64 * 64 * 2 // 8


# ----------------------------------------------------------------------------- bad input


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD = [
    (lambda: kv.KVConfig("kivi", backend="cuda"), ValueError,
     r"backend must be 'auto', 'torch' or 'triton', got 'cuda'"),
    (lambda: kv.quantize_groups(_x(1, 1, 32, 32), 2, 32, -1, backend="cuda"), ValueError,
     r"backend must be 'torch' or 'triton', got 'cuda'"),
    (lambda: kv.quantize_groups(_x(2, 32, 32), 2, 32, -1, backend="triton"), ValueError,
     r"the Triton KV kernel quantizes \(batch, heads, tokens, head_dim\) states"),
    (lambda: kv.quantize_groups(_x(1, 32, 32, 32), 2, 32, 1, backend="triton"), ValueError,
     r"along tokens \(dim=-2, keys\) or channels"),
    (lambda: quantize_kv(_x(1, 1, 32, 32), "key", 3, 32), ValueError,
     r"KV-cache bits must be one of \(2, 4, 8\).*got 3"),
    (lambda: quantize_kv(_x(1, 1, 32, 32), "key", 16, 32), ValueError, r"KV-cache bits must be one of"),
    (lambda: quantize_kv(_x(1, 32, 32), "key", 2, 32), ValueError,
     r"expected KV states of shape \(batch, kv_heads, tokens, head_dim\), got \(1, 32, 32\)"),
    (lambda: quantize_kv(torch.ones(1, 1, 32, 32, dtype=torch.int32), "key", 2, 32), TypeError,
     r"float16, bfloat16 or float32, got torch.int32"),
    (lambda: quantize_kv(_x(1, 1, 32, 32, dtype=torch.bfloat16), "key", 2, 32), TypeError,
     r"interpreter \(CPU\) has no bfloat16"),
    (lambda: quantize_kv(_x(1, 1, 40, 32), "key", 2, 32), ValueError,
     r"group_size=32 does not divide the tokens of the block.*\(40\)"),
    (lambda: quantize_kv(_x(1, 1, 32, 40), "value", 2, 32), ValueError,
     r"group_size=32 does not divide the head_dim \(values are grouped along channels\) \(40\)"),
    (lambda: quantize_kv(_x(1, 1, 96, 32), "key", 2, 48), ValueError, r"needs a power-of-two group_size.*got 48"),
    (lambda: quantize_kv(_x(1, 1, 8, 48), "value", 2, 12), ValueError, r"power-of-two group_size.*got 12"),
    (lambda: quantize_kv(_x(1, 1, 32, 32), "value", 2, 6), ValueError, r"group_size must be a positive multiple of 4"),
    (lambda: quantize_kv(_x(1, 1, 32, 32), "keys", 2, 32), ValueError, r"kind must be 'key'.*or 'value'"),
    (lambda: dequantize_kv(quantize_kv(_x(1, 1, 32, 32), "key", 2, 32), torch.bfloat16), TypeError,
     r"interpreter \(CPU\) has no bfloat16"),
    (lambda: dequantize_kv(kv.quantize_groups(_x(1, 32, 2, 32), 2, 32, 1)), ValueError,
     r"dequantize_kv takes keys or values"),
    (lambda: dequantize_kv(kv.quantize_groups(_x(32, 32), 2, 32, 1)), ValueError,
     r"dequantize_kv takes keys or values"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_rejected_with_a_clear_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """interpreting() reads TRITON_INTERPRET at call time: with it off, CPU tensors are refused before any launch."""
    q = quantize_kv(_x(1, 1, 32, 32), "value", 2, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.interpreting()
    with pytest.raises(RuntimeError, match=r"quantize_kv: got CPU tensors.*TRITON_INTERPRET"):
        quantize_kv(_x(1, 1, 32, 32), "value", 2, 32)
    with pytest.raises(RuntimeError, match=r"dequantize_kv: got CPU tensors.*TRITON_INTERPRET"):
        dequantize_kv(q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.interpreting() and dequantize_kv(q).shape == (1, 1, 32, 32)


def test_dequantize_kv_refuses_non_contiguous_parts():
    q = quantize_kv(_x(1, 1, 32, 64), "value", 2, 32)  # scale (1, 1, 32, 2, 1)
    scale = q.scale.transpose(2, 3).contiguous().transpose(2, 3)  # same values, another memory order
    assert torch.equal(scale, q.scale) and not scale.is_contiguous()
    with pytest.raises(ValueError, match=r"QuantizedGroups.scale must be contiguous"):
        dequantize_kv(dataclasses.replace(q, scale=scale))


# ----------------------------------------------------------------------------- on a GPU (compiled Triton)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_compiled_kernels_are_bit_exact_on_a_gpu(kind, dtype):
    """Compiled, the kernel must still match torch bit for bit (division, rounding and fp16 casts included)."""
    assert not kernels.interpreting()
    x = states(b=2, h=8, t=256, d=128, seed=41).to("cuda", dtype)
    for bits in (2, 4, 8):
        for group in (32, 64, 128):
            q = quantize_kv(x, kind, bits, group)
            assert_same_groups(q, kv.quantize_groups(x, bits, group, DIM[kind]))
            assert torch.equal(dequantize_kv(q), torch_copy(q).dequantize(torch.float32))
