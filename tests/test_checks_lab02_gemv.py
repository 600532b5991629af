"""Lab 02's optional Triton puzzle (section 10): the dequantizing GEMV checker.

The lab's kernel cell, taken from solutions/02_gptq.py, passes; the generated lab (stub) is NOT DONE; each plausible
bug, written as a real Triton kernel (one `BUG` switch, so each variant differs from the solution in one place),
is FAILED with the case that catches it named; correct alternatives pass. Kernels run in Triton's interpreter.
"""

import re
import runpy
from pathlib import Path

import pytest
import torch

import compresslab.kernels  # noqa: F401 — before triton: sets TRITON_INTERPRET=1 without a GPU
import triton
import triton.language as tl

from compresslab import checks

ROOT = Path(__file__).resolve().parents[1]
NAME = "Optional · dequant_gemv (Triton)"

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


def _cell(source: str) -> str:
    """The code cell that defines my_dequant_gemv_kernel in a percent-format source or a generated notebook."""
    cells = re.split(r"^# %%.*$", source, flags=re.M)
    return next(c for c in cells if "def my_dequant_gemv_kernel" in c)


def _run_cell(code: str, tmp_path) -> dict:
    """Run a cell from a real file (triton.jit reads a kernel's source through inspect)."""
    import compresslab as cl

    path = tmp_path / "cell.py"
    path.write_text(code)
    return runpy.run_path(str(path), init_globals={"cl": cl, "torch": torch})


def test_the_lab_solution_kernel_passes(tmp_path, capsys):
    ns = _run_cell(_cell((ROOT / "solutions" / "02_gptq.py").read_text()), tmp_path)
    assert checks.STATUS == {NAME: "passed"}
    assert "PASSED all 5 cases" in capsys.readouterr().out
    assert ns["my_w4a16_gemv"].__name__ == "my_w4a16_gemv"  # the lab keeps its own function


def test_the_generated_lab_stub_is_not_done(tmp_path, capsys):
    import nbformat

    nb = nbformat.read(ROOT / "labs" / "02_gptq.ipynb", as_version=4)
    code = next(c.source for c in nb.cells if c.cell_type == "code" and "def my_dequant_gemv_kernel" in c.source)
    assert "raise NotImplementedError()" in code and "### BEGIN SOLUTION" not in code
    ns = _run_cell(code, tmp_path)
    assert checks.STATUS == {NAME: "not done"}
    assert "NOT DONE" in capsys.readouterr().out
    # the reference handed back computes W x
    x, qw, qz, s, gs = checks._gemv_case(48, 64, 32, 11)
    from compresslab.kernels import w4a16

    expected = (w4a16.dequantize_gptq(qw, qz, s, None, gs) @ x.float()).half()
    torch.testing.assert_close(ns["my_w4a16_gemv"](x, qw, qz, s, gs), expected, atol=2e-2, rtol=2e-3)


# ----------------------------------------------------------------------------- variants as real kernels

GOOD, SHIFT_NOT_X4, NO_PLUS_ONE, NO_WRAP, GROUP_BY_COLUMN, GROUP_ZERO, ZERO_BY_ROW, NO_STORE_MASK, TRANSPOSED = range(9)
XOR_WRAP, MOD_WRAP, DEQUANT_AFTER_SUM = 100, 101, 102  # correct alternatives


@triton.jit
def _variant_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BUG: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k).to(tl.float32)
        if BUG == TRANSPOSED:  # reads qweight as if it were (N, K/8)
            words = tl.load(qw_ptr + offs_n[None, :] * (K // 8) + (offs_k // 8)[:, None], mask=mask_n[None, :],
                            other=0)
        else:
            words = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        if BUG == SHIFT_NOT_X4:
            q = (words >> (offs_k % 8)[:, None]) & 0xF
        else:
            q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
        if BUG == GROUP_BY_COLUMN:  # mixes up the axes: groups run along K (inputs), not N (BLOCK_N == BLOCK_K)
            g = offs_n // GROUP_SIZE
        elif BUG == GROUP_ZERO:
            g = offs_k * 0
        else:
            g = offs_k // GROUP_SIZE
        scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
        zw = tl.load(qz_ptr + g[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=mask_n[None, :], other=0)
        if BUG == ZERO_BY_ROW:  # picks the zero's nibble by the input row instead of the output column
            stored = (zw >> ((offs_k % 8) * 4)[:, None]) & 0xF
        else:
            stored = (zw >> ((offs_n % 8) * 4)[None, :]) & 0xF
        if BUG == NO_PLUS_ONE:
            z = stored
        elif BUG == NO_WRAP:
            z = stored + 1
        elif BUG == XOR_WRAP:
            z = (stored + 1) ^ 16 * ((stored + 1) >> 4)  # clears bit 4: the same as & 0xF for 0..16
        elif BUG == MOD_WRAP:
            z = (stored + 1) % 16
        else:
            z = (stored + 1) & 0xF
        if BUG == DEQUANT_AFTER_SUM:  # sum_k x q s - sum_k x z s: the same numbers, rearranged
            acc += tl.sum(x[:, None] * q.to(tl.float32) * scale, axis=0) - tl.sum(x[:, None] * z.to(tl.float32)
                                                                                   * scale, axis=0)
        else:
            acc += tl.sum(x[:, None] * ((q - z).to(tl.float32) * scale), axis=0)
    if BUG == NO_STORE_MASK:  # writes the padded columns into a too-long buffer, returns them
        tl.store(out_ptr + offs_n, acc.to(tl.float16))
    else:
        tl.store(out_ptr + offs_n, acc.to(tl.float16), mask=mask_n)


def _variant(bug: int, name: str):
    def gemv(x, qweight, qzeros, scales, group_size):
        k, n = x.shape[0], qweight.shape[1]
        padded = triton.cdiv(n, 32) * 32
        out = torch.zeros(padded, dtype=torch.float16)
        _variant_kernel[(triton.cdiv(n, 32),)](x, qweight, qzeros, scales, out, n, k, GROUP_SIZE=group_size,
                                                BLOCK_N=32, BLOCK_K=32, BUG=bug)
        return out if bug == NO_STORE_MASK else out[:n]
    gemv.__name__ = name
    return gemv


WRONG = [
    (SHIFT_NOT_X4, "shift_by_k_mod_8", "one group"),
    (NO_PLUS_ONE, "v1_zero_without_plus_one", "one group"),
    (NO_WRAP, "plus_one_without_wrap", "four groups"),  # its random groups already hold a zero of 0
    (GROUP_BY_COLUMN, "group_index_from_output_column", "four groups"),
    (GROUP_ZERO, "every_row_uses_group_0", "four groups"),
    (ZERO_BY_ROW, "zero_nibble_chosen_by_row", "one group"),
    (NO_STORE_MASK, "returns_padded_columns", "N = 72"),
    (TRANSPOSED, "reads_qweight_transposed", "one group"),
]


@pytest.mark.parametrize("bug, name, case", WRONG, ids=[w[1] for w in WRONG])
def test_wrong_kernel_is_rejected(bug, name, case, capsys):
    got = checks.check_dequant_gemv(_variant(bug, name))
    out = capsys.readouterr().out
    assert checks.STATUS == {NAME: "failed"}
    assert "FAILED" in out and case in out, out
    assert got is checks._gemv_reference


@pytest.mark.parametrize("bug", [GOOD, XOR_WRAP, MOD_WRAP, DEQUANT_AFTER_SUM])
def test_correct_kernels_pass(bug, capsys):
    fn = _variant(bug, f"variant_{bug}")
    assert checks.check_dequant_gemv(fn) is fn
    assert checks.STATUS == {NAME: "passed"}, capsys.readouterr().out


def test_an_error_inside_the_kernel_is_a_failure_not_a_crash(capsys):
    def broken(x, qweight, qzeros, scales, group_size):
        raise IndexError("boom")

    assert checks.check_dequant_gemv(broken) is checks._gemv_reference
    assert checks.STATUS == {NAME: "failed"}
    assert "IndexError" in capsys.readouterr().out
