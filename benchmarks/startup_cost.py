"""What a script pays on one device besides its training: the imports, and Ray where it starts.

Each case runs in a fresh interpreter, as a user runs a script, ``--repeats`` times:

* ``import``: ``from hqde_lightning import HQDEStrategy``;
* ``quick-start``: ``examples/quick_start.py`` (4 members of an MLP on digits, 5 epochs, then ``test``);
* ``facade``: ``examples/original_package.py --epochs 1``, the original HQDE package's README quick
  start through ``create_hqde_system`` (4 workers of its small CNN on digits as 3×8×8 images,
  batches of 32, 1 epoch, then ``predict`` and ``cleanup``).

For each: the interpreter's wall time, the peak resident memory of its process tree (Ray's daemons
count, when it starts them), and whether it imported Ray. ``--packages`` measures the package of
other checkouts too (put first on the import path; the examples are this checkout's), with every
repeat running each case for each checkout in turn, so that a busy machine slows them alike:
``python benchmarks/startup_cost.py --packages . /path/to/older/checkout``.

Run: ``python benchmarks/startup_cost.py [--repeats 3] [--cases import quick-start facade] [--packages DIR ...]``;
prints a table and writes ``results/startup_cost.json`` (``--quick``: the ``import`` case once,
``results/startup_cost_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TreeMemory, machine, mean_std, print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: the last line every case prints: what it imported
_REPORT = 'import json, sys, hqde_lightning; print(json.dumps({"ray_imported": "ray" in sys.modules, "package": hqde_lightning.__file__}))'


def _script(path: str, *argv: str) -> list[str]:
    """``python`` arguments that run the example ``path`` as ``__main__`` with ``argv``, then report what it imported."""
    script = str(EXAMPLES / path)
    return ["-c", f"import runpy, sys\nsys.path.insert(0, {str(EXAMPLES)!r})\nsys.argv = {[script, *argv]!r}\nrunpy.run_path({script!r}, run_name='__main__')\n" + _REPORT]


#: case -> the arguments of ``python`` that run it
CASES: dict[str, list[str]] = {
    "import": ["-c", "from hqde_lightning import HQDEStrategy\n" + _REPORT],
    "quick-start": _script("quick_start.py"),
    "facade": _script("original_package.py", "--epochs", "1"),
}


def run_case(case: str, package: str) -> dict[str, Any]:
    """One fresh interpreter running ``case`` with the checkout ``package`` first on its import path: its wall time,
    the peak memory of its process tree, what it imported. It runs in an empty folder, which shadows no package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *CASES[case]], cwd=tempfile.mkdtemp(prefix="startup-cost-"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with TreeMemory(interval=0.05, root=process.pid) as memory:
        out, err = process.communicate(timeout=900)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"case {case!r} failed:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    imported = str(Path(report.pop("package")).parent.parent)
    if imported != package:
        raise RuntimeError(f"case {case!r} imported the package of {imported}, not of {package}")
    return {"case": case, "package": package, "wall_s": seconds, "peak_mem_mb": memory.peak / 2**20, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--packages", nargs="+", default=[str(ROOT)], metavar="DIR", help="checkouts whose hqde_lightning to measure (default: this one)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: the import case once")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.cases = 1, ["import"]
    packages = [str(Path(p).resolve()) for p in args.packages]
    runs = [run_case(case, package) for _ in range(args.repeats) for case in args.cases for package in packages]
    rows = []
    for case in args.cases:
        for package in packages:
            mine = [r for r in runs if r["case"] == case and r["package"] == package]
            wall, wall_std = mean_std([r["wall_s"] for r in mine])
            mem, _ = mean_std([r["peak_mem_mb"] for r in mine])
            rows.append({"case": case, "package": package, "wall_s": wall, "wall_std": wall_std, "peak_mem_mb": mem, "ray_imported": any(r["ray_imported"] for r in mine)})
    print(f"startup cost ({machine()}), {args.repeats} fresh interpreter(s) per case and package")
    print_table(rows, ["case", "package", "wall_s", "wall_std", "peak_mem_mb", "ray_imported"])
    path = write_results("startup_cost_quick" if args.quick else "startup_cost", {"machine": machine(), "repeats": args.repeats, "rows": rows, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
