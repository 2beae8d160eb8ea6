"""The trained ensemble as an ``nn.Module``: every member plus the rule that combines them.

Combination rules (``combine=``):

* ``"probability"``: member outputs are class logits; the ensemble returns the log of the
  weighted mean of the members' softmax probabilities (``softmax`` of it gives the mean
  probabilities exactly, ``argmax`` gives the ensemble's class, ``cross_entropy`` on it is the
  ensemble's negative log-likelihood).
* ``"mean"``: weighted mean of the raw outputs (regression, embeddings, anything else).
* ``"auto"`` (default): ``"probability"`` for floating outputs of shape ``(batch, classes)``
  with at least two classes, ``"mean"`` otherwise.

Member weights default to uniform; the superposition rule sets them from member confidence.
Members are evaluated together with ``torch.func.vmap`` over stacked parameters when the
module allows it, and one after another otherwise.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["COMBINERS", "Combiner", "Ensemble", "MeanCombiner", "ProbabilityCombiner", "AutoCombiner", "resolve_combiner"]


class Combiner(ABC):
    """Combines stacked member outputs of shape ``(num_members, ...)`` with per-member weights."""

    name: str = ""

    @abstractmethod
    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        """Returns the combined output (the member axis removed)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _weighted_mean(outputs: Tensor, weights: Tensor) -> Tensor:
    shape = (-1,) + (1,) * (outputs.dim() - 1)
    return (outputs * weights.to(outputs).reshape(shape)).sum(0)


class MeanCombiner(Combiner):
    """Weighted mean of raw outputs."""

    name = "mean"

    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        if not torch.is_floating_point(outputs):
            return outputs[0]
        return _weighted_mean(outputs, weights)


class ProbabilityCombiner(Combiner):
    """Log of the weighted mean of member softmax probabilities over the last dimension."""

    name = "probability"

    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        log_probs = torch.log_softmax(outputs.float(), dim=-1)
        log_w = torch.log(weights.to(log_probs).clamp_min(torch.finfo(torch.float32).tiny))
        shape = (-1,) + (1,) * (outputs.dim() - 1)
        return torch.logsumexp(log_probs + log_w.reshape(shape), dim=0).to(outputs.dtype)


class AutoCombiner(Combiner):
    """``ProbabilityCombiner`` for ``(batch, classes >= 2)`` floating outputs, ``MeanCombiner`` otherwise."""

    name = "auto"

    def __init__(self) -> None:
        self._probability = ProbabilityCombiner()
        self._mean = MeanCombiner()

    def __call__(self, outputs: Tensor, weights: Tensor) -> Tensor:
        if torch.is_floating_point(outputs) and outputs.dim() == 3 and outputs.shape[-1] >= 2:
            return self._probability(outputs, weights)
        return self._mean(outputs, weights)


COMBINERS: dict[str, type[Combiner]] = {c.name: c for c in (AutoCombiner, ProbabilityCombiner, MeanCombiner)}


def resolve_combiner(combine: str | Combiner) -> Combiner:
    """Returns a :class:`Combiner` for a registered name or an instance (``ValueError`` lists the names)."""
    if isinstance(combine, Combiner):
        return combine
    if isinstance(combine, str) and combine in COMBINERS:
        return COMBINERS[combine]()
    raise ValueError(f"`combine={combine!r}` is not known; choose one of {sorted(COMBINERS)} or pass a `Combiner` instance")


def _stack(outputs: Sequence[Any]) -> Any:
    return tree_map(lambda *leaves: torch.stack(leaves) if isinstance(leaves[0], Tensor) else leaves[0], outputs[0], *outputs[1:])


class Ensemble(nn.Module):
    """All members of an HQDE ensemble and the rule that combines their outputs.

    Args:
        members: the member modules (same architecture).
        weights: per-member combination weights (normalised over active members);
            uniform when ``None``.
        combine: a name from :data:`COMBINERS` or a :class:`Combiner`.
        active: which members take part in predictions (all when ``None``). Inactive
            members are kept, e.g. after member selection.
        vectorize: evaluate members with ``torch.func.vmap`` when possible.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float] | Tensor | None = None,
        combine: str | Combiner = "auto",
        active: Sequence[bool] | Tensor | None = None,
        vectorize: bool = True,
    ) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("`members` must hold at least one module")
        self.members = nn.ModuleList(members)
        n = len(members)
        self.register_buffer("weights", torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).clone())
        self.register_buffer("active", torch.ones(n, dtype=torch.bool) if active is None else torch.as_tensor(active, dtype=torch.bool).clone())
        if self.weights.shape != (n,) or self.active.shape != (n,):
            raise ValueError(f"`weights` and `active` need one entry per member ({n})")
        if not bool(self.active.any()):
            raise ValueError("`active` must keep at least one member")
        self.combiner = resolve_combiner(combine)
        self.vectorize = vectorize

    @property
    def num_members(self) -> int:
        return len(self.members)

    def active_indices(self) -> list[int]:
        return [i for i in range(self.num_members) if bool(self.active[i])]

    def active_weights(self) -> Tensor:
        w = self.weights[self.active].clamp_min(0)
        total = w.sum()
        return w / total if bool(total > 0) else torch.full_like(w, 1.0 / w.numel())

    def set_active(self, active: Sequence[bool] | Tensor) -> None:
        """Chooses which members take part in predictions (at least one)."""
        mask = torch.as_tensor(active, dtype=torch.bool, device=self.active.device)
        if mask.shape != self.active.shape or not bool(mask.any()):
            raise ValueError(f"`active` needs {self.num_members} booleans with at least one True")
        self.active.copy_(mask)

    def set_weights(self, weights: Sequence[float] | Tensor) -> None:
        """Sets the per-member combination weights (non-negative, one per member)."""
        w = torch.as_tensor(weights, dtype=torch.float64, device=self.weights.device)
        if w.shape != self.weights.shape or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"`weights` needs {self.num_members} finite non-negative numbers")
        self.weights.copy_(w)

    def member_outputs(self, *args: Any, **kwargs: Any) -> Any:
        """Every active member's output, stacked on a new leading axis (``(num_active, ...)``)."""
        members = [self.members[i] for i in self.active_indices()]
        if self.vectorize and len(members) > 1 and not self.training and not kwargs:
            stacked = self._vmap_outputs(members, args)
            if stacked is not None:
                return stacked
        return _stack([m(*args, **kwargs) for m in members])

    def _vmap_outputs(self, members: Sequence[nn.Module], args: tuple[Any, ...]) -> Any:
        params, buffers = torch.func.stack_module_state(list(members))
        base = copy.deepcopy(members[0]).to("meta")

        def call(p: dict[str, Tensor], b: dict[str, Tensor], *inputs: Any) -> Any:
            return torch.func.functional_call(base, (p, b), inputs)

        try:
            return torch.func.vmap(call, in_dims=(0, 0) + (None,) * len(args))(params, buffers, *args)
        except Exception:  # modules vmap cannot trace (data-dependent control flow, .item(), in-place buffers)
            self.vectorize = False
            return None

    def combine_outputs(self, outputs: Any) -> Any:
        """Combines what :meth:`member_outputs` returned (tensor by tensor for nested outputs)."""
        weights = self.active_weights()
        return tree_map(lambda leaf: self.combiner(leaf, weights) if isinstance(leaf, Tensor) else leaf, outputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The combined output of the active members (see the module docstring for the rules)."""
        return self.combine_outputs(self.member_outputs(*args, **kwargs))

    @torch.no_grad()
    def predict_proba(self, *args: Any, **kwargs: Any) -> Tensor:
        """Weighted mean class probabilities of the active members (outputs treated as logits)."""
        logits = self.member_outputs(*args, **kwargs)
        probs = torch.softmax(logits.float(), dim=-1)
        return _weighted_mean(probs, self.active_weights())

    @torch.no_grad()
    def predict_with_uncertainty(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Mean probabilities with their uncertainty decomposition (outputs treated as logits).

        Returns:
            ``probs``: weighted mean probabilities ``(batch, classes)``;
            ``entropy``: predictive entropy H[p̄] (total uncertainty, nats);
            ``mutual_information``: H[p̄] − Σ w_i H[p_i] (the part due to member disagreement);
            ``member_probs``: every active member's probabilities ``(members, batch, classes)``.
        """
        logits = self.member_outputs(*args, **kwargs)
        member_probs = torch.softmax(logits.float(), dim=-1)
        weights = self.active_weights()
        probs = _weighted_mean(member_probs, weights)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        member_entropy = -(member_probs * torch.log(member_probs.clamp_min(1e-12))).sum(-1)
        expected_entropy = _weighted_mean(member_entropy, weights)
        return {
            "probs": probs,
            "entropy": entropy,
            "mutual_information": (entropy - expected_entropy).clamp_min(0.0),
            "member_probs": member_probs,
        }

    @classmethod
    def from_states(
        cls,
        template: nn.Module,
        states: Sequence[dict[str, Any]],
        **kwargs: Any,
    ) -> Ensemble:
        """Builds an ensemble of deep copies of ``template``, member ``i`` loaded with ``states[i]``."""
        members = []
        for state in states:
            member = copy.deepcopy(template)
            member.__dict__.pop("forward", None)  # never inherit an evaluation-time forward patch
            member.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
            members.append(member)
        return cls(members, **kwargs)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str,
        module_class: type[nn.Module],
        map_location: Any = "cpu",
        weights_only: bool = True,
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
            **module_kwargs: extra constructor arguments.

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
        states, active = ensemble_entries(checkpoint)
        ensemble = cls.from_states(
            template,
            states,
            weights=section.get("weights"),
            active=active,
            combine=section.get("combine", "auto"),
        )
        return ensemble.eval()

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, active={self.active_indices()}, combiner={self.combiner!r}"

