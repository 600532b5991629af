"""`make bench` on a machine without a GPU: it refuses with the fix, and its --smoke mode runs the whole pipeline
(every measurement, the JSON and the roofline plot) on tiny shapes through the Triton interpreter."""

import json

import pytest
import torch

from compresslab.kernels import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU `make bench` runs for real")
def test_bench_without_a_gpu_says_what_to_do():
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--smoke"):
        bench.main(["--out", "unused"])


def test_smoke_run_writes_results_and_plot(tmp_path):
    results = bench.main(["--smoke", "--out", str(tmp_path)])
    stem = results["device"].replace(" ", "_")
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    assert saved["timings_meaningful"] is torch.cuda.is_available()
    rows = saved["w4a16"]
    assert [r["M"] for r in rows] == bench.SMOKE_BATCHES
    for r in rows:
        for name in ("fp16", "w4a16", "w4a16_act_order"):
            assert r[name]["us"] > 0 and r[name]["GBps"] > 0
        assert r["bnb_nf4"].startswith("unavailable") and r["torchao_int4"].startswith("unavailable")
    assert len(saved["targets"]) == 1 and saved["targets"][0]["K"] == bench.SMOKE_SHAPES[0][0]
    assert {(r["kind"], r["bits"]) for r in saved["kv_quant"]} == {("key", 2), ("key", 4), ("value", 2), ("value", 4)}
    assert "skipped" in saved["decode"]
