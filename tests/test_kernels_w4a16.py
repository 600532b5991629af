"""The W4A16 kernels (compresslab.kernels.w4a16): fused GPTQ 4-bit dequantize + matmul against the PyTorch reference.

w4a16_matmul (GEMV for decode, GEMM for prefill) is checked against w4a16_matmul_ref over a grid of shapes (odd row
counts, N not a multiple of the tiles, groups smaller than a K tile, a masked K tail), launch configs and both group
layouts (contiguous groups, act-order g_idx); the packing against GPTQ's own results; QuantLinear inside a tiny random
Llama, quantized with GPTQ, written by lab 02's exporter and read back both by load_quantized (the kernel) and by
checkpoint.load_gptq (an independent float reader). Without a GPU the kernels run in Triton's interpreter (slow), so
shapes stay small; the autotuned path on real sizes runs only on a GPU.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compresslab import checkpoint, gptq, kernels, packing
from compresslab.kernels import w4a16 as W
from layer_testing import gen, hessian_of, make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")


def GEMV(bn, bk, sk):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}


def GEMM(bm, bn, bk, gm):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}


def random_packed(n, k, group_size, act_order=False, seed=0):
    """Random codes, zero points (0..15, so the v1 wrap of zero 0 is exercised) and fp16-exact scales, packed.
    act_order: g_idx of a random column order (non-monotone, every group still group_size columns)."""
    g = gen(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (n, k // group_size), generator=g)
    scales = (0.5 + torch.rand(n, k // group_size, generator=g)) * 0.01
    g_idx = (torch.randperm(k, generator=g) if act_order else torch.arange(k)) // group_size
    return W.pack_gptq(codes, zeros, scales, g_idx)


def assert_close_to(y, ref, rel=2e-3):
    """fp16 outputs: atol relative to the output's magnitude (fp32 accumulation, fp16 rounding of weights and y)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref.float(), atol=rel * ref.float().abs().max().item(), rtol=rel)


def x_of(*shape, seed=1, dtype=torch.float16):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


# ----------------------------------------------------------------------------- the kernel against the reference

# (M, N, K, group_size, path, config): config None is the interpreter's default launch
CASES = [
    (1, 40, 128, 32, "gemv", None),  # default GEMV: split-K 2, fp32 atomic partial sums
    (3, 72, 256, 64, "gemv", GEMV(32, 16, 1)),  # BLOCK_K 16 < group: broadcast qparams; split 1 stores fp16 directly
    (5, 96, 256, 128, "gemv", GEMV(64, 64, 3)),  # split 3 over 4 K tiles: uneven slices
    (8, 40, 64, 16, "gemv", GEMV(32, 32, 1)),  # group 16 < BLOCK_K 32: tiles straddle groups (per-row gather)
    (1, 72, 96, 32, "gemv", GEMV(32, 64, 1)),  # K = 96: a masked K tail, and straddling groups
    (1, 96, 256, 32, "gemv", GEMV(32, 32, 8)),  # split 8: one K tile per slice
    (8, 40, 128, 32, "auto", None),  # auto: 8 rows still GEMV
    (9, 72, 128, 32, "auto", None),  # auto: 9 rows -> GEMM, default config (GROUP_M 2)
    (17, 40, 256, 64, "gemm", GEMM(32, 32, 32, 1)),
    (24, 96, 128, 16, "gemm", GEMM(16, 32, 32, 2)),  # group 16 < BLOCK_K 32; 2 row tiles walked in a group of 2
    (17, 72, 256, 128, "gemm", GEMM(16, 64, 64, 2)),  # 2 x 2 tiles, both partial
    (3, 40, 128, 32, "gemm", None),  # fewer rows than BLOCK_M
    (17, 40, 96, 32, "gemm", GEMM(16, 32, 64, 1)),  # masked K tail in the GEMM
]


@pytest.mark.parametrize("act_order", [False, True], ids=["groups", "g_idx"])
@pytest.mark.parametrize("m,n,k,gs,path,config", CASES, ids=[f"{c[4]}-m{c[0]}n{c[1]}k{c[2]}g{c[3]}-{i}"
                                                              for i, c in enumerate(CASES)])
def test_matmul_matches_the_reference(m, n, k, gs, path, config, act_order):
    qweight, qzeros, scales, g_idx = random_packed(n, k, gs, act_order, seed=m + n + k)
    x = x_of(m, k, seed=m)
    g = g_idx if act_order else None
    y = W.w4a16_matmul(x, qweight, qzeros, scales, g, gs, path=path, config=config)
    ref = W.w4a16_matmul_ref(x, qweight, qzeros, scales, g_idx, gs)  # g_idx is trivial for contiguous groups
    assert_close_to(y, ref)


class Spy:
    """Stands in for a @triton.jit kernel: records launches (grid), then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_auto_path_and_grids(monkeypatch):
    gemv, gemm = Spy(W._gemv_kernel), Spy(W._gemm_kernel)
    monkeypatch.setattr(W, "_gemv_kernel", gemv)
    monkeypatch.setattr(W, "_gemm_kernel", gemm)
    qweight, qzeros, scales, _ = random_packed(72, 128, 32)
    for m in (1, 8, 9, 17):
        W.w4a16_matmul(x_of(m, 128), qweight, qzeros, scales, None, 32)
    W.w4a16_matmul(x_of(2, 4, 128), qweight, qzeros, scales, None, 32, config=GEMV(64, 32, 3))  # 8 rows
    W.w4a16_matmul(x_of(8, 128), qweight, qzeros, scales, None, 32, path="gemm", config=GEMM(16, 32, 32, 1))
    assert gemv.grids == [(3, 2), (3, 2), (2, 3)]  # cdiv(72, BLOCK_N) x SPLIT_K
    assert gemm.grids == [(3,), (2 * 3,), (3,)]  # cdiv(M, BLOCK_M) * cdiv(72, BLOCK_N)


def test_leading_dims_and_strided_activations():
    qweight, qzeros, scales, g_idx = random_packed(40, 128, 32, act_order=True, seed=3)
    for shape in ((2, 3, 128), (2, 9, 128)):  # 6 rows (GEMV) and 18 rows (GEMM)
        x = x_of(*shape)
        y = W.w4a16_matmul(x, qweight, qzeros, scales, g_idx)
        assert y.shape == (*shape[:-1], 40)
        assert_close_to(y, W.w4a16_matmul_ref(x, qweight, qzeros, scales, g_idx))
        assert_close_to(y.reshape(-1, 40), W.w4a16_matmul(x.reshape(-1, 128), qweight, qzeros, scales, g_idx))
    wide = x_of(5, 256)
    x = wide[:, ::2]  # features with stride 2
    assert x.stride(-1) == 2
    assert torch.equal(W.w4a16_matmul(x, qweight, qzeros, scales, g_idx),
                       W.w4a16_matmul(x.contiguous(), qweight, qzeros, scales, g_idx))


def test_zero_rows_give_an_empty_result():
    qweight, qzeros, scales, _ = random_packed(40, 128, 32)
    for shape in ((0, 128), (2, 0, 128)):
        y = W.w4a16_matmul(x_of(*shape), qweight, qzeros, scales, None, 32)
        assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float16


@pytest.mark.parametrize("m", [5, 17])
def test_bias(m):
    qweight, qzeros, scales, _ = random_packed(72, 128, 32, seed=4)
    bias = torch.randn(72, generator=gen(5)).half()
    x = x_of(m, 128)
    y = W.w4a16_matmul(x, qweight, qzeros, scales, None, 32, bias=bias)
    assert_close_to(y, W.w4a16_matmul_ref(x, qweight, qzeros, scales, None, 32, bias=bias))
    no_bias = W.w4a16_matmul(x, qweight, qzeros, scales, None, 32)
    assert_close_to(y - no_bias, bias.expand(m, 72), rel=1e-2)


@pytest.mark.parametrize("m", [3, 17])
def test_v2_checkpoint_zero_offset(m):
    """v2 stores the zero points as they are (zero_offset=0); v1 stores zero - 1 (zero_offset=1, the default)."""
    n, k, gs = 40, 128, 32
    g = gen(6)
    codes = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (n, k // gs), generator=g)
    zeros[0, 0], zeros[1, 0] = 0, 15  # the ends: a v1 reader of v2 data (or the reverse) shifts these
    scales = (0.5 + torch.rand(n, k // gs, generator=g)) * 0.01
    qweight, qzeros_v1, scales_h, g_idx = W.pack_gptq(codes, zeros, scales, torch.arange(k) // gs)
    qzeros_v2 = packing.pack(zeros.t(), 4, dim=1, word=torch.int32)  # true zeros, 8 per word along N: (G, N/8)
    assert qzeros_v2.shape == qzeros_v1.shape and not torch.equal(qzeros_v2, qzeros_v1)

    w1 = W.dequantize_gptq(qweight, qzeros_v1, scales_h, None, gs)
    w2 = W.dequantize_gptq(qweight, qzeros_v2, scales_h, None, gs, zero_offset=0)
    assert torch.equal(w1, w2)
    assert torch.equal(w1, ((codes - zeros.repeat_interleave(gs, 1)) * scales_h.t().float().repeat_interleave(gs, 1)))
    assert not torch.equal(w2, W.dequantize_gptq(qweight, qzeros_v2, scales_h, None, gs))  # read as v1: wrong

    x = x_of(m, k)
    y2 = W.w4a16_matmul(x, qweight, qzeros_v2, scales_h, None, gs, zero_offset=0)
    assert_close_to(y2, W.w4a16_matmul_ref(x, qweight, qzeros_v2, scales_h, None, gs, zero_offset=0))
    assert torch.equal(y2, W.w4a16_matmul(x, qweight, qzeros_v1, scales_h, None, gs))
    ql = W.QuantLinear.from_packed(qweight, qzeros_v2, scales_h, None, zero_offset=0)
    assert torch.equal(ql.dequantized_weight(), w1) and torch.equal(ql(x), y2)


# ----------------------------------------------------------------------------- packing, GPTQ and round-to-nearest


@pytest.fixture(scope="module")
def act_order_result():
    """GPTQ with act-order and dynamic groups on a 72 x 256 weight, inputs with uneven column scales."""
    X = make_inputs(512, 256, seed=2)
    Wt = torch.randn(72, 256, generator=gen(3)) * 0.05
    res = gptq.gptq_quantize_weight(Wt, hessian_of(X), bits=4, group_size=64, act_order=True)
    return Wt, res


def test_pack_gptq_of_an_act_order_result(act_order_result):
    _, res = act_order_result
    assert not torch.equal(res.g_idx, torch.arange(256) // 64)  # really non-monotone
    assert torch.equal(torch.bincount(res.g_idx), torch.full((4,), 64))
    qweight, qzeros, scales, g_idx = W.pack_gptq(res.codes, res.zeros, res.scales, res.g_idx)
    assert (qweight.shape, qzeros.shape, scales.shape, g_idx.shape) == ((32, 72), (4, 9), (4, 72), (256,))
    assert (qweight.dtype, qzeros.dtype, scales.dtype, g_idx.dtype) == (torch.int32,) * 2 + (torch.float16, torch.int32)
    w = W.dequantize_gptq(qweight, qzeros, scales, g_idx)
    torch.testing.assert_close(w, res.dequantized, rtol=2**-11, atol=0)  # scales are stored in fp16
    # the exporter writes the same tensors
    assert torch.equal(qweight, packing.pack(res.codes.t(), 4, dim=0, word=torch.int32))
    assert torch.equal(checkpoint.read_gptq_layer({"l.qweight": qweight, "l.qzeros": qzeros, "l.scales": scales,
                                                   "l.g_idx": g_idx}, "l", 4), w)


def test_pack_gptq_stays_on_the_input_device():
    """QuantLinear.from_linear / from_gptq and quantize_model pack the tensors where they are (CUDA for a model on
    the GPU); packing must not assume CPU. The meta device stands in for CUDA on a machine without one."""
    g = gen(8)
    codes, zeros = torch.randint(0, 16, (16, 64), generator=g), torch.randint(0, 16, (16, 2), generator=g)
    scales, g_idx = torch.rand(16, 2, generator=g), torch.arange(64) // 32
    packed = W.pack_gptq(*(t.to("meta") for t in (codes, zeros, scales, g_idx)))
    assert [t.device.type for t in packed] == ["meta"] * 4
    assert [t.shape for t in packed] == [t.shape for t in W.pack_gptq(codes, zeros, scales, g_idx)]


@pytest.mark.parametrize("m,path", [(1, "gemv"), (17, "gemm")])
def test_matmul_with_a_gptq_act_order_g_idx(act_order_result, m, path):
    _, res = act_order_result
    qweight, qzeros, scales, g_idx = W.pack_gptq(res.codes, res.zeros, res.scales, res.g_idx)
    x = x_of(m, 256, seed=m)
    y = W.w4a16_matmul(x, qweight, qzeros, scales, g_idx, path=path)
    ref = W.w4a16_matmul_ref(x, qweight, qzeros, scales, g_idx)
    assert_close_to(y, ref)
    assert_close_to(y, (x.float() @ res.dequantized.t()).half())
    # contiguous groups on the same tensors are a different (wrong) weight: the kernel does use g_idx
    wrong = W.w4a16_matmul(x, qweight, qzeros, scales, None, 64, path=path)
    assert (wrong.float() - ref.float()).abs().max() > 0.05 * ref.float().abs().max()


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_rtn_round_trip_is_within_half_a_step(gs):
    g = gen(gs)
    w = torch.randn(72, 256, generator=g) * torch.rand(72, 1, generator=g) * 0.1
    w[0, :gs] = torch.linspace(0.01, 0.5, gs)  # a group of positive values: the range is forced through 0
    qweight, qzeros, scales, g_idx = W.rtn_gptq(w, gs)
    assert torch.equal(g_idx, torch.arange(256, dtype=torch.int32) // gs)
    deq = W.dequantize_gptq(qweight, qzeros, scales, g_idx)
    step = scales.float()[g_idx.long()].t()  # (N, K): the scale of each weight's group
    # half a step, plus what the fp16 rounding of the scale can add over the 15 steps of the grid
    ratio = (deq - w).abs() / step
    assert ratio.max() <= 0.5 + 16 * 2**-12, ratio.max()
    assert ratio.max() > 0.4  # the bound is tight, not vacuous
    assert torch.equal(deq, W.dequantize_gptq(qweight, qzeros, scales, None, gs))


# ----------------------------------------------------------------------------- QuantLinear


def test_quantlinear_from_linear_forward():
    torch.manual_seed(0)
    linear = nn.Linear(128, 72, bias=True).half()
    layer = W.QuantLinear.from_linear(linear, group_size=32)
    assert (layer.in_features, layer.out_features, layer.group_size, layer.act_order) == (128, 72, 32, False)
    assert layer.bias is not None and torch.equal(layer.bias, linear.bias)
    weight = layer.dequantized_weight()
    assert weight.shape == (72, 128) and (weight - linear.weight.float()).abs().max() < 0.6 * layer.scales.max()
    for shape in ((3, 128), (2, 9, 128)):
        x = x_of(*shape)
        y = layer(x)
        assert_close_to(y, F.linear(x, weight.half(), linear.bias))
    k, n, g = 128, 72, 4
    assert layer.nbytes() == k * n // 2 + g * n // 8 * 4 + g * n * 2 + 4 * k
    assert layer.nbytes() < k * n * 2 / 3  # at least 3x smaller than the fp16 weight, even this small


def test_quantlinear_from_gptq_keeps_act_order(act_order_result):
    _, res = act_order_result
    linear = nn.Linear(256, 72, bias=True).half()
    layer = W.QuantLinear.from_gptq(linear, res)
    assert layer.act_order and "act_order=True" in repr(layer)
    torch.testing.assert_close(layer.dequantized_weight(), res.dequantized, rtol=2**-11, atol=0)
    for m in (1, 17):
        x = x_of(m, 256)
        assert_close_to(layer(x), F.linear(x, layer.dequantized_weight().half(), linear.bias))


def test_quantlinear_static_groups_are_not_act_order():
    X = make_inputs(512, 128, seed=4)
    res = gptq.gptq_quantize_weight(torch.randn(40, 128, generator=gen(5)) * 0.05, hessian_of(X), bits=4,
                                    group_size=32, act_order=True, static_groups=True)
    assert res.perm is not None and torch.equal(res.g_idx, torch.arange(128) // 32)
    layer = W.QuantLinear.from_gptq(nn.Linear(128, 40).half(), res)
    assert not layer.act_order  # a trivial g_idx takes the contiguous-group path
    x = x_of(3, 128)
    assert_close_to(layer(x), F.linear(x, layer.dequantized_weight().half(), layer.bias))


# ----------------------------------------------------------------------------- whole models


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def quant_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, W.QuantLinear)}


@pytest.fixture(scope="module")
def gptq_export(tmp_path_factory):
    """GPTQ 4-bit g32 act-order of the tiny Llama on random ids, written by lab 02's exporter."""
    model = tiny_llama()
    calib = torch.randint(0, 128, (8, 32), generator=gen(0))  # 256 tokens >= hidden_size
    qmodel, report = gptq.quantize_model(model, calib, bits=4, group_size=32, progress=False)
    path = checkpoint.save_gptq(qmodel, report, tmp_path_factory.mktemp("w4a16") / "ckpt", bits=4, group_size=32,
                                sym=False, act_order=True)
    return model, report, path


@torch.no_grad()
def test_load_quantized_runs_the_kernel_like_the_float_reader(gptq_export):
    _, report, path = gptq_export
    qmodel, tok = W.load_quantized(path, dtype=torch.float16, device="cpu")
    fmodel, _ = checkpoint.load_gptq(path)
    fmodel = fmodel.half()
    assert tok is None  # no tokenizer was exported
    layers = quant_linears(qmodel)
    assert len(layers) == 14 and set(layers) == set(report)
    for li, layer in enumerate(qmodel.model.layers):
        assert sum(isinstance(m, W.QuantLinear) for m in layer.modules()) == 7
        assert not any(isinstance(m, nn.Linear) for m in layer.modules())
    assert all(m.act_order and m.group_size == 32 for m in layers.values())
    for name, m in layers.items():  # the kernel's weights are the float reader's
        torch.testing.assert_close(m.dequantized_weight(), fmodel.get_submodule(name).weight.float(), rtol=1e-3,
                                   atol=1e-4)

    ids = torch.randint(0, 128, (2, 12), generator=gen(1))
    a, b = qmodel(ids).logits, fmodel(ids).logits
    assert a.dtype == b.dtype == torch.float16
    torch.testing.assert_close(a.float(), b.float(), atol=1e-2 * b.float().abs().max().item(), rtol=0)
    ga = qmodel.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    gb = fmodel.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ga.shape == (1, 20) and torch.equal(ga, gb)


def test_quantize_model_with_the_gptq_report_equals_the_checkpoint(gptq_export):
    model, report, path = gptq_export
    qmodel = W.quantize_model(copy.deepcopy(model).half(), report=report)
    loaded, _ = W.load_quantized(path, dtype=torch.float16, device="cpu")
    mine, theirs = quant_linears(qmodel), quant_linears(loaded)
    assert set(mine) == set(theirs) and len(mine) == 14
    for name in mine:
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(mine[name], buf), getattr(theirs[name], buf)), (name, buf)
    with pytest.raises(KeyError, match=r"model.layers.1.mlp.down_proj has no GPTQ result"):
        W.quantize_model(copy.deepcopy(model).half(), report={k: v for k, v in report.items() if "1.mlp.down" not in k})


def test_the_kernel_path_takes_a_model_from_cl_quantize(gptq_export):
    """Issue 28: the kernel path takes the model. After cl.quantize the codes live in the model's storage modules;
    quantize_model packs exactly those (the same buffers as from lab 02's report), and refuses non-4-bit storage."""
    import compresslab as cl

    model, report, _ = gptq_export
    calib = torch.randint(0, 128, (8, 32), generator=gen(0))  # the fixture's calibration
    stored = cl.quantize(copy.deepcopy(model), cl.GPTQConfig(bits=4, group_size=32), calibration=calib, progress=False)
    mine = quant_linears(W.quantize_model(stored.half()))
    theirs = quant_linears(W.quantize_model(copy.deepcopy(model).half(), report=report))
    assert set(mine) == set(theirs) and len(mine) == 14
    for name in mine:
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(mine[name], buf), getattr(theirs[name], buf)), (name, buf)
    eight = cl.quantize(copy.deepcopy(model), cl.RTNConfig(bits=8, group_size=32))
    with pytest.raises(ValueError, match="runs 4-bit weights; this layer stores 8-bit"):
        W.quantize_model(eight)


@torch.no_grad()
def test_quantize_model_in_memory(gptq_export):
    model = copy.deepcopy(gptq_export[0]).half()
    reference = copy.deepcopy(model)
    qmodel = W.quantize_model(model, group_size=32)
    assert qmodel is model
    layers = quant_linears(qmodel)
    assert len(layers) == 14 and not any(isinstance(m, nn.Linear) for m in qmodel.model.layers.modules())
    assert isinstance(qmodel.lm_head, nn.Linear)  # the head is not a decoder Linear
    assert not any(m.act_order for m in layers.values())
    dequantized = copy.deepcopy(reference)  # the same model with the RTN weights in fp16: what the kernel computes
    for name, m in layers.items():
        dequantized.get_submodule(name).weight.data = m.dequantized_weight().half()
    ids = torch.randint(0, 128, (2, 12), generator=gen(2))
    y, y_deq, y_float = qmodel(ids).logits.float(), dequantized(ids).logits.float(), reference(ids).logits.float()
    scale = y_float.abs().max().item()
    torch.testing.assert_close(y, y_deq, atol=5e-3 * scale, rtol=0)
    assert 0 < (y - y_float).abs().max() < 0.3 * scale  # 4-bit RTN of random weights: close, not equal
    with pytest.raises(ValueError, match=r"no decoder Linear layers"):
        W.quantize_model(qmodel)


def test_real_smollm2_shape():
    """SmolLM2-135M's down_proj (in 1536, out 576) at g64 with an act-order g_idx, one decode row."""
    qweight, qzeros, scales, g_idx = random_packed(576, 1536, 64, act_order=True, seed=7)
    x = x_of(1, 1536)
    y = W.w4a16_matmul(x, qweight, qzeros, scales, g_idx, config=GEMV(64, 64, 4))
    assert_close_to(y, W.w4a16_matmul_ref(x, qweight, qzeros, scales, g_idx))


# ----------------------------------------------------------------------------- bad input


def packed():
    return random_packed(40, 128, 32)


def _call(x=None, **over):
    qweight, qzeros, scales, _ = packed()
    args = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=None, group_size=32)
    args.update(over)
    return W.w4a16_matmul(x_of(3, 128) if x is None else x, **args)


QW, QZ, SC, GI = packed()
BAD = [
    (lambda: _call(x_of(3, 128, dtype=torch.float32)), TypeError,
     r"float16 or bfloat16 activations, got torch.float32"),
    (lambda: _call(x_of(3, 128, dtype=torch.bfloat16)), TypeError,
     r"interpreter \(CPU\) computes bfloat16 dots wrongly"),
    (lambda: _call(qweight=QW.long()), TypeError, r"qweight must be int32 words.*got torch.int64"),
    (lambda: _call(qweight=QW.to(torch.uint8)), TypeError, r"qweight must be int32 words.*got torch.uint8"),
    (lambda: _call(qzeros=QZ.long()), TypeError, r"qzeros must be int32 words"),
    (lambda: _call(scales=SC[:, :32].contiguous()), ValueError, r"wrongly packed: qweight \(16, 40\) means K=128, "
                                                                 r"N=40, so scales must be \(G, 40\)"),
    (lambda: _call(qzeros=QZ[:, :4].contiguous()), ValueError, r"wrongly packed.*qzeros \(G, 5\).*\(4, 4\)"),
    (lambda: _call(qzeros=QZ.t().contiguous()), ValueError, r"wrongly packed"),
    (lambda: _call(qweight=QW.flatten()), ValueError, r"must be 2-D"),
    (lambda: _call(scales=SC.to(torch.int32)), TypeError, r"scales must be floating point"),
    (lambda: _call(qweight=torch.empty(40, 16, dtype=torch.int32).t()), ValueError,
     r"qweight must be contiguous.*call \.contiguous\(\) once"),
    (lambda: _call(scales=SC.t().contiguous().t()), ValueError, r"scales must be contiguous"),
    (lambda: W.w4a16_matmul(x_of(3, 192), *random_packed(40, 192, 64)[:3], None, 128), ValueError,
     r"group_size=128 does not divide in_features=192; use one of \[32, 64\]"),
    (lambda: _call(group_size=12), ValueError, r"group_size must be a positive multiple of 8, got 12"),
    (lambda: _call(group_size=64), ValueError, r"scales has 4 groups but K=128 / group_size=64 = 2"),
    (lambda: _call(group_size=None), ValueError, r"pass group_size \(or g_idx"),
    (lambda: _call(x_of(3, 120)), ValueError, r"activations have 120 features but qweight packs K=128"),
    (lambda: _call(g_idx=GI.long()), ValueError, r"g_idx must be a contiguous int32 vector of K=128.*torch.int64"),
    (lambda: _call(g_idx=GI[:64]), ValueError, r"g_idx must be a contiguous int32 vector of K=128.*\(64,\)"),
    (lambda: _call(g_idx=torch.stack([GI, GI], 1)[:, 0]), ValueError, r"g_idx must be a contiguous"),
    (lambda: _call(x_of(9, 128), path="gemv"), ValueError, r"the GEMV kernel handles up to 8 rows, got 9.*path='gemm'"),
    (lambda: _call(path="tiled"), ValueError, r"path must be 'auto', 'gemv' or 'gemm', got 'tiled'"),
    (lambda: _call(zero_offset=2), ValueError, r"zero_offset is 1 for GPTQ v1 checkpoints"),
    (lambda: W.QuantLinear.from_packed(QW, QZ, SC, torch.full((128,), 4, dtype=torch.int32)), ValueError,
     r"g_idx holds groups outside \[0, 4\)"),
    (lambda: W.QuantLinear.from_packed(QW, QZ, SC, torch.full((128,), -1, dtype=torch.int32)), ValueError,
     r"g_idx holds groups outside"),
    (lambda: W.QuantLinear.from_linear(nn.Linear(96, 40).half(), group_size=64), ValueError,
     r"group_size=64 does not divide in_features=96; use one of \[32\]"),
    (lambda: W.pack_gptq(torch.zeros(36, 64), torch.zeros(36, 2), torch.ones(36, 2), torch.arange(64) // 32),
     ValueError, r"in_features \(64\) and out_features \(36\) must be multiples of 8"),
    (lambda: W.quantize_model(nn.Sequential(nn.Linear(8, 8))), ValueError, r"no decoder Linear layers"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_rejected_with_a_clear_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """interpreting() reads TRITON_INTERPRET at call time: with it off, CPU tensors are refused before any launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.interpreting()
    with pytest.raises(RuntimeError, match=r"w4a16_matmul: got CPU tensors.*TRITON_INTERPRET is not set"):
        _call()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _call().shape == (3, 40)


def test_load_quantized_rejects_what_it_cannot_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a model export \(needs config.json and model.safetensors\)"):
        W.load_quantized(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    for qcfg, got in (({"quant_method": "gptq", "bits": 8}, r"quant_method='gptq', bits=8"),
                      ({"quant_method": "awq", "bits": 4}, r"quant_method='awq', bits=4"),
                      (None, r"quant_method=None, bits=None")):
        config = {"model_type": "llama"} | ({"quantization_config": qcfg} if qcfg else {})
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"needs a 4-bit GPTQ checkpoint, got " + got):
            W.load_quantized(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only used without a GPU")
def test_kernels_work_when_triton_was_imported_first():
    """compresslab.kernels sets TRITON_INTERPRET=1 on a machine without CUDA, but Triton reads it when a function is
    decorated: if triton.language was imported before (transformers' model classes import it through torch), its
    own @jit helpers (tl.zeros, tl.cdiv, tl.sum, ...) stay compiled-only. Outside pytest (whose conftest sets the
    variable first) that import order must either work or fail with an error that says what to do."""
    code = ("import torch\n"
            "from transformers import LlamaForCausalLM  # imports triton.language before compresslab.kernels\n"
            "from compresslab.kernels import w4a16\n"
            "qw, qz, s, g = w4a16.rtn_gptq(torch.randn(8, 32), 32)\n"
            "print(w4a16.w4a16_matmul(torch.randn(1, 32).half(), qw, qz, s, None, 32).shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parent)
    if r.returncode == 0:
        assert "torch.Size([1, 8])" in r.stdout
    else:
        error = r.stderr.strip().splitlines()[-1]
        assert "TRITON_INTERPRET" in error, f"an unhelpful error for this import order: {error}"


# ----------------------------------------------------------------------------- on a GPU (compiled, autotuned)


@cuda
@pytest.mark.parametrize("act_order", [False, True], ids=["groups", "g_idx"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 32])
def test_autotuned_on_a_gpu(m, dtype, act_order):
    assert not kernels.interpreting()
    qweight, qzeros, scales, g_idx = (t.cuda() for t in random_packed(4096, 4096, 128, act_order, seed=m))
    x = x_of(m, 4096, seed=m).to("cuda", dtype)
    g = g_idx if act_order else None
    y = W.w4a16_matmul(x, qweight, qzeros, scales, g, 128)
    ref = W.w4a16_matmul_ref(x, qweight, qzeros, scales, g_idx, 128)
    assert_close_to(y, ref, rel=2e-3 if dtype == torch.float16 else 1e-2)
    assert torch.equal(W.w4a16_matmul(x, qweight, qzeros, scales, g, 128), y)  # tuned once: same config again


@cuda
def test_quantlinear_on_a_gpu():
    """from_linear on a CUDA Linear (packing on the GPU), forward, and mixed devices refused."""
    linear = nn.Linear(512, 256, bias=True).half().cuda()
    layer = W.QuantLinear.from_linear(linear, group_size=128)
    assert layer.qweight.is_cuda and layer.scales.is_cuda
    x = x_of(4, 512).cuda()
    assert_close_to(layer(x), F.linear(x, layer.dequantized_weight().half(), linear.bias))
    with pytest.raises(ValueError, match=r"all tensors must be on one device"):
        W.w4a16_matmul(x, layer.qweight.cpu(), layer.qzeros, layer.scales, None, 128)
