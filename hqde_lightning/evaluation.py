"""Evaluating the ensemble in ``validate``/``test``/``predict`` (in the driver, no Ray needed).

While one of these runs, your module's ``forward`` is the ensemble's: ``self(x)`` inside your
``validation_step``/``test_step``/``predict_step`` returns the combined output of every
active member (for class logits: the log of the mean member probabilities; which outputs
count as class logits is decided as :mod:`hqde_lightning.ensemble` describes). Your own
metrics therefore measure the ensemble.

The classification contract: when a batch is ``(inputs, target, ...)`` with an integer
``target`` of shape ``(batch,)`` and a call of ``self(...)`` in the step returns logits of shape
``(batch, classes)`` with ``classes > target`` (alone, or as one leaf of a tuple/dict output),
this callback also logs, with torchmetrics:

* ``ensemble/{stage}_acc``, ``_nll``, ``_ece`` (expected calibration error, 15 bins),
  ``_brier``, ``_disagreement`` (mean pairwise disagreement of the members' classes) and
  ``_aurc`` (area under the risk–coverage curve of selective prediction by the ensemble's
  confidence, lower is better; see :func:`hqde_lightning.uncertainty.aurc`),
* ``member_{i}/{stage}_acc`` and ``_nll`` for every active member,

where ``stage`` is ``val`` or ``test``. They are computed from the member outputs of the first
such call in the step, i.e. from what your ``forward`` actually received (after any reshaping
in your step); the members are never run again on the raw batch. A step that calls no
``self(...)`` (or none returning such logits) gets no built-in metrics, with a one-time notice.
The ensemble's probabilities are softmax(log p̄ / T) with its temperature T (1 until
:meth:`hqde_lightning.ensemble.Ensemble.calibrate` fits one).

A module you passed through ``torch.compile`` evaluates the ensemble with its steps uncompiled
(the members run stacked or in a loop, as :class:`~hqde_lightning.ensemble.Ensemble` chooses);
its compiled functions are back in place afterwards.

Callbacks derived from :class:`EnsembleEvaluationCallback` (``OODEvaluation``,
``ReliabilityDiagram``) get each batch's stacked member logits and, at the end of the epoch,
these metrics; :func:`reliability_diagram` draws a reliability diagram (needs matplotlib).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from hqde_lightning.ensemble import AutoCombiner, ClassLogitsLeaf, Ensemble, is_class_target, is_stacked_logits, leaf_paths
from hqde_lightning.pickling import uncompiled
from hqde_lightning.uncertainty import aurc, combine_log_probabilities, reliability_bins

__all__ = ["EnsembleEvaluation", "EnsembleEvaluationCallback", "EnsembleMetrics", "classification_batch", "reliability_diagram"]


class _EnsembleForward:
    """Stands in for a module's ``forward``: the ensemble's output.

    For the current batch it remembers the stacked member outputs of every call (``calls``)
    and hands them, with the batch's integer class targets if it has some, to the combiner.
    """

    def __init__(self, ensemble: Ensemble) -> None:
        self.ensemble = ensemble
        self.target: Tensor | None = None
        self.calls: list[Any] = []
        self._noticed_mean = False

    def begin_batch(self, target: Tensor | None) -> None:
        """Forgets the previous batch's calls; ``target`` is this batch's class targets or ``None``."""
        self.target, self.calls = target, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.ensemble.member_outputs(*args, **kwargs)
        if self.target is not None:
            self.ensemble.combiner.observe_targets(outputs, self.target)
        self.calls.append(outputs)
        self._notice_averaged_logits(outputs)
        return self.ensemble.combine_outputs(outputs)

    def _notice_averaged_logits(self, outputs: Any) -> None:
        """Says once when ``combine="auto"`` averages ``(batch, k >= 2)`` outputs for want of targets."""
        combiner = self.ensemble.combiner
        if self._noticed_mean or self.target is not None or not isinstance(combiner, AutoCombiner) or combiner.logits.path is not None:
            return
        shapes = [tuple(leaf.shape[1:]) for _, leaf in leaf_paths(outputs) if is_stacked_logits(leaf)]
        if shapes:
            self._noticed_mean = True
            rank_zero_info(
                f"HQDEStrategy(combine='auto') averages the members' {shapes[0]} outputs: no evaluation batch with integer class"
                " targets showed them to be class logits. Run `trainer.validate`/`trainer.test` first, or pass"
                " `combine='probability'`, to combine them as probabilities."
            )


def classification_batch(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(inputs, target)`` when ``batch`` follows the classification contract, else ``None``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    inputs, target = batch[0], batch[1]
    return (inputs, target) if is_class_target(target) else None


def _picked(values: Tensor, target: Tensor) -> Tensor:
    """``values[n, target[n]]`` for every input ``n``."""
    return values.gather(1, target.view(-1, 1)).squeeze(1)


class EnsembleMetrics:
    """Ensemble and per-member torchmetrics (accuracy, NLL, ECE, Brier, disagreement, AURC) for one stage and dataloader.

    Every input's confidence (largest class probability) and correctness is kept, for the
    ensemble and for every member, for the AURC and :meth:`reliability`.
    """

    def __init__(self, num_members: int, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.ensemble = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1"),
                "nll": MeanMetric(),
                "brier": MeanMetric(),
                "disagreement": MeanMetric(),
            }
        ).to(device)
        self.members = [
            MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro"), "nll": MeanMetric()}).to(device)
            for _ in range(num_members)
        ]
        # confidence and correctness per input: position 0 the ensemble, 1 + i member i
        self.selective = [(CatMetric().to(device), CatMetric().to(device)) for _ in range(num_members + 1)]

    def update(self, member_logits: Tensor, weights: Tensor, target: Tensor, temperature: float | Tensor = 1.0) -> None:
        """Adds one batch: ``member_logits`` ``(members, batch, classes)``, ``weights`` ``(members,)``,
        integer ``target`` ``(batch,)``; the ensemble's probabilities get ``temperature``."""
        member_log_probs, log_probs = combine_log_probabilities(member_logits, weights, temperature)
        member_probs, probs = member_log_probs.exp(), log_probs.exp()
        one_hot = torch.nn.functional.one_hot(target, probs.shape[-1]).to(probs)
        classes = member_probs.argmax(-1)
        pairs = list(itertools.combinations(range(classes.shape[0]), 2))
        # per input: the share of member pairs whose classes differ
        disagreement = torch.stack([(classes[i] != classes[j]) for i, j in pairs]).to(probs).mean(0) if pairs else torch.zeros_like(target, dtype=probs.dtype)
        self.ensemble["acc"].update(probs, target)
        self.ensemble["ece"].update(probs, target)
        self.ensemble["nll"].update(-_picked(log_probs, target))
        self.ensemble["brier"].update(((probs - one_hot) ** 2).sum(-1))
        self.ensemble["disagreement"].update(disagreement)
        for metrics, p, log_p in zip(self.members, member_probs, member_log_probs):
            metrics["acc"].update(p, target)
            metrics["nll"].update(-_picked(log_p, target))
        for (confidence, correct), p in zip(self.selective, [probs, *member_probs]):
            top, predicted = p.max(-1)
            confidence.update(top)
            correct.update((predicted == target).float())

    def _selective(self, position: int) -> tuple[Tensor, Tensor]:
        confidence, correct = self.selective[position]
        return confidence.compute(), correct.compute()

    def compute(self, stage: str, member_ids: list[int], suffix: str) -> dict[str, Tensor]:
        out = {f"ensemble/{stage}_{k}{suffix}": v for k, v in self.ensemble.compute().items()}
        out[f"ensemble/{stage}_aurc{suffix}"] = aurc(*self._selective(0))
        for index, metrics in zip(member_ids, self.members):
            out.update({f"member_{index}/{stage}_{k}{suffix}": v for k, v in metrics.compute().items()})
        return out

    def reliability(self, member_ids: list[int], n_bins: int = 15) -> dict[str, dict[str, Tensor]]:
        """Reliability bins (:func:`hqde_lightning.uncertainty.reliability_bins`) of the ensemble and
        of its most accurate member (the first on a tie), keyed ``"ensemble"`` and ``"member_{i} (best)"``."""
        accuracy = [float(metrics["acc"].compute()) for metrics in self.members]
        best = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))
        return {
            "ensemble": reliability_bins(*self._selective(0), n_bins=n_bins),
            f"member_{member_ids[best]} (best)": reliability_bins(*self._selective(best + 1), n_bins=n_bins),
        }


def reliability_diagram(curves: Mapping[str, Mapping[str, Tensor]], title: str = "") -> Any:
    """A matplotlib figure with one column per entry of ``curves`` (name -> :func:`~hqde_lightning.uncertainty.reliability_bins`):
    accuracy per confidence bin against the diagonal (perfect calibration) above, the number of
    inputs per bin below. Needs matplotlib (``pip install 'hqde-lightning[plot]'``)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(curves), 5.2))
    axes = figure.subplots(2, len(curves), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for column, (name, bins) in enumerate(curves.items()):
        edges = bins["edges"].tolist()
        width = edges[1] - edges[0]
        counts = bins["counts"].tolist()
        accuracy = [a if c else 0.0 for a, c in zip(bins["accuracy"].tolist(), counts)]
        top, bottom = axes[0][column], axes[1][column]
        top.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
        top.bar(edges[:-1], [(c - a) if n else 0.0 for a, c, n in zip(accuracy, bins["confidence"].tolist(), counts)], bottom=accuracy,
                width=width, align="edge", fill=False, hatch="//", edgecolor="tab:red", label="gap to mean confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=1)
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}: ECE {float(bins['ece']):.4f}")
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(edges[:-1], counts, width=width, align="edge", color="tab:grey", edgecolor="black")
        bottom.set(xlabel="confidence", ylabel="inputs")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


class EnsembleEvaluationCallback(Callback):
    """Base of callbacks that use what the ensemble's ``validate``/``test`` evaluation sees (in the driver).

    :class:`EnsembleEvaluation` calls, for every such callback in ``trainer.callbacks``,
    :meth:`on_ensemble_batch` after each batch whose step produced class logits, and
    :meth:`on_ensemble_epoch_end` before it logs its own metrics.
    """

    def ignores_targets(self, stage: str, dataloader_idx: int) -> bool:
        """Whether the targets of this dataloader are no class labels of the task (no built-in
        metrics for it; its logits are still found by what other loaders showed). Default: ``False``."""
        return False

    def on_ensemble_batch(self, trainer: Trainer, stage: str, dataloader_idx: int, member_logits: Tensor, ensemble: Ensemble) -> None:
        """One batch's class logits of the active members ``(members, batch, classes)``."""

    def on_ensemble_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str, ensemble: Ensemble, metrics: Mapping[int, EnsembleMetrics]) -> None:
        """The end of the stage's epoch; ``metrics`` are the built-in metrics per dataloader index."""


class EnsembleEvaluation(Callback):
    """Makes ``validate``/``test``/``predict`` evaluate ``strategy.ensemble`` (added by the launcher)."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self._module: LightningModule | None = None
        self._forward: _EnsembleForward | None = None
        #: per dataloader index, the built-in metrics of each output leaf that can hold the class logits, by its path
        self._metrics: dict[int, dict[str, EnsembleMetrics]] = {}
        self._logits = ClassLogitsLeaf()
        self._warned_contract = False
        self._warned_switch = False
        self._hooks: list[EnsembleEvaluationCallback] = []
        self._compiled = ExitStack()

    # ------------------------------------------------------------- forward
    def _begin(self, pl_module: LightningModule) -> None:
        self._metrics = {}
        self._logits = ClassLogitsLeaf()
        ensemble = self.strategy.ensemble
        if ensemble is None:
            rank_zero_warn("HQDEStrategy has no trained ensemble yet (call `fit` or pass an HQDE `ckpt_path`): evaluating the module itself.")
            return
        path = pl_module.trainer.ckpt_path
        if path is not None and str(path) == self.strategy.plain_checkpoint:
            rank_zero_warn(
                f"{path!r} holds no HQDE ensemble (a plain Lightning checkpoint): evaluating your module with its weights, as a plain"
                " Trainer would. The strategy's ensemble is kept; evaluate it without `ckpt_path`, or with an HQDE checkpoint."
            )
            return
        # the members in your module's precision and device, as the strategy set it up ("64-true": float64); the
        # combination weights and temperature stay float64 ("bf16-true" would round them, and checkpoints keep them)
        ensemble.members = self.strategy.precision_plugin.convert_module(ensemble.members)
        ensemble = ensemble.to(pl_module.device).eval()
        self._hooks = [cb for cb in pl_module.trainer.callbacks if isinstance(cb, EnsembleEvaluationCallback)]
        self._forward = _EnsembleForward(ensemble)
        # compiled steps would trace the ensemble's Python (graph breaks at every call): they wait until the end
        self._compiled.enter_context(uncompiled(pl_module))
        pl_module.forward = self._forward  # an instance attribute shadows the class's forward
        self._module = pl_module

    def restore_forward(self) -> None:
        """Gives the module its own ``forward`` back."""
        if self._module is not None:
            self._module.__dict__.pop("forward", None)
        self._compiled.close()
        self._module, self._forward = None, None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._begin(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore_forward()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore_forward()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore_forward()

    # ------------------------------------------------------------- metrics
    def _begin_batch(self, batch: Any, stage: str, dataloader_idx: int) -> None:
        if self._forward is not None:
            pair = None if self._ignores_targets(stage, dataloader_idx) else classification_batch(batch)
            self._forward.begin_batch(None if pair is None else pair[1])

    def _ignores_targets(self, stage: str, dataloader_idx: int) -> bool:
        return any(hook.ignores_targets(stage, dataloader_idx) for hook in self._hooks)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_batch(batch, "val", dataloader_idx)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_batch(batch, "test", dataloader_idx)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_batch(batch, "predict", dataloader_idx)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, "val", dataloader_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, "test", dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _update(self, trainer: Trainer, stage: str, dataloader_idx: int) -> None:
        """Updates the built-in metrics from the member outputs this step's ``self(...)`` calls produced,
        and hands the class logits to the :class:`EnsembleEvaluationCallback` callbacks."""
        if self._forward is None:
            return
        ensemble = self._forward.ensemble
        if self._ignores_targets(stage, dataloader_idx):
            # no targets to check the logits against: the leaf the other loaders showed, with as many classes
            logits = next((leaf for leaf in map(self._logits.select, self._forward.calls) if leaf is not None), None)
            if logits is not None:
                for hook in self._hooks:
                    hook.on_ensemble_batch(trainer, stage, dataloader_idx, logits.detach(), ensemble)
            return
        target = self._forward.target
        calls = self._forward.calls if target is not None else []
        previous = self._logits.path
        for outputs in calls:
            self._logits.observe(outputs, target)
        if previous is not None and self._logits.path != previous:
            self._warn_switch(previous)
        logits = next((leaf for leaf in map(self._logits.select, calls) if leaf is not None and leaf.shape[1] == target.shape[0]), None)
        if logits is None:
            if not self._warned_contract:
                self._warned_contract = True
                rank_zero_warn(
                    "HQDEStrategy logs ensemble accuracy/calibration only for `(inputs, int target)` batches whose step calls"
                    " `self(...)` and gets `(batch, classes)` logits (alone or inside a tuple/dict); this step does not, so only"
                    " your own logged metrics (computed on the ensemble's forward) are reported."
                )
            return
        # every leaf that can still hold the class logits keeps metrics of its own, so that those of the leaf chosen in the
        # end count every batch, also when later targets showed an earlier choice wrong (evaluation data ordered by class)
        per_leaf = self._metrics.setdefault(dataloader_idx, {})
        for path in [p for p, m in per_leaf.items() if m.num_classes <= self._logits.max_target]:
            del per_leaf[path]
        labelled = target >= 0  # an ignore label (-100, `F.cross_entropy`'s `ignore_index`) counts in no metric
        candidates = dict(reversed([pair for outputs in calls for pair in self._logits.qualifying(outputs, target)]))  # (each path's first call)
        for path, leaf in candidates.items() if bool(labelled.any()) else ():
            if path not in per_leaf:
                per_leaf[path] = EnsembleMetrics(leaf.shape[0], leaf.shape[-1], leaf.device)
            per_leaf[path].update(leaf.detach()[:, labelled], ensemble.active_weights(), target[labelled], ensemble.temperature)
        for hook in self._hooks:
            hook.on_ensemble_batch(trainer, stage, dataloader_idx, logits.detach(), ensemble)

    def _warn_switch(self, previous: str) -> None:
        """Says once that targets seen later showed the leaf taken for class logits (``previous``) to be none."""
        if self._warned_switch:
            return
        self._warned_switch = True
        now = self._logits.path
        rank_zero_warn(
            f"HQDEStrategy: the members' output {now!r} holds the class logits: targets up to {self._logits.max_target} showed that"
            f" {previous!r}, taken for them on earlier batches, does not. The built-in ensemble metrics count every batch with {now!r};"
            f" on those earlier batches the ensemble's output (what your own metrics saw, and callbacks given the logits) combined"
            f" {previous!r} as class probabilities. Shuffle the evaluation data, or name the leaf from the start:"
            f" `HQDEStrategy(combine=AutoCombiner(probability_leaf={now!r}))`."
        )

    def _log(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._forward is None:
            return
        ensemble = self._forward.ensemble
        # per dataloader, the metrics of the leaf that holds the class logits
        chosen = {idx: per_leaf[self._logits.path] for idx, per_leaf in self._metrics.items() if self._logits.path in per_leaf}
        for hook in self._hooks:
            hook.on_ensemble_epoch_end(trainer, pl_module, stage, ensemble, chosen)
        member_ids = ensemble.active_member_ids()
        values: dict[str, Tensor] = {}
        for dataloader_idx, metrics in sorted(chosen.items()):
            suffix = f"/dataloader_idx_{dataloader_idx}" if len(chosen) > 1 else ""
            values.update(metrics.compute(stage, member_ids, suffix))
        if values:
            pl_module.log_dict({k: v.float() for k, v in values.items()}, add_dataloader_idx=False)
