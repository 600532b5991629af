"""Lab 04's calibration-free headline figures, at full-mode size: magnitude pruning (one threshold per Linear, or
2:4 along rows) of every decoder Linear, 16 x 512 WikiText-2 windows.

Reference (issue #14, measured independently on this setup): dense 36.63; 50 % magnitude 487.6; 2:4 magnitude 1828.
The Wanda and SparseGPT figures need a calibrated whole-model pass (minutes on CPU): tools/lab04_figures.py.
"""

import pytest

from compresslab import evaluation
from compresslab import pruning

REFERENCE = {"50%": (dict(sparsity=0.5), 487.6), "2:4": (dict(pattern="2:4"), 1828.0)}


@pytest.mark.parametrize("pattern", list(REFERENCE))
def test_magnitude_perplexity_matches_reference(smollm, pattern):
    model, tok = smollm
    kw, ref = REFERENCE[pattern]
    pruned, report = pruning.prune_model(model, None, "magnitude", progress=False, **kw)
    assert all(v >= 0.5 - 1e-6 for v in report.values())  # more where the model already held exact zeros
    ppl = evaluation.perplexity(pruned, tok, n_windows=16, seq_len=512, progress=False)
    assert ppl == pytest.approx(ref, rel=0.03), ppl
