"""benchmarks/sparsity_overhead.py runs end to end (tiny sizes, CPU) and writes the documented JSON keys."""

import json

import pytest


@pytest.mark.slow
def test_sparsity_overhead_quick(monkeypatch, tmp_path):
    from tests.helpers.jobs import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import sparsity_overhead

    assert sparsity_overhead.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sparsity_overhead_quick.json").read_text())
    assert {"machine", "kernel_fraction_of_copy_bandwidth", "gpu_memory_overhead_bytes", "goals"} <= set(result)
    assert set(result["step_overhead"]) == {"1", "10", "100"}
    assert result["whole_model"]["torch_chunked_s"] > 0 and result["kernel_fraction_of_copy_bandwidth"] is None  # CPU
    assert (tmp_path / "sparsity_overhead_quick.png").stat().st_size > 0
