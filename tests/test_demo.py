import json
import math

import pytest

from sparsekit.__main__ import main


def test_tour_runs_and_reports_true_numbers(tmp_path, capsys):
    assert main(["tour", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "tour.json").read_text())
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


def test_digits_demo_short_run_writes_table_results_and_figure(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (make test installs it)")
    assert main(["demo", "--out", str(tmp_path), "--epochs", "3", "--finetune", "2", "--no-llm"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"dense", "2:4 fine-tuned", "slimmed", "80% unstructured"}
    assert rows["dense"]["accuracy"] > 80  # learns even in 3 epochs
    assert rows["2:4 fine-tuned"]["weight_bytes"] == pytest.approx(
        rows["dense"]["weight_bytes"] * 0.53, rel=0.02)  # 17/32, plus the padded first conv
    assert rows["80% unstructured"]["nonzero_weights"] == pytest.approx(
        0.2 * rows["dense"]["nonzero_weights"], rel=0.01)
    # kept compressed (bitmask format): 0.2 of the values plus one mask bit per weight
    assert rows["80% unstructured"]["weight_bytes"] < 0.3 * rows["dense"]["weight_bytes"]
    assert results["slimming"]["params_after"] < results["slimming"]["params_before"]
    out = capsys.readouterr().out
    assert "accuracy" in out and "target" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "pruning.png").stat().st_size > 10_000


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    assert '"extension_loaded": true' in capsys.readouterr().out


def test_llm_demo_short_run(tmp_path, capsys):
    from sparsekit import lm

    reason = lm.available()
    if reason is not None:
        pytest.skip(f"SmolLM2-135M not available: {reason}")
    from sparsekit.llm_demo import run

    # A time budget below one step: exactly one step of distillation.
    results = run(str(tmp_path), calibration_blocks=2, calibration_length=64, eval_blocks=1,
                  eval_length=128, new_tokens=4, repeats=1, recovery_seconds=1e-9)
    saved = json.loads((tmp_path / "llm_results.json").read_text())
    assert saved["perplexity"] == pytest.approx(results["perplexity"])
    ppl = results["perplexity"]
    names = {"dense", "magnitude 2:4", "SparseGPT 2:4", "SparseGPT 2:4 + distill"}
    assert set(ppl) == names
    assert ppl["dense"] < ppl["SparseGPT 2:4"] < ppl["magnitude 2:4"]
    assert math.isfinite(ppl["SparseGPT 2:4 + distill"])
    assert results["distill"]["steps"] == 1
    assert results["weight_bytes"]["2:4"] < 0.6 * results["weight_bytes"]["dense"]
    assert set(results["completions"]) == names
    assert "decode" in capsys.readouterr().out
