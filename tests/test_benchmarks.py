"""CI smoke test: every benchmark script runs end to end in its ``--quick`` mode (so the scripts do not rot).

Each script runs in its own process, as a user would run it, from the repository root; it starts
and stops its own private local Ray instance and writes ``benchmarks/results/<name>_quick.json``
(git-ignored). Numbers are not checked: speed and accuracy are the scripts' output, not assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: script -> keys its quick JSON must hold, and whether it draws a PNG next to it
SCRIPTS = {
    "training_cost": ({"data", "train_images", "epochs", "machine", "rows"}, True),
    "accuracy_calibration": ({"data", "train_images", "test_images", "epochs", "members", "seeds", "machine", "rows", "runs", "plot"}, True),
    "communication": ({"data", "train_images", "test_images", "epochs", "members", "sync", "seeds", "model", "settings", "machine", "rows", "runs", "plot"}, True),
    "robustness": ({"machine", "accuracy", "aggregation", "epochs", "members"}, True),
    "step_cost": ({"model", "train_images", "epochs", "machine", "rows"}, False),
    "inference_cost": ({"members", "batches", "accelerator", "machine", "rows"}, False),
    "startup_cost": ({"machine", "repeats", "rows", "runs"}, False),
}
ROW_KEYS = {
    "training_cost": {"members", "mode", "wall_s", "samples_per_s", "peak_mem_mb", "acc"},
    "accuracy_calibration": {"config", "seeds", "acc_mean", "acc_std", "nll_mean", "ece_mean", "disagreement_mean", "member_acc_mean"},
    "communication": {"setting", "syncs", "KiB_per_sync", "total_KiB", "bytes/fp32", "acc_mean", "acc_std", "acc_cost_mean"},
    "step_cost": {"setting", "members", "ms/step", "ms/member-step", "fixed_s"},
    "inference_cost": {"data", "model", "vectorize", "ms_per_1000", "vs_loop"},
    "startup_cost": {"case", "wall_s", "peak_mem_mb", "ray_imported"},
}


def test_benchmark_scripts_run_in_quick_mode():
    failures, timings = [], {}
    for name, (keys, draws) in SCRIPTS.items():
        json_path = RESULTS / f"{name}_quick.json"
        png_path = RESULTS / f"{name}_quick.png"
        started = time.time()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        timings[name] = time.time() - started
        if proc.returncode != 0:
            failures.append(f"{name}.py --quick exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
            continue
        if not json_path.exists() or json_path.stat().st_mtime < started - 1:
            failures.append(f"{name}.py --quick did not write {json_path}")
            continue
        payload = json.loads(json_path.read_text())
        if missing := keys - set(payload):
            failures.append(f"{json_path.name} lacks {sorted(missing)}")
        for row in payload.get("rows", []) if name in ROW_KEYS else []:
            if missing := ROW_KEYS[name] - set(row):
                failures.append(f"{json_path.name}: a row lacks {sorted(missing)}")
        if draws and (not png_path.exists() or png_path.stat().st_mtime < started - 1):
            failures.append(f"{name}.py --quick did not draw {png_path}")
    print("quick benchmark wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    assert not failures, "\n\n".join(failures)
