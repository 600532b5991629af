"""Lab 01's headline figures, at full-mode size: RTN asymmetric, group 64, 16 x 512 WikiText-2 windows.

Reference (issue #2, measured independently): fp32 36.63, 8-bit 36.60, 4-bit 48.82, 3-bit 116.6.
"""

import pytest

import compresslab as cl

REFERENCE = {None: 36.63, 8: 36.60, 4: 48.82, 3: 116.6}


@pytest.mark.parametrize("bits", list(REFERENCE), ids=lambda b: f"{b or 32}bit")
def test_rtn_perplexity_matches_reference(smollm, bits):
    model, tok = smollm
    m = model if bits is None else cl.quant.fake_quantize_model(model, bits=bits, group_size=64)
    ppl = cl.evaluation.perplexity(m, tok, n_windows=16, seq_len=512, progress=False)
    assert ppl == pytest.approx(REFERENCE[bits], rel=2e-3), ppl
