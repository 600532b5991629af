"""compresslab.scale_tuning: after GPTQ, tune the fp16 group scales and norm weights by KD, integer codes fixed.

Small random Llamas (vocab 256, hidden 64, group 16); the teacher is the float model, the student its GPTQ copy.
"""

import copy

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from compresslab import checkpoint, distill, gptq
from compresslab.scale_tuning import TunableQuantLinear, tune_scales

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def ids(n, seed):
    return torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher():
    return tiny_model()


def quantized(teacher, bits=3, **kw):
    return gptq.quantize_model(teacher, ids(8, 0), bits=bits, group_size=16, progress=False, **kw)


@torch.no_grad()
def kl_to_teacher(student, teacher, x):
    return distill.kd_loss(student(x).logits, teacher(x).logits, T=1.0, alpha=0.0).item()


@pytest.fixture(scope="module")
def tuned(teacher):
    qm, report = quantized(teacher, bits=2)  # a random model's outputs are flat: 2 bits leave something to recover
    before_model, before_report = copy.deepcopy(qm), copy.deepcopy(report)
    hist = tune_scales(qm, report, teacher, ids(64, 1), steps=30, lr=1e-2, batch_size=4, progress=False)
    return qm, report, before_model, before_report, hist


@pytest.mark.parametrize("opts", [dict(act_order=True), dict(act_order=False), dict(act_order=True, static_groups=True)])
def test_tunable_linear_reproduces_the_gptq_weights_before_training(teacher, opts):
    qm, report = quantized(teacher, bits=4, **opts)
    name = "model.layers.1.mlp.down_proj"
    lin = qm.get_submodule(name)
    tq = TunableQuantLinear(lin, report[name])
    assert torch.equal(tq.weight(), lin.weight)  # (codes - zeros[g_idx]) * scales[g_idx], exactly GPTQ's weights
    x = torch.randn(3, 5, lin.in_features)
    assert torch.allclose(tq(x), lin(x), atol=1e-6)
    assert [n for n, p in tq.named_parameters()] == ["gain"]  # only the scale gains train


def test_tuning_brings_the_quantized_model_closer_to_the_teacher_on_held_out_text(teacher, tuned):
    qm, _, before_model, _, hist = tuned
    held_out = ids(16, 7)
    kl_before, kl_after = kl_to_teacher(before_model, teacher, held_out), kl_to_teacher(qm, teacher, held_out)
    assert kl_after < 0.85 * kl_before  # measured: 0.75x, (kl_before, kl_after)
    assert len(hist["loss"]) == 30


def test_integer_codes_zeros_and_g_idx_never_change_and_scales_are_fp16(tuned):
    qm, report, _, before_report, _ = tuned
    moved = 0
    for name, res in report.items():
        old = before_report[name]
        assert torch.equal(res.codes, old.codes) and torch.equal(res.zeros, old.zeros)
        assert torch.equal(res.g_idx, old.g_idx)
        assert torch.equal(res.scales, res.scales.half().float())  # what the checkpoint stores, exactly
        moved += int(not torch.equal(res.scales, old.scales))
        w = (res.codes.float() - res.zeros[:, res.g_idx]) * res.scales[:, res.g_idx]
        assert torch.equal(qm.get_submodule(name).weight, w)  # the model runs exactly the reported weights
        assert torch.equal(res.dequantized, w)
    assert moved == len(report)


def test_the_model_is_plain_again_with_its_norms_tuned_and_the_rest_untouched(tuned):
    qm, report, before_model, _, _ = tuned
    assert not any(isinstance(m, TunableQuantLinear) for m in qm.modules())
    assert all(isinstance(qm.get_submodule(n), nn.Linear) for n in report)
    old = dict(before_model.named_parameters())
    for n, p in qm.named_parameters():
        assert p.requires_grad == old[n].requires_grad  # restored
        if n.endswith("norm.weight"):
            assert not torch.equal(p, old[n]), n
        elif n.rsplit(".", 1)[0] not in report:  # embeddings (tied lm_head) stay as they were
            assert torch.equal(p, old[n]), n
    assert not qm.training


def test_the_teacher_is_not_modified(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    qm, report = quantized(teacher)
    tune_scales(qm, report, teacher, ids(16, 1), steps=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_norms_false_trains_the_scales_only(teacher):
    qm, report = quantized(teacher)
    norms = {n: p.clone() for n, p in qm.named_parameters() if n.endswith("norm.weight")}
    tune_scales(qm, report, teacher, ids(16, 1), steps=3, lr=5e-3, norms=False, progress=False)
    assert all(torch.equal(p, norms[n]) for n, p in qm.named_parameters() if n in norms)


def test_two_runs_with_the_same_seed_give_the_same_scales(teacher):
    runs = []
    for _ in range(2):
        qm, report = quantized(teacher)
        tune_scales(qm, report, teacher, ids(16, 1), steps=3, lr=5e-3, progress=False)
        runs.append(torch.cat([r.scales.flatten() for r in report.values()]))
    assert torch.equal(*runs)


def test_the_tuned_checkpoint_reloads_to_the_tuned_model(teacher, tmp_path):
    qm, report = quantized(teacher, bits=4)
    tune_scales(qm, report, teacher, ids(16, 1), steps=3, lr=5e-3, progress=False)
    path = checkpoint.save_gptq(qm, report, tmp_path / "ckpt", bits=4, group_size=16, sym=False, act_order=True)
    reloaded, _ = checkpoint.load_gptq(path)
    for n, p in qm.state_dict().items():
        assert torch.equal(reloaded.state_dict()[n], p), n  # tuned scales and norms, as the model runs them


def test_bad_input_is_refused_with_the_fix(teacher):
    qm, report = quantized(teacher)
    x = ids(4, 1)
    with pytest.raises(ValueError, match="GPTQResult"):
        tune_scales(qm, {}, teacher, x, steps=1, progress=False)
    with pytest.raises(ValueError, match="full-precision"):
        tune_scales(qm, report, qm, x, steps=1, progress=False)
    other, other_report = quantized(tiny_model(seed=1))
    with pytest.raises(ValueError, match="does not describe"):
        tune_scales(qm, other_report, teacher, x, steps=1, progress=False)
    assert all(isinstance(qm.get_submodule(n), nn.Linear) for n in report)  # a refused call changes nothing
    name = "model.layers.0.self_attn.q_proj"
    wrong = copy.deepcopy(report[name])
    wrong.codes = wrong.codes[:, :32]
    with pytest.raises(ValueError, match="do not match"):
        TunableQuantLinear(qm.get_submodule(name), wrong)


def test_a_model_from_cl_quantize_is_tuned_in_its_quantlinears(teacher):
    """Issue 28: scale tuning takes the model. After cl.quantize the state is in QuantLinear modules; tuning them
    gives exactly the scales the (model, report) path gives from the same GPTQ, leaves codes, zeros and g_idx alone,
    and leaves QuantLinear modules behind (so save_pretrained writes the tuned checkpoint)."""
    import compresslab as cl
    from compresslab.quant import QuantLinear

    x = ids(16, 1)
    qm, report = quantized(teacher, bits=2)
    tune_scales(qm, report, teacher, x, steps=4, lr=1e-2, progress=False)
    model = cl.quantize(copy.deepcopy(teacher), cl.GPTQConfig(bits=2, group_size=16), calibration=ids(8, 0),
                        progress=False)
    before = {n: (m.qweight.clone(), m.zeros.clone(), m.scales.clone(), getattr(m, "g_idx", None))
              for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(before) == set(report)
    tune_scales(model, teacher=teacher, ids=x, steps=4, lr=1e-2, progress=False)
    for name, (qweight, zeros, scales, g_idx) in before.items():
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear) and torch.equal(m.qweight, qweight) and torch.equal(m.zeros, zeros)
        assert g_idx is None or torch.equal(m.g_idx, g_idx)
        assert not torch.equal(m.scales, scales)  # tuned
        assert torch.equal(m.scales.float(), report[name].scales.float()), name  # the report path's scales
    with pytest.raises(ValueError, match="holds no QuantLinear"):
        tune_scales(copy.deepcopy(teacher), teacher=teacher, ids=x, steps=1, progress=False)
    with pytest.raises(ValueError, match="needs teacher="):
        tune_scales(model, ids=x)
