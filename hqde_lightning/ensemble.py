"""The trained ensemble as an ``nn.Module``: every member plus the rule that combines them.

Combination rules (``combine=``), applied to every tensor leaf of the members' outputs (a
tensor, or tensors inside tuples, lists and dicts):

* ``"probability"``: every floating leaf is class logits over its last dimension; the ensemble
  returns the log of the weighted mean of the members' softmax probabilities (``softmax`` of it
  gives the mean probabilities exactly, ``argmax`` gives the ensemble's class, ``cross_entropy``
  on it is the ensemble's negative log-likelihood).
* ``"mean"``: weighted mean of the raw outputs (regression, embeddings, anything else).

Under every rule, an integer or boolean leaf (a predicted class, a flag) is the members'
weighted majority vote (:func:`weighted_vote`), never one member's.
* ``"auto"`` (default, :class:`AutoCombiner`): the leaf that holds class logits is combined as
  probabilities, every other leaf is averaged. A leaf holds class logits only when evaluation
  showed it: a batch follows the classification contract ``(inputs, target, ...)`` with an
  integer ``target`` of shape ``(batch,)`` (see :func:`hqde_lightning.evaluation.classification_batch`)
  and the leaf is a floating ``(batch, classes)`` tensor with ``classes > max(target)`` over every
  target seen so far (of several such leaves, the one with the fewest columns, the first on a
  tie). Nothing else is guessed: without such targets every leaf is averaged.

  ``predict`` batches usually carry no targets: ``"auto"`` then uses what ``validate``/``test``
  of the same ensemble established (it is kept in ``strategy.ensemble``, also when a checkpoint
  is loaded into the same strategy, and in whole-ensemble checkpoints written after it:
  :func:`saved_combiner`), and averages otherwise. To get probabilities without
  evaluating first, pass ``combine="probability"`` (all leaves), or
  ``AutoCombiner(probability_leaf="[0]")`` for one leaf of a tuple/dict output.

Examples with ``combine="auto"`` (``y``: integer class targets in evaluation batches):

* logits ``(batch, 10)`` after ``validate``/``test`` on ``(x, y)`` batches: the log of the mean
  member probabilities; in a ``predict`` before any evaluation: the mean of the logits;
* a 3-output regression ``(batch, 3)`` trained on float targets: the mean of the outputs;
* ``(logits, features)`` with ``features`` of shape ``(batch, 32)``: the logits as probabilities
  (32 columns are more than the logits' 10, so ``features`` is not taken for them), the
  features averaged; the same for a dict, by key.

Members whose weights hold NaN or Inf are left out when an ensemble is built from saved states
(:meth:`Ensemble.from_states`, used after ``fit`` and when loading checkpoints): a warning names
them and :attr:`Ensemble.excluded_members` lists them.

Temperature scaling (:meth:`Ensemble.calibrate`): the ensemble's class probabilities are
softmax(log p̄ / T), with p̄ = Σ_i w_i softmax(z_i) the weighted mean of the member probabilities
and one temperature T fitted on held-out data ("pool, then calibrate"). T scales the combined
distribution, the one whose NLL and ECE are reported, and never the members: the predicted
class (so the accuracy) does not change, and T = 1 is the uncalibrated ensemble. It applies to
:meth:`Ensemble.predict_proba`, :meth:`Ensemble.predict_with_uncertainty` (``probs`` and
``entropy``; ``mutual_information`` and ``member_probs`` stay the members' own), the built-in
``validate``/``test`` metrics, and in ``forward`` to every leaf the combiner combines as class
probabilities (``combine="probability"``, or the class-logits leaf of ``"auto"``; ``"mean"``
outputs are left alone).

Member weights default to uniform; the superposition rule sets them from member confidence.
Members are evaluated together with ``torch.func.vmap`` over stacked parameters when the
module allows it, and one after another otherwise.
"""

from __future__ import annotations

import copy
import pickle
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves, tree_map, tree_map_with_path

from hqde_lightning.attributes import differing, plain_attributes
from hqde_lightning.codec import load_buffers
from hqde_lightning.validation import ArgumentTypeError, registry, resolve
from hqde_lightning.uncertainty import check_temperature, combine_probabilities, fit_temperature, log_mean_probs, temper, uncertainty_decomposition, widened

__all__ = [
    "COMBINERS",
    "AutoCombiner",
    "ClassLogitsLeaf",
    "Combiner",
    "Ensemble",
    "MeanCombiner",
    "ProbabilityCombiner",
    "class_logits_batches",
    "combine_name",
    "is_class_target",
    "is_stacked_logits",
    "leaf_paths",
    "non_finite_members",
    "resolve_combiner",
    "saved_combiner",
    "weighted_vote",
]


class Combiner(ABC):
    """Combines stacked member outputs of shape ``(num_members, ...)`` with per-member weights."""

    name: str = ""

    @abstractmethod
    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        """Returns the combined output (the member axis removed)."""

    def combine_leaf(self, path: str, outputs: Tensor, weights: Tensor) -> Tensor:
        """Combines one tensor leaf of a (possibly nested) output; ``path`` names the leaf
        (``""`` for a bare tensor, ``"[0]"``, ``"['logits']"``...). Default: ``self(outputs, weights)``."""
        return self(outputs, weights)

    def observe_targets(self, outputs: Any, target: Tensor) -> None:
        """Evaluation hands over each forward call's stacked member outputs with the batch's
        integer class targets ``(batch,)``; rules that learn from them override this (default: nothing)."""

    def combines_as_probabilities(self, path: str, outputs: Tensor) -> bool:
        """Whether :meth:`combine_leaf` returns the log of combined class probabilities for this
        leaf (then the ensemble's temperature applies to it). Default: ``False``."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _weighted_mean(outputs: Tensor, weights: Tensor) -> Tensor:
    shape = (-1,) + (1,) * (outputs.dim() - 1)
    return (outputs * weights.to(outputs).reshape(shape)).sum(0)


def weighted_vote(outputs: Tensor, weights: Tensor) -> Tensor:
    """Per element, the value of the members' ``outputs`` ``(members, ...)`` that the largest total weight of members gave
    (their majority vote; on a tie, the value of the first of the tied members)."""
    w = weights.to(device=outputs.device, dtype=torch.float64).reshape((-1,) + (1,) * (outputs.dim() - 1))
    agreeing = torch.stack([((outputs == outputs[m]) * w).sum(0) for m in range(outputs.shape[0])])
    return outputs.gather(0, agreeing.argmax(0, keepdim=True)).squeeze(0)  # (argmax: the first of equal maxima)


class MeanCombiner(Combiner):
    """Weighted mean of raw outputs; integer and boolean outputs (a predicted class, a flag): the weighted majority vote."""

    name = "mean"

    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        if not (torch.is_floating_point(outputs) or torch.is_complex(outputs)):
            return weighted_vote(outputs, weights)
        return _weighted_mean(outputs, weights)


class ProbabilityCombiner(Combiner):
    """Log of the weighted mean of member softmax probabilities over the last dimension; integer and boolean outputs: the
    weighted majority vote."""

    name = "probability"

    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        if not torch.is_floating_point(outputs):
            return weighted_vote(outputs, weights)
        return log_mean_probs(widened(outputs), weights).to(outputs.dtype)

    def combines_as_probabilities(self, path: str, outputs: Tensor) -> bool:
        return torch.is_floating_point(outputs)


def is_stacked_logits(leaf: Any) -> bool:
    """Whether ``leaf`` has the shape class logits have once stacked: a floating tensor of shape ``(members, batch, classes >= 2)``."""
    return isinstance(leaf, Tensor) and torch.is_floating_point(leaf) and leaf.dim() == 3 and leaf.shape[-1] >= 2


def is_class_target(target: Any) -> bool:
    """Whether ``target`` can be integer class indices of a batch: an integer tensor of shape ``(batch,)``."""
    return isinstance(target, Tensor) and target.dim() == 1 and not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)


def leaf_paths(outputs: Any) -> list[tuple[str, Any]]:
    """Every leaf of a nested output with its path (``""``, ``"[0]"``, ``"['logits']"``, ``"[1]['a']"``...)."""
    leaves, _ = tree_flatten_with_path(outputs)
    return [(keystr(path), leaf) for path, leaf in leaves]


class ClassLogitsLeaf:
    """Which leaf of the members' outputs holds class logits, learnt from integer class targets.

    A leaf qualifies when it is a floating ``(members, batch, classes)`` tensor whose ``batch``
    equals the targets' and whose ``classes`` (>= 2) exceed every target seen so far; of several,
    the one with the fewest classes (the first on a tie) is kept.

    Attributes:
        path: the chosen leaf's path (see :func:`leaf_paths`), ``None`` while none qualified.
        num_classes: its number of columns (``None`` when ``path`` was given, not learnt).
        max_target: the largest target seen (``-1`` before any).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.num_classes: int | None = None
        self.max_target = -1

    def observe(self, outputs: Any, target: Tensor) -> None:
        """Updates the choice from one forward call's stacked outputs and its batch's targets
        (ignored unless they are integer class indices of shape ``(batch,)``)."""
        if not is_class_target(target) or not bool((target >= 0).any()):
            return
        self.max_target = max(self.max_target, int(target.max()))  # (negative targets are ignore labels, as -100 for `F.cross_entropy`)
        candidates = [(int(leaf.shape[-1]), order, path) for order, (path, leaf) in enumerate(self.qualifying(outputs, target))]
        if candidates:
            self.num_classes, _, self.path = min(candidates)
        elif self.num_classes is not None and self.num_classes <= self.max_target:
            self.path, self.num_classes = None, None  # larger targets showed the earlier choice was no class logits

    def qualifying(self, outputs: Any, target: Tensor) -> list[tuple[str, Tensor]]:
        """The leaves of ``outputs`` (stacked) that can hold class logits for ``target``'s batch, given the targets seen so far."""
        return [
            (path, leaf)
            for path, leaf in leaf_paths(outputs)
            if is_stacked_logits(leaf) and leaf.shape[1] == target.shape[0] and leaf.shape[-1] > self.max_target
        ]

    def matches(self, path: str, leaf: Any) -> bool:
        """Whether ``leaf`` (stacked) at ``path`` is the class-logits leaf."""
        return (
            self.path is not None
            and path == self.path
            and is_stacked_logits(leaf)
            and (self.num_classes is None or leaf.shape[-1] == self.num_classes)
        )

    def state_dict(self) -> dict[str, Any]:
        """What it learnt (kept in whole-ensemble checkpoints, so that a loaded ensemble combines as the saved one did)."""
        return {"path": self.path, "num_classes": self.num_classes, "max_target": self.max_target}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.path, self.num_classes, self.max_target = state.get("path"), state.get("num_classes"), int(state.get("max_target", -1))

    def select(self, outputs: Any) -> Tensor | None:
        """The class-logits leaf of ``outputs`` (stacked), if it has one."""
        return next((leaf for path, leaf in leaf_paths(outputs) if self.matches(path, leaf)), None)

    def __repr__(self) -> str:
        return f"ClassLogitsLeaf(path={self.path!r}, num_classes={self.num_classes})"


class AutoCombiner(Combiner):
    """Class logits as probabilities, every other output averaged (the rule: see the module docstring).

    Args:
        probability_leaf: the output leaf to combine as class logits from the start: ``""`` for
            a bare tensor output, ``"[0]"`` for the first element of a tuple, ``"['logits']"``
            for a dict entry. ``None`` (default): learnt from the integer class targets that
            evaluation sees (:meth:`observe_targets`); until then every leaf is averaged.
    """

    name = "auto"

    def __init__(self, probability_leaf: str | None = None) -> None:
        if probability_leaf is not None and not isinstance(probability_leaf, str):
            raise ArgumentTypeError("probability_leaf", probability_leaf, "None or a leaf path such as '', '[0]' or \"['logits']\"")
        self.logits = ClassLogitsLeaf(probability_leaf)
        self._fixed = probability_leaf is not None
        self._probability = ProbabilityCombiner()
        self._mean = MeanCombiner()

    def observe_targets(self, outputs: Any, target: Tensor) -> None:
        if not self._fixed:
            self.logits.observe(outputs, target)

    def combine_leaf(self, path: str, outputs: Tensor, weights: Tensor) -> Tensor:
        if self.logits.matches(path, outputs):
            return self._probability(outputs, weights)
        return self._mean(outputs, weights)

    def combines_as_probabilities(self, path: str, outputs: Tensor) -> bool:
        return self.logits.matches(path, outputs)

    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        return self.combine_leaf("", outputs, weights)

    def __repr__(self) -> str:
        return f"AutoCombiner(probability_leaf={self.logits.path!r})"


COMBINERS: dict[str, type[Combiner]] = registry(AutoCombiner, ProbabilityCombiner, MeanCombiner)


def resolve_combiner(combine: str | Combiner) -> Combiner:
    """Returns a :class:`Combiner` for a registered name or an instance (``ValueError`` lists the names)."""
    return resolve(combine, "combine", Combiner, COMBINERS)


def combine_name(combiner: Combiner) -> str:
    """What a checkpoint records of ``combiner``: its registered name (:data:`COMBINERS`), or for a rule of yours
    its class's import path (not a registered name: a loaded ensemble then needs it passed again)."""
    if COMBINERS.get(combiner.name) is type(combiner):
        return combiner.name
    return f"{type(combiner).__module__}.{type(combiner).__qualname__}"


def saved_combiner(combine: str | Combiner, section: Mapping[str, Any]) -> Combiner:
    """``combine`` as the ensemble a whole-ensemble checkpoint's ``section`` was saved from combined: an ``"auto"`` rule that
    has not learnt which output holds class logits takes what the saved one had learnt (``section["class_logits"]``)."""
    combiner = copy.deepcopy(resolve_combiner(combine))
    learnt = section.get("class_logits")
    if isinstance(combiner, AutoCombiner) and combiner.logits.path is None and learnt and learnt.get("path") is not None:
        combiner.logits.load_state_dict(learnt)
    return combiner


def _listed(values: Any) -> Any:
    """``values`` for an error message (a tensor as a list)."""
    return values.tolist() if isinstance(values, Tensor) else values


def non_finite_members(states: Sequence[Mapping[str, Any]]) -> list[int]:
    """Positions of the state dicts with a NaN or Inf in a floating-point or complex tensor."""
    return [
        i
        for i, state in enumerate(states)
        if any(
            not bool(torch.isfinite(t).all())
            for t in (torch.as_tensor(v) for v in state.values())
            if torch.is_floating_point(t) or torch.is_complex(t)
        )
    ]


def _device_type(args: Any) -> str:
    """The device type of the first tensor in ``args`` (``"cpu"`` when none holds one)."""
    return next((leaf.device.type for leaf in tree_leaves(args) if isinstance(leaf, Tensor)), "cpu")


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stack(outputs: Sequence[Any]) -> Any:
    return tree_map(lambda *leaves: torch.stack(leaves) if isinstance(leaves[0], Tensor) else leaves[0], outputs[0], *outputs[1:])


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``, through pickle where ``copy.deepcopy`` refuses it: torch's hook-based
    ``torch.nn.utils.weight_norm``/``spectral_norm`` keep a computed (non-leaf) weight, which deepcopy does not copy."""
    try:
        return copy.deepcopy(module)
    except RuntimeError:
        return pickle.loads(pickle.dumps(module))


class Ensemble(nn.Module):
    """All members of an HQDE ensemble and the rule that combines their outputs.

    Args:
        members: the member modules (same architecture).
        weights: per-member combination weights (normalised over active members);
            uniform when ``None``.
        combine: a name from :data:`COMBINERS` or a :class:`Combiner` (an instance is copied,
            so what an :class:`AutoCombiner` learns in evaluation belongs to this ensemble).
        active: which members take part in predictions (all when ``None``). Inactive
            members are kept, e.g. after member selection.
        vectorize: how members are evaluated: ``True`` in one ``torch.func.vmap`` call over their stacked
            weights, ``False`` one after another, ``"auto"`` (default) the faster of the two, timed at
            the first evaluation on each device type (vmap is faster on GPUs; on CPUs a vectorised
            convolution can be twice as slow). Members vmap cannot run are evaluated one after another,
            and so are members with trainable parameters while gradients are on (vmap runs on
            detached stacked copies, so no gradient would reach them).
        member_ids: each member's index in the run that trained it (``0..n-1`` when ``None``);
            differs from the position when members were left out. Metrics are named after it.
        temperature: the temperature of the combined class probabilities (a buffer; see
            :meth:`calibrate`), 1 for none.

    Attributes:
        excluded_members: indices (in the training run) of members left out by
            :meth:`from_states` because their weights held NaN or Inf.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float] | Tensor | None = None,
        combine: str | Combiner = "auto",
        active: Sequence[bool] | Tensor | None = None,
        vectorize: Literal["auto"] | bool = "auto",
        member_ids: Sequence[int] | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("`members` must hold at least one module")
        self.members = nn.ModuleList(members)
        n = len(members)
        self.register_buffer("weights", torch.full((n,), 1.0 / n, dtype=torch.float64))
        self.register_buffer("active", torch.ones(n, dtype=torch.bool))
        if weights is not None:
            self.set_weights(weights)
        if active is not None:
            self.set_active(active)
        self.register_buffer("temperature", torch.tensor(check_temperature(temperature), dtype=torch.float64))
        self.combiner = copy.deepcopy(resolve_combiner(combine))
        if not (isinstance(vectorize, bool) or vectorize == "auto"):
            raise ValueError(f"`vectorize`: {vectorize!r} is not known; choose one of ['auto', True, False]")
        self.vectorize = vectorize
        #: ``vectorize="auto"``'s choice per device type (``"cpu"``, ``"cuda"``...): whether vmap was the faster
        self.vmap_is_faster: dict[str, bool] = {}
        self.member_ids = list(range(n)) if member_ids is None else [int(i) for i in member_ids]
        if len(self.member_ids) != n:
            raise ValueError(f"`member_ids` needs one entry per member ({n}), got {self.member_ids}")
        self.excluded_members: list[int] = []
        #: the members' plain attributes that differ (:meth:`_attributes_differ`), once evaluated
        self._differing: list[str] | None = None

    @property
    def num_members(self) -> int:
        return len(self.members)

    def get_extra_state(self) -> dict[str, Any]:
        """What the ``"auto"`` rule learnt (which output holds class logits), kept in :meth:`state_dict` with the buffers."""
        return {"class_logits": self.combiner.logits.state_dict() if isinstance(self.combiner, AutoCombiner) else None}

    def set_extra_state(self, state: Any) -> None:
        learnt = state.get("class_logits") if isinstance(state, Mapping) else None
        if isinstance(self.combiner, AutoCombiner) and learnt is not None:
            self.combiner.logits.load_state_dict(learnt)

    def active_indices(self) -> list[int]:
        """Positions (in :attr:`members`) of the active members."""
        return [i for i in range(self.num_members) if bool(self.active[i])]

    def active_member_ids(self) -> list[int]:
        """Training-run indices (:attr:`member_ids`) of the active members."""
        return [self.member_ids[i] for i in self.active_indices()]

    def active_weights(self) -> Tensor:
        w = self.weights[self.active].clamp_min(0)
        total = w.sum()
        return w / total if bool(total > 0) else torch.full_like(w, 1.0 / w.numel())

    def set_active(self, active: Sequence[bool] | Tensor) -> None:
        """Chooses which members take part in predictions (at least one)."""
        mask = torch.as_tensor(active, dtype=torch.bool, device=self.active.device)
        if mask.shape != self.active.shape or not bool(mask.any()):
            raise ValueError(f"`active` needs {self.num_members} booleans (one per member) with at least one True, got {_listed(active)}")
        self.active.copy_(mask)

    def set_weights(self, weights: Sequence[float] | Tensor) -> None:
        """Sets the per-member combination weights (non-negative, one per member)."""
        w = torch.as_tensor(weights, dtype=torch.float64, device=self.weights.device)
        if w.shape != self.weights.shape or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"`weights` needs {self.num_members} finite non-negative numbers (one per member), got {_listed(weights)}")
        self.weights.copy_(w)

    def member_outputs(self, *args: Any, **kwargs: Any) -> Any:
        """Every active member's output, stacked on a new leading axis (``(num_active, ...)``)."""
        members = [self.members[i] for i in self.active_indices()]
        loop = lambda: _stack([m(*args, **kwargs) for m in members])  # noqa: E731
        if self.vectorize is False or len(members) < 2 or self.training or kwargs or self._attributes_differ() or self._needs_gradients():
            return loop()
        device = _device_type(args)
        if self.vectorize == "auto" and device not in self.vmap_is_faster:
            return self._time_ways(members, args, loop, device)
        if self.vectorize is True or self.vmap_is_faster[device]:
            stacked = self._vmap_outputs(members, args)
            if stacked is not None:
                return stacked
        return loop()

    def _needs_gradients(self) -> bool:
        """Whether gradients should reach the members' parameters (vmap runs on detached stacked copies of them)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.members.parameters())

    def _attributes_differ(self) -> bool:
        """Whether ``members``' plain attributes that are values (not lists or dicts, such as a history) differ: vmap would
        run them all with the first member's (an attribute your ``__init__`` draws at random, a temperature). Checked at
        the first evaluation; the members are then evaluated looped, as the info line says."""
        if self._differing is None:
            self._differing = differing([plain_attributes(m) for m in self.members], containers=False)
            if self._differing:
                rank_zero_info(f"Ensemble: evaluating the members one after another: their attributes {self._differing} differ, and torch.func.vmap would run every member with the first one's.")
        return bool(self._differing)

    def _time_ways(self, members: Sequence[nn.Module], args: tuple[Any, ...], loop: Callable[[], Any], device: str) -> Any:
        """``vectorize="auto"`` on ``device`` for the first time: times one evaluation each way and keeps the faster.

        vmap runs once untimed first (it sets itself up, and shows whether it can run the members at all);
        then the loop and vmap are timed once each. This first evaluation costs three.
        """
        if self._vmap_outputs(members, args) is None:
            return loop()
        outputs, seconds = [], []
        for run in (loop, lambda: self._vmap_outputs(members, args)):
            _synchronize(device)
            started = time.perf_counter()
            outputs.append(run())
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
        looped, vmapped = seconds
        self.vmap_is_faster[device] = vmapped <= looped
        rank_zero_info(
            f"Ensemble: vectorize='auto' timed {len(members)} members on {device}: {1000 * looped:.1f} ms looped, {1000 * vmapped:.1f} ms"
            f" with torch.func.vmap; evaluating {'with torch.func.vmap' if vmapped <= looped else 'looped'}."
        )
        # the kept way's outputs: they can differ from the other way's in the last bits, and later evaluations give these
        return outputs[1] if self.vmap_is_faster[device] else outputs[0]

    def _vmap_outputs(self, members: Sequence[nn.Module], args: tuple[Any, ...]) -> Any:
        params, buffers = torch.func.stack_module_state(list(members))
        base = copy_module(members[0]).to("meta")

        def call(p: dict[str, Tensor], b: dict[str, Tensor], *inputs: Any) -> Any:
            return torch.func.functional_call(base, (p, b), inputs)

        try:
            return torch.func.vmap(call, in_dims=(0, 0) + (None,) * len(args))(params, buffers, *args)
        except Exception as err:  # modules vmap cannot trace (data-dependent control flow, .item(), in-place buffers)
            self.vectorize = False
            rank_zero_info(f"Ensemble: evaluating the members one after another: torch.func.vmap cannot run them ({type(err).__name__}: {err}).")
            return None

    def combine_outputs(self, outputs: Any) -> Any:
        """Combines what :meth:`member_outputs` returned (tensor by tensor for nested outputs);
        leaves combined as class probabilities get the ensemble's temperature."""
        weights = self.active_weights()

        def combine(path: Any, leaf: Any) -> Any:
            if not isinstance(leaf, Tensor):
                return leaf
            out = self.combiner.combine_leaf(keystr(path), leaf, weights)
            return temper(widened(out), self.temperature).to(out.dtype) if self.combiner.combines_as_probabilities(keystr(path), leaf) else out

        return tree_map_with_path(combine, outputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The combined output of the active members (see the module docstring for the rules)."""
        return self.combine_outputs(self.member_outputs(*args, **kwargs))

    def class_logits(self, outputs: Any, user: str = "predict_proba") -> Tensor:
        """The class logits among the members' stacked ``outputs``: the output itself when it is one
        ``(members, batch, classes)`` tensor, else the leaf the ``"auto"`` rule holds as class logits
        (named with ``AutoCombiner(probability_leaf=...)``, or learnt in ``validate``/``test`` from
        integer targets). ``ValueError`` (naming ``user``) when there is none."""
        if is_stacked_logits(outputs):
            return outputs
        leaf = self.combiner.logits.select(outputs) if isinstance(self.combiner, AutoCombiner) else None
        if leaf is not None:
            return leaf
        found = ", ".join(f"{path or 'output'}: {tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__}" for path, leaf in leaf_paths(outputs))
        raise ValueError(
            f"{user} needs class logits: members that return a (batch, classes) tensor, or an output with one leaf known to hold"
            " them (`combine=AutoCombiner(probability_leaf='[0]')` names it; `trainer.validate`/`test` with integer targets"
            f" learns it). The members' stacked outputs are {found}."
        )

    @torch.no_grad()
    def predict_proba(self, *args: Any, **kwargs: Any) -> Tensor:
        """The ensemble's class probabilities softmax(log p̄ / T) of the class logits (:meth:`class_logits`; T: :attr:`temperature`)."""
        return combine_probabilities(self.class_logits(self.member_outputs(*args, **kwargs)), self.active_weights(), self.temperature)[1]

    @torch.no_grad()
    def predict_with_uncertainty(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """:meth:`predict_proba`'s ``probs`` with ``entropy``, ``mutual_information`` and ``member_probs``
        (see :func:`hqde_lightning.uncertainty.uncertainty_decomposition`)."""
        logits = self.class_logits(self.member_outputs(*args, **kwargs), "predict_with_uncertainty")
        return uncertainty_decomposition(logits, self.active_weights(), self.temperature)

    def calibrate(self, loader: Iterable[Any]) -> float:
        """Fits, stores and returns the temperature T minimising the NLL of softmax(log p̄ / T) on
        ``loader``'s ``(inputs, int targets, ...)`` batches (held-out data), by LBFGS on log T from
        the uncalibrated ensemble; T stays 1 when no T lowers that NLL. Rerun it after changing
        the active members or their weights."""
        log_probs, target = _log_mean_probs_over(self, loader)
        self.temperature.fill_(fit_temperature(log_probs, target))
        return float(self.temperature)

    @classmethod
    def from_states(
        cls,
        template: nn.Module,
        states: Sequence[Mapping[str, Any]],
        weights: Sequence[float] | Tensor | None = None,
        active: Sequence[bool] | Tensor | None = None,
        member_ids: Sequence[int] | None = None,
        buffers: Sequence[Mapping[str, Any]] | None = None,
        attributes: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Ensemble:
        """Builds an ensemble of deep copies of ``template``, member ``i`` loaded with ``states[i]`` (and ``buffers[i]``,
        buffers its state dict leaves out, by name: those a fit left on member ``i``'s module; and copies of
        ``attributes[i]``, plain attributes set on it by name).

        States holding NaN or Inf leave the ensemble: a warning names them, ``weights``/``active``
        (one entry per state) lose their entries, and ``excluded_members`` lists their
        ``member_ids`` (``0..len(states)-1`` when ``None``). Other keyword arguments go to the
        constructor.

        Raises:
            ValueError: when every state holds NaN or Inf (there is no ensemble to build).
        """
        ids = list(range(len(states))) if member_ids is None else [int(i) for i in member_ids]
        bad = set(non_finite_members(states))
        excluded = [ids[i] for i in sorted(bad)]
        if bad and len(bad) == len(states):
            raise ValueError(
                f"the weights of every member ({excluded}) hold NaN or Inf: there is no ensemble to build. A loss that is"
                " NaN from the first steps (learning rate too high, NaN/Inf in the data, log of 0) usually causes this."
            )
        if bad:
            warnings.warn(
                f"members {excluded} hold NaN or Inf weights and are left out of the ensemble (`excluded_members`);"
                f" it keeps members {[ids[i] for i in range(len(states)) if i not in bad]}.",
                UserWarning,
                stacklevel=2,
            )
        keep = [i for i in range(len(states)) if i not in bad]
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)[keep]
        if active is not None:
            active = torch.as_tensor(active, dtype=torch.bool)[keep]
        members = []
        for i in keep:
            member = copy_module(template)
            member.__dict__.pop("forward", None)  # never inherit an evaluation-time forward patch
            member.load_state_dict({k: torch.as_tensor(v) for k, v in states[i].items()})
            load_buffers(member, buffers[i] if buffers is not None else {})
            vars(member).update(copy.deepcopy(attributes[i]) if attributes is not None else {})
            members.append(member)
        ensemble = cls(members, weights=weights, active=active, member_ids=[ids[i] for i in keep], **kwargs)
        ensemble.excluded_members = excluded
        return ensemble

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str,
        module_class: type[nn.Module],
        map_location: Any = "cpu",
        weights_only: bool = True,
        combine: str | Combiner | None = None,
        **module_kwargs: Any,
    ) -> Ensemble:
        """Rebuilds the ensemble saved by ``HQDEStrategy`` for inference, without Ray.

        Args:
            checkpoint_path: a checkpoint written during or after an ``HQDEStrategy`` fit.
            module_class: the ``LightningModule`` class that was trained. Built with
                ``module_class.load_from_checkpoint`` (saved hyper-parameters are honoured);
                a plain ``nn.Module`` class is built with ``module_class(**module_kwargs)``.
            map_location: passed to ``torch.load``.
            weights_only: ``True`` (default) loads tensors and plain values only and refuses
                any other pickled object; ``False`` also loads e.g. hyper-parameters of custom
                types -- only for files from a source you trust, since unpickling can run code.
            combine: how the loaded ensemble combines its members' outputs; ``None`` (default):
                as the saved one did. An ensemble that combined with a :class:`Combiner` of your
                own needs it passed here (the file names its class; without it, ``"auto"`` is
                used, with a warning).
            **module_kwargs: extra constructor arguments.

        Members whose saved weights hold NaN or Inf are left out (see :meth:`from_states`).

        Raises:
            pickle.UnpicklingError: ``weights_only=True`` refused an object in the file.
            RuntimeError: the file is damaged or is not a checkpoint, or a member's weights do
                not match the checksum written with them.
        """
        from hqde_lightning.checkpoint import HQDE_KEY, ensemble_entries, load_checkpoint_file

        checkpoint = load_checkpoint_file(checkpoint_path, map_location=map_location, weights_only=weights_only)
        if HQDE_KEY not in checkpoint:
            raise ValueError(f"{checkpoint_path!r} holds no HQDE ensemble (no {HQDE_KEY!r} entry); was it written by HQDEStrategy?")
        section = checkpoint[HQDE_KEY]
        loader = getattr(module_class, "load_from_checkpoint", None)
        if loader is not None:
            template = loader(checkpoint_path, map_location=map_location, weights_only=weights_only, **module_kwargs)
        else:
            template = module_class(**module_kwargs)
        template.eval()
        saved = section.get("combine", "auto")
        if combine is None and saved not in COMBINERS:
            warnings.warn(
                f"{checkpoint_path!r} holds an ensemble that combined its members with {saved}, a rule of yours: pass it as"
                f" `Ensemble.load_from_checkpoint(..., combine={saved.rpartition('.')[2]}(...))` to combine the same way;"
                " this one combines with 'auto'.",
                UserWarning,
                stacklevel=2,
            )
        states, active, extras = ensemble_entries(checkpoint)
        ensemble = cls.from_states(
            template,
            states,
            weights=section.get("weights"),
            active=active,
            buffers=[e["buffers"] for e in extras],
            attributes=[e["attributes"] for e in extras],
            combine=saved_combiner(combine if combine is not None else saved if saved in COMBINERS else "auto", section),
            temperature=float(section.get("temperature", 1.0)),
        )
        return ensemble.eval()

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, member_ids={self.member_ids}, active={self.active_indices()}, combiner={self.combiner!r}, temperature={float(self.temperature):.4g}"


@torch.no_grad()
def _log_mean_probs_over(ensemble: Ensemble, loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """log p̄ (uncalibrated) of ``ensemble``'s active members over every batch of ``loader``, and the targets
    (:func:`class_logits_batches`: ignore labels are left out). Runs in eval mode and restores the mode."""
    was_training = ensemble.training
    log_probs: list[Tensor] = []
    targets: list[Tensor] = []
    ensemble.eval()
    try:
        for logits, target in class_logits_batches(ensemble, [loader], "calibration"):
            log_probs.append(log_mean_probs(widened(logits), ensemble.active_weights()).cpu())
            targets.append(target.cpu())
    finally:
        ensemble.train(was_training)
    if not targets:
        raise ValueError("calibration got an empty loader: it needs at least one batch")
    return torch.cat(log_probs), torch.cat(targets)


def class_logits_batches(ensemble: Ensemble, loaders: Iterable[Iterable[Any]], user: str) -> Iterator[tuple[Tensor, Tensor]]:
    """The active members' stacked class logits ``(members, batch, classes)`` for every ``(inputs, int targets, ...)``
    batch of ``loaders``, with its targets; inputs with a negative target (an ignore label, as -100 for
    ``F.cross_entropy``) are left out, as the built-in metrics leave them out. The ensemble's ``"auto"``
    rule learns from these targets which output holds class logits, as in ``trainer.test``.

    Inputs are moved to the members' device, and floating ones cast to the members' dtype, as
    Lightning's precision plugin does in ``trainer.test`` (``"64-true"``, ``"bf16-true"``).
    Call it without gradients and in the mode you want. ``user`` names the caller in the
    ``ValueError`` raised for a batch or an output that does not follow this contract.
    """
    device = ensemble.weights.device
    dtype = next((p.dtype for p in ensemble.members.parameters() if p.is_floating_point()), None)

    def to_members(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        return value.to(device=device, dtype=dtype) if dtype is not None and value.is_floating_point() else value.to(device)

    for loader in loaders:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"{user} needs batches `(inputs, targets, ...)` with integer class targets of shape (batch,); got a {type(batch).__name__}")
            target = batch[1]
            if not is_class_target(target):
                got = f"of dtype {target.dtype} and shape {tuple(target.shape)}" if isinstance(target, Tensor) else f"of type {type(target).__name__}"
                raise ValueError(f"{user} needs integer class targets of shape (batch,) as the second item of each batch; got targets {got}")
            outputs = ensemble.member_outputs(tree_map(to_members, batch[0]))
            ensemble.combiner.observe_targets(outputs, target)  # the "auto" rule learns which output holds class logits, as in `test`
            logits = ensemble.class_logits(outputs, user)
            if logits.shape[1] != target.shape[0]:
                raise ValueError(f"{user}: the members' class logits have shape {tuple(logits.shape)} for a batch of {target.shape[0]} targets")
            keep = target >= 0
            yield logits[:, keep.to(logits.device)], target[keep]
