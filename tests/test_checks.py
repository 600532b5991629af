"""The lab 01 checkers: the solution passes, a skipped exercise is "not done", and plausible wrong answers fail.

Every wrong implementation below is a mistake a participant can make; each is verified to be really wrong
(the checker must reject it) and each correct alternative to be really right (the checker must accept it).
No model is loaded: the checkers only run small fixed tensors.
"""

from pathlib import Path

import json
import pytest
import torch
from checker_testing import (CheckerSuite, assert_failed, summary_lines)

from compresslab import checks, quant

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "01_quantization_fundamentals.py"

QPARAMS = "Exercise 1 · compute_qparams"
QUANT_DEQUANT = "Exercise 2 · quantize_dequantize"
GROUPS = "Exercise 3 · fake_quantize_groups"
PACK = "Exercise 4 · pack_int4"

pytestmark = pytest.mark.usefixtures("fresh_status")  # every test starts and ends with an empty exercise table


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/01_quantization_fundamentals.py (### BEGIN / END SOLUTION);
# test_good_copies_match_the_lab_solutions keeps them in sync.


def good_compute_qparams(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero point per row of x (n_groups, group_len) -> ((n_groups, 1), (n_groups, 1))."""
    x_lo = x.amin(dim=-1, keepdim=True).clamp(max=0)  # widen the range so that it contains 0
    x_hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    step = ((x_hi - x_lo) / (2**bits - 1)).clamp(min=1e-8)  # 2^b codes -> 2^b - 1 steps
    return step, torch.round(-x_lo / step)


def good_quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x (n_groups, group_len), scale/zero (n_groups, 1) -> x_hat, same shape as x."""
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)  # integers in [0, 2^b - 1]
    return (codes - zero) * scale


def good_fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """w (out, in) -> w_hat (out, in), asymmetric RTN in groups of group_size along in_features."""
    rows = w.reshape(-1, group_size)  # (out * in / group_size, group_size): one group per row
    s, z = good_compute_qparams(rows, bits)  # (n_groups, 1) each
    return good_quantize_dequantize(rows, s, z, bits).reshape(w.shape)


def good_pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., n) codes in [0, 15] -> (..., n // 2) uint8, low nibble first."""
    pairs = q.to(torch.uint8).reshape(*q.shape[:-1], -1, 2)  # (..., n/2, 2): neighbours side by side
    return pairs[..., 0] | (pairs[..., 1] << 4)


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_qparams: (QPARAMS, good_compute_qparams, "compute_qparams"),
    checks.check_quant_dequant: (QUANT_DEQUANT, good_quantize_dequantize, "quantize_dequantize"),
    checks.check_fake_quantize_groups: (GROUPS, good_fake_quantize_groups, "fake_quantize_groups"),
    checks.check_pack_int4: (PACK, good_pack_int4, "pack_int4"),
}


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def qp_divides_by_2_pow_bits(x, bits):  # 2^b codes but 2^b - 1 steps
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 2**bits).clamp(min=1e-8)
    return scale, torch.round(-lo / scale)


def qp_range_without_zero(x, bits):  # x.min() / x.max() only: an all-positive group gets a negative zero point
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    return scale, torch.round(-lo / scale)


def qp_reduces_over_dim0(x, bits):  # per column instead of per row
    lo, hi = x.amin(0, keepdim=True).clamp(max=0), x.amax(0, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    return scale, torch.round(-lo / scale)


def qp_without_keepdim(x, bits):  # (n_groups,) instead of (n_groups, 1): broadcasts wrongly later
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    return scale, torch.round(-lo / scale)


def qp_whole_tensor(x, bits):  # one range for every group, expanded to the right shape
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8).expand(x.shape[0], 1)
    return scale, torch.round(-lo / scale)


def qp_zero_not_rounded(x, bits):  # the zero point must be an integer code
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    return scale, -lo / scale


def qp_scale_not_clamped(x, bits):  # an all-zero group: scale 0, zero = round(0 / 0) = NaN
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, torch.round(-lo / scale)


def qp_swapped_outputs(x, bits):  # returns (zero, scale)
    scale, zero = good_compute_qparams(x, bits)
    return zero, scale


def qp_symmetric(x, bits):  # absmax scale with zero 0: not the asymmetric quantizer the exercise asks for
    scale = (x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
    return scale, torch.zeros_like(scale)


WRONG_QPARAMS = [  # (wrong function, a fragment of the failure message it must produce, or None)
    (qp_divides_by_2_pow_bits, None),
    (qp_range_without_zero, "all-positive groups"),
    (qp_reduces_over_dim0, "shape"),
    (qp_without_keepdim, "shape"),
    (qp_whole_tensor, None),
    (qp_zero_not_rounded, None),
    (qp_scale_not_clamped, "all-zero group"),
    (qp_swapped_outputs, None),
    (qp_symmetric, None),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 2


def qd_no_clamp(x, scale, zero, bits):  # codes outside [0, 2^b - 1] are kept
    codes = torch.round(x / scale) + zero
    return (codes - zero) * scale


def qd_floor(x, scale, zero, bits):  # truncation instead of round-to-nearest
    codes = torch.clamp(torch.floor(x / scale) + zero, 0, 2**bits - 1)
    return (codes - zero) * scale


def qd_subtract_zero(x, scale, zero, bits):  # x / scale - zero: the sign of the zero point flipped
    codes = torch.clamp(torch.round(x / scale - zero), 0, 2**bits - 1)
    return (codes - zero) * scale


def qd_returns_codes(x, scale, zero, bits):  # stops after quantizing
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def qd_clamp_off_by_one(x, scale, zero, bits):  # clamps to [0, 2^b]: 2^b + 1 codes
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits)
    return (codes - zero) * scale


def qd_dequant_forgets_zero(x, scale, zero, bits):  # x_hat = q * scale
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return codes * scale


def qd_signed_code_range(x, scale, zero, bits):  # clamps to the symmetric range [-2^(b-1), 2^(b-1) - 1]
    codes = torch.clamp(torch.round(x / scale) + zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (codes - zero) * scale


def qd_no_return(x, scale, zero, bits):  # forgot the return statement
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    (codes - zero) * scale


WRONG_QUANT_DEQUANT = [
    (qd_no_clamp, "outside the calibrated range"),
    (qd_floor, None),
    (qd_subtract_zero, None),
    (qd_returns_codes, None),
    (qd_clamp_off_by_one, "outside the calibrated range"),
    (qd_dequant_forgets_zero, None),
    (qd_signed_code_range, None),
    (qd_no_return, "expected a torch.Tensor, got NoneType"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def _qdq_rows(rows, bits):
    s, z = good_compute_qparams(rows, bits)
    return good_quantize_dequantize(rows, s, z, bits)


def fg_groups_along_out_features(w, bits, group_size):  # groups run down the columns (the output dim)
    wt = w.t()  # (in, out)
    return _qdq_rows(wt.reshape(-1, group_size), bits).reshape(wt.shape).t()


def fg_one_group_per_row(w, bits, group_size):  # ignores group_size: per-channel
    return _qdq_rows(w.reshape(w.shape[0], -1), bits).reshape(w.shape)


def fg_wrong_axis_order(w, bits, group_size):  # reshape(group_size, -1): rows are not the groups
    return _qdq_rows(w.reshape(group_size, -1), bits).reshape(w.shape)


def fg_symmetric(w, bits, group_size):  # absmax instead of min/max
    return quant.fake_quantize(w, bits, group_size, sym=True)


def fg_whole_tensor(w, bits, group_size):  # one scale for everything
    return _qdq_rows(w.reshape(1, -1), bits).reshape(w.shape)


def fg_forgets_reshape_back(w, bits, group_size):  # returns (n_groups, group_size)
    return _qdq_rows(w.reshape(-1, group_size), bits)


def fg_ignores_bits(w, bits, group_size):  # hard-coded 4 bits
    return _qdq_rows(w.reshape(-1, group_size), 4).reshape(w.shape)


WRONG_GROUPS = [
    (fg_groups_along_out_features, None),
    (fg_one_group_per_row, None),
    (fg_wrong_axis_order, None),
    (fg_symmetric, None),
    (fg_whole_tensor, None),
    (fg_forgets_reshape_back, "shape"),
    (fg_ignores_bits, "3-bit"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 4


def pk_high_nibble_first(q):  # element 2k in the high nibble
    pairs = q.to(torch.uint8).reshape(*q.shape[:-1], -1, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1]


def pk_no_cast(q):  # int64 codes give int64 "bytes"
    pairs = q.reshape(*q.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def pk_along_dim0(q):  # pairs rows instead of neighbouring elements
    q = q.to(torch.uint8)
    return q[::2] | (q[1::2] << 4)


def pk_returns_codes(q):  # no packing at all
    return q.to(torch.uint8)


def pk_shift_by_8(q):  # shifts by a byte: the high code falls off when cast to uint8
    pairs = q.long().reshape(*q.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 8)).to(torch.uint8)


def pk_halves_not_pairs(q):  # first half of the row in the low nibbles, second half in the high nibbles
    q = q.to(torch.uint8)
    n = q.shape[-1] // 2
    return q[..., :n] | (q[..., n:] << 4)


def pk_flattens(q):  # loses the leading dims
    pairs = q.to(torch.uint8).reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


WRONG_PACK = [
    (pk_high_nibble_first, None),
    (pk_no_cast, "dtype torch.int64, expected torch.uint8"),
    (pk_along_dim0, None),
    (pk_returns_codes, "shape"),
    (pk_shift_by_8, None),
    (pk_halves_not_pairs, None),
    (pk_flattens, "shape"),
]

WRONG = [(checks.check_qparams, QPARAMS, fn, msg) for fn, msg in WRONG_QPARAMS]
WRONG += [(checks.check_quant_dequant, QUANT_DEQUANT, fn, msg) for fn, msg in WRONG_QUANT_DEQUANT]
WRONG += [(checks.check_fake_quantize_groups, GROUPS, fn, msg) for fn, msg in WRONG_GROUPS]
WRONG += [(checks.check_pack_int4, PACK, fn, msg) for fn, msg in WRONG_PACK]


# ----------------------------------------------------------------------------- correct alternatives


def alt_qparams_minimum_maximum(x, bits):
    lo = torch.minimum(x.min(dim=1, keepdim=True).values, torch.zeros(1))
    hi = torch.maximum(x.max(dim=1, keepdim=True).values, torch.zeros(1))
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=1e-8)
    return scale, (-lo / scale).round()


def alt_quant_dequant_package(x, scale, zero, bits):
    return quant.dequantize(quant.quantize(x, scale, zero, bits), scale, zero)


def alt_groups_view(w, bits, group_size):
    out, n = w.shape
    groups = w.view(out, n // group_size, group_size)  # (out, n_groups, g)
    lo = groups.amin(-1, keepdim=True).clamp(max=0)
    hi = groups.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    z = torch.round(-lo / s)
    return ((torch.clamp(torch.round(groups / s) + z, 0, 2**bits - 1) - z) * s).view(out, n)


def alt_pack_add_times_16(q):  # '+' and '* 16' in uint8: 15 + 15 * 16 = 255, no overflow, so it is right
    q = q.to(torch.uint8)
    return q[..., ::2] + q[..., 1::2] * 16


def alt_pack_int64_then_cast(q):
    q = q.long()
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


CORRECT_ALTERNATIVES = [
    (checks.check_qparams, QPARAMS, alt_qparams_minimum_maximum),
    (checks.check_quant_dequant, QUANT_DEQUANT, alt_quant_dequant_package),
    (checks.check_fake_quantize_groups, GROUPS, alt_groups_view),
    (checks.check_pack_int4, PACK, alt_pack_add_times_16),
    (checks.check_pack_int4, PACK, alt_pack_int64_then_cast),
]


# ----------------------------------------------------------------------------- not done


def _reference_outputs():
    """checker -> (args of one sample call, what the package's reference returns for them)."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    scale, zero = quant.compute_qparams(x, 4)
    q = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(1))
    return {
        checks.check_qparams: ((x, 4), quant.compute_qparams(x, 4)),
        checks.check_quant_dequant: ((x, scale, zero, 4), quant.dequantize(quant.quantize(x, scale, zero, 4), scale, zero)),
        checks.check_fake_quantize_groups: ((x, 4, 16), quant.fake_quantize(x, 4, 16)),
        checks.check_pack_int4: ((q,), quant.pack_int4(q)),
    }


# ----------------------------------------------------------------------------- failed


def test_exception_in_a_later_case_is_a_failure(capsys):
    calls = []

    def breaks_on_third_case(x, bits):
        calls.append(bits)
        if len(calls) == 3:
            raise ZeroDivisionError("boom")
        return good_compute_qparams(x, bits)

    out = assert_failed(checks.check_qparams, QPARAMS, breaks_on_third_case, capsys, "ZeroDivisionError: boom")
    assert len(calls) == 3


# ----------------------------------------------------------------------------- summary


def test_summary_one_line_per_exercise_and_a_count(capsys):
    checks.check_qparams(good_compute_qparams)
    checks.check_quant_dequant(qd_no_clamp)
    checks.check_fake_quantize_groups(good_fake_quantize_groups)

    def todo(q):
        raise NotImplementedError

    checks.check_pack_int4(todo)
    checks.check_quant_dequant(qd_floor)  # re-checking replaces the line, it does not add one
    result, lines = summary_lines(capsys)
    assert result == {QPARAMS: "passed", QUANT_DEQUANT: "failed", GROUPS: "passed", PACK: "not done"}
    assert len(lines) == 5
    for line, (name, status) in zip(lines, result.items()):
        assert name in line and status in line
    assert lines[-1] == "2/4 exercises passed"


def test_summary_after_a_fix(capsys):
    checks.check_pack_int4(pk_high_nibble_first)
    checks.check_pack_int4(good_pack_int4)
    result, lines = summary_lines(capsys)
    assert result == {PACK: "passed"}
    assert len(lines) == 2 and lines[-1] == "1/1 exercises passed"


def test_summary_with_nothing_checked(capsys):
    assert checks.summary() == {}
    assert capsys.readouterr().out.strip() == "0/0 exercises passed"


# ----------------------------------------------------------------------------- inputs are cloned per call


def mut_qparams(x, bits):
    out = good_compute_qparams(x, bits)
    x.mul_(0)
    return out


def mut_quant_dequant(x, scale, zero, bits):
    out = good_quantize_dequantize(x, scale, zero, bits)
    x.mul_(0), scale.mul_(0), zero.add_(1)
    return out


def mut_groups(w, bits, group_size):
    out = good_fake_quantize_groups(w, bits, group_size)
    w.mul_(0)
    return out


def mut_pack(q):
    out = good_pack_int4(q)
    q.zero_()
    return out


MUTATING = [(checks.check_qparams, QPARAMS, mut_qparams), (checks.check_quant_dequant, QUANT_DEQUANT, mut_quant_dequant),
            (checks.check_fake_quantize_groups, GROUPS, mut_groups), (checks.check_pack_int4, PACK, mut_pack)]


def test_mutating_before_computing_is_still_caught(capsys):
    def abs_in_place(x, bits):  # x.abs_() changes the data it then measures
        return good_compute_qparams(x.abs_(), bits)

    assert_failed(checks.check_qparams, QPARAMS, abs_in_place, capsys)


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    sample_calls = staticmethod(_reference_outputs)

    def assert_sample(self, checker, got):
        """Exactly what the package's reference returns (lab 01's references are the package's functions)."""
        args, expected = _reference_outputs()[checker]
        result = got(*args)
        for r, e in zip(result if isinstance(result, tuple) else (result,),
                        expected if isinstance(expected, tuple) else (expected,)):
            assert torch.equal(r, e)


def test_hints_come_in_two_tiers(fresh_status, capsys, monkeypatch):
    """Issue 26: the first failure says which case failed and by how much, with the short hint; the second failure
    of the same exercise adds the stronger one (more=); passing later does not need it."""
    monkeypatch.setattr(checks, "FAILURES", {})
    def wrong(x, bits):  # the scale of 2**bits levels instead of 2**bits - 1 steps
        scale, zero = quant.compute_qparams(x, bits, sym=False)
        return scale * (2**bits - 1) / 2**bits, zero
    checks.check_qparams(wrong)
    first = capsys.readouterr().out
    assert "FAILED" in first and "largest |error|" in first and 'case "' in first
    assert "one (scale, zero) per ROW" in first and "stronger hint (attempt" not in first
    assert "a second failure shows a stronger hint" in first
    checks.check_qparams(wrong)
    second = capsys.readouterr().out
    assert "stronger hint (attempt 2): scale = (xmax - xmin)" in second
    checks.check_qparams(lambda x, bits: quant.compute_qparams(x, bits, sym=False))
    assert "PASSED" in capsys.readouterr().out


def test_verdicts_go_to_the_exercise_log(fresh_status, tmp_path, monkeypatch, capsys):
    log = tmp_path / "exercises.jsonl"
    monkeypatch.setenv("COMPRESSLAB_EXERCISE_LOG", str(log))

    def not_done(x, bits):
        raise NotImplementedError()

    checks.check_qparams(not_done)
    checks.check_pack_int4(quant.pack_int4)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"exercise": "Exercise 1 · compute_qparams", "status": "not done"},
        {"exercise": "Exercise 4 · pack_int4", "status": "passed"}]
