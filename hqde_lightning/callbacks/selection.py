"""``EnsembleSelection``: after ``fit``, keep an accurate and diverse subset of the members.

A thin Lightning wrapper over :mod:`hqde_lightning.selection` (a QUBO solved by classical
simulated annealing or, for small ensembles, by enumeration).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from hqde_lightning.ensemble import Ensemble, class_logits_batches
from hqde_lightning.misconfiguration import lightning_arguments
from hqde_lightning.selection import anneal, brute_force, build_qubo, exact_k_cost_weight, prediction_similarity, qubo_offset
from hqde_lightning.validation import check_choice, check_int, check_number, check_optional

__all__ = ["EnsembleSelection"]

#: how the QUBO is solved
Solver = Literal["annealing", "brute_force"]
_SOLVERS: tuple[str, ...] = get_args(Solver)


class EnsembleSelection(Callback):
    r"""Chooses which members of ``HQDEStrategy``'s ensemble stay active after ``fit``.

    Once the members are back in the driver, every member predicts the fit's validation set
    and the subset ``x ∈ {0, 1}^N`` minimising

    .. math:: -\sum_i acc_i x_i + \lambda \sum_{i<j} sim_{ij} x_i x_j + \mu\,(\textstyle\sum_i x_i - k)^2

    is kept, where ``acc_i`` is member ``i``'s validation accuracy and ``sim_ij`` the fraction of
    validation samples on which members ``i`` and ``j`` predict the same class (without ``k``
    the last term is ``μ Σ x_i``, a cost per member). The chosen members become
    ``strategy.ensemble``'s active members (the others are kept, inactive); since the ensemble's
    ``active`` mask is a buffer, checkpoints written afterwards with ``trainer.save_checkpoint``
    keep the choice. "QUBO" and "annealing" name an ordinary binary optimisation problem and
    its classical solver; no quantum hardware is involved.

    Validation batches must follow the classification contract: ``(inputs, int targets, ...)``
    with ``module(inputs)`` returning ``(batch, classes)`` logits. :meth:`select` runs the same
    selection on demand for any ensemble and loader.

    Args:
        k: target number of members in [1, N], or ``None`` to let the accuracy/diversity
            trade-off decide.
        diversity_weight: λ >= 0, the penalty per unit of agreement between two chosen members.
        cost_weight: μ >= 0; ``None`` means "exactly ``k`` members" when ``k`` is given and no
            per-member cost otherwise.
        solver: ``"annealing"`` (simulated annealing, any N) or ``"brute_force"`` (exact
            enumeration of all subsets, N <= 20).
        num_reads: independent annealing chains, an integer >= 1.
        num_sweeps: sweeps per annealing chain, an integer >= 1.
        seed: seed of the annealing, or ``None`` for a random one.

    Attributes:
        selected: boolean mask of the chosen members, by position in ``ensemble.members`` (their
            indices in the run are ``ensemble.member_ids``: members with NaN weights are not there);
            ``None`` before a selection.
        member_accuracy: validation accuracy of every member, by position (``None`` before a selection).
        energy: the QUBO energy of the chosen subset (``None`` before a selection).

    Raises:
        InvalidArgument: (a ``MisconfigurationException`` and a ``ValueError``) for an argument
            outside its allowed values (the message names it).
    """

    def __init__(
        self,
        k: int | None = None,
        diversity_weight: float = 0.5,
        cost_weight: float | None = None,
        solver: Solver = "annealing",
        num_reads: int = 64,
        num_sweeps: int = 500,
        seed: int | None = None,
    ) -> None:
        with lightning_arguments("EnsembleSelection"):
            self.k = check_optional(check_int, k, "k", 1)
            self.diversity_weight = check_number(diversity_weight, "diversity_weight", 0)
            self.cost_weight = check_optional(check_number, cost_weight, "cost_weight", 0)
            self.solver = check_choice(solver, "solver", _SOLVERS)
            self.num_reads = check_int(num_reads, "num_reads", 1)
            self.num_sweeps = check_int(num_sweeps, "num_sweeps", 1)
            self.seed = check_optional(check_int, seed, "seed", 0)
        self.selected: np.ndarray | None = None
        self.member_accuracy: np.ndarray | None = None
        self.energy: float | None = None

    # ------------------------------------------------------------------ hooks
    def on_ensemble_fit_end(self, trainer: Trainer, strategy: Any, val_dataloaders: Callable[[], Any] | None) -> None:
        """Selects members on the fit's validation data and activates them (called by ``HQDEStrategy``)."""
        ensemble, loaders = fit_validation_data(trainer, strategy, val_dataloaders, "EnsembleSelection", "chooses members by their validation predictions")
        mask = self.select(ensemble, loaders)
        ensemble.set_active(mask)
        assert self.member_accuracy is not None
        chosen = [ensemble.member_ids[i] for i in np.flatnonzero(mask)]
        rank_zero_info(
            f"EnsembleSelection: kept {len(chosen)} of {mask.size} members {chosen} (validation accuracy of the kept"
            f" members {self.member_accuracy[mask].mean():.4f}, of all members {self.member_accuracy.mean():.4f};"
            f" QUBO energy {self.energy:.4f})"
        )

    # ---------------------------------------------------------------- selection
    def select(self, ensemble: Ensemble, dataloader: Any) -> np.ndarray:
        """Chooses members of ``ensemble`` from their predictions on ``dataloader``.

        Every member is evaluated (active or not), in eval mode without gradients; the
        ensemble's active mask and mode are left as they were.

        Args:
            ensemble: the trained ensemble.
            dataloader: a loader of ``(inputs, targets, ...)`` batches, or a list or dict of them.

        Returns:
            Boolean mask of the chosen members (at least one True); also stored in :attr:`selected`.

        Raises:
            ValueError: when a batch does not follow the classification contract, the loader is
                empty, ``k`` exceeds the ensemble size, or ``solver="brute_force"`` meets more than
                20 members.
        """
        predictions, targets = _predict(ensemble, _as_loaders(dataloader))
        accuracy = (predictions == targets[None, :]).mean(axis=1)
        similarity = prediction_similarity(predictions)
        if self.cost_weight is not None:
            cost_weight = self.cost_weight
        elif self.k is not None:
            cost_weight = exact_k_cost_weight(accuracy, similarity, self.diversity_weight)
        else:
            cost_weight = 0.0
        q = build_qubo(accuracy, similarity, self.k, self.diversity_weight, cost_weight)
        offset = qubo_offset(self.k, cost_weight)
        if self.solver == "annealing":
            result = anneal(q, num_reads=self.num_reads, num_sweeps=self.num_sweeps, seed=self.seed, offset=offset)
            mask, energy = result.best_x, result.best_energy
        else:
            mask, energy = brute_force(q, offset=offset)
        self.selected = np.asarray(mask, dtype=bool).copy()
        self.member_accuracy = accuracy
        self.energy = float(energy)
        return self.selected.copy()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.selected is None:
            return {}
        assert self.member_accuracy is not None
        return {"selected": self.selected.tolist(), "member_accuracy": self.member_accuracy.tolist(), "energy": self.energy}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.selected = np.asarray(state_dict["selected"], dtype=bool)
        self.member_accuracy = np.asarray(state_dict["member_accuracy"], dtype=np.float64)
        self.energy = float(state_dict["energy"])


def fit_validation_data(
    trainer: Trainer, strategy: Any, val_dataloaders: Callable[[], Any] | None, callback: str, purpose: str
) -> tuple[Ensemble, list[Iterable[Any]]]:
    """The strategy's ensemble and the fit's validation loaders, for an ``on_ensemble_fit_end`` hook.

    Raises a ``MisconfigurationException`` naming ``callback`` and what it does with the data
    (``purpose``) when there is no ensemble or no validation data.
    """
    ensemble = getattr(strategy, "ensemble", None)
    if ensemble is None:
        raise MisconfigurationException(f"{callback} runs after an `HQDEStrategy` fit, but the strategy holds no ensemble.")
    loaders = val_dataloaders() if val_dataloaders is not None else None
    module = trainer.lightning_module
    if loaders is None and module is not None and is_overridden("val_dataloader", module):
        loaders = module.val_dataloader()
    if not _as_loaders(loaders):
        raise MisconfigurationException(
            f"{callback} {purpose}, but this fit has no validation data: pass `val_dataloaders` to `trainer.fit`, or define"
            " `val_dataloader()` in your DataModule or LightningModule."
        )
    return ensemble, _as_loaders(loaders)


def _as_loaders(loaders: Any) -> list[Iterable[Any]]:
    """A list of loaders from one loader, a list/tuple of loaders or a dict of them (``None``: none)."""
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)) and all(isinstance(loader, DataLoader) for loader in loaders):
        return list(loaders)
    return [loaders]


def _predict(ensemble: Ensemble, loaders: list[Iterable[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Every member's predicted classes ``(N, S)`` and the targets ``(S,)`` over all batches (ignore labels left out)."""
    previous_active = ensemble.active.clone()
    was_training = ensemble.training
    predictions: list[Tensor] = []
    targets: list[Tensor] = []
    ensemble.eval()
    ensemble.set_active(torch.ones_like(previous_active))
    try:
        with torch.no_grad():
            for logits, target in class_logits_batches(ensemble, loaders, "EnsembleSelection"):
                predictions.append(logits.argmax(dim=-1).cpu())
                targets.append(target.cpu())
    finally:
        ensemble.set_active(previous_active)
        ensemble.train(was_training)
    if not predictions:
        raise ValueError("EnsembleSelection got an empty validation loader: it needs at least one batch.")
    return torch.cat(predictions, dim=1).numpy(), torch.cat(targets).numpy()
