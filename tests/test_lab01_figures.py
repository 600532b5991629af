"""Lab 01's headline figures, at full-mode size: RTN asymmetric, group 64, 16 x 512 WikiText-2 windows.

Reference (issue #2, measured independently): fp32 36.63, 8-bit 36.60, 4-bit 48.82, 3-bit 116.6.
The package reproduces the two quantized ones here, live (~25 s of one core each, beside the notebook runs); the lab's
full-mode run, as committed in its full-cpu reference file (tools/expected_figures.py), must agree with all four.
fp32 and 8-bit are not re-measured live: they run the same perplexity code as the 4- and 3-bit checks, with less
quantization to get wrong, and the quick-mode notebook runs hold the same code to their reference files.
"""

import pytest

import compresslab as cl
from compresslab import expected

REFERENCE = {None: 36.63, 8: 36.60, 4: 48.82, 3: 116.6}
LIVE = (4, 3)


@pytest.mark.parametrize("bits", LIVE, ids=lambda b: f"{b}bit")
def test_rtn_perplexity_matches_reference(smollm, bits):
    model, tok = smollm
    m = cl.quant.fake_quantize_model(model, bits=bits, group_size=64)
    ppl = cl.evaluation.perplexity(m, tok, n_windows=16, seq_len=512, progress=False)
    assert ppl == pytest.approx(REFERENCE[bits], rel=2e-3), ppl


def test_the_labs_full_mode_reference_agrees_with_the_independent_figures():
    rows = expected.load("01", "full-cpu")["rows"]
    for bits, ref in REFERENCE.items():
        method, b = ("fp32", 32) if bits is None else ("RTN", bits)
        [row] = [r for r in rows if r["method"] == method and r["bits"] == b and r["group_size"] in (None, 64)]
        assert row["ppl"] == pytest.approx(ref, rel=2e-3), row
