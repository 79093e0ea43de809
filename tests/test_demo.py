import json

import pytest

from sparsekit.__main__ import main


def test_demo_runs_and_reports_true_numbers(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["masks"]["2:4 (N:M)"]["kept_fraction"] == pytest.approx(0.5)
    assert results["masks"]["magnitude 50%"]["kept_fraction"] == pytest.approx(0.5)
    for dtype, ratio in [("torch.float32", 17 / 32), ("torch.float16", 9 / 16)]:
        entry = results["compress"][dtype]
        assert entry["round_trip_exact"] is True
        assert entry["ratio"] == pytest.approx(ratio)
    for entry in results["linear"].values():
        assert entry["matches_dense"] is True
    out = capsys.readouterr().out
    assert "2:4 compression" in out and "Multiplying on the compressed weight" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "masks.png").stat().st_size > 10_000


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    assert '"extension_loaded": true' in capsys.readouterr().out
