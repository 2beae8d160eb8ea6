"""Uncertainty maths for ensembles of classifiers: plain torch and torchmetrics, no Lightning or Ray.

Shapes: ``member_logits`` / ``member_probs`` are ``(members, batch, classes)``, ``weights`` are
``(members,)`` and sum to 1, ``probs`` are ``(batch, classes)``. Entropies are in nats.

* :func:`log_mean_probs`, :func:`combine_probabilities`: the ensemble's predictive distribution
  p̄ = Σ_i w_i softmax(z_i), and its temperature-scaled form softmax(log p̄ / T).
* :func:`predictive_entropy` H[p̄] (total uncertainty), :func:`mutual_information`
  H[p̄] − Σ_i w_i H[p_i] (the part due to member disagreement, ≥ 0 by Jensen's inequality).
* :func:`aurc`: area under the risk–coverage curve of selective prediction.
* :func:`ood_detection_metrics`: AUROC, AUPR and FPR at 95 % TPR of an uncertainty score that
  separates out-of-distribution inputs (the positives) from in-distribution ones.
* :func:`fit_temperature`: one temperature minimising the NLL of softmax(logits / T) (LBFGS on log T).
* :func:`reliability_bins`: confidence bins with their accuracy, mean confidence and counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

from hqde_lightning.validation import check_int

__all__ = [
    "aurc",
    "check_temperature",
    "combine_log_probabilities",
    "combine_probabilities",
    "fit_temperature",
    "log_mean_probs",
    "mutual_information",
    "ood_detection_metrics",
    "predictive_entropy",
    "reliability_bins",
    "temper",
    "uncertainty_decomposition",
    "widened",
]

#: the temperatures :func:`fit_temperature` may return
TEMPERATURE_RANGE = (1e-2, 1e2)


def _check_members(member: Tensor, weights: Tensor | None) -> Tensor:
    """``weights`` as a tensor of one entry per member (uniform when ``None``) on ``member``'s device, in
    ``member``'s widened dtype (float32, or float64 for float64 members): never rounded to half or bfloat16,
    whose rounding would leave weights that do not sum to 1."""
    if member.dim() != 3:
        raise ValueError(f"member outputs must have shape (members, batch, classes), got {tuple(member.shape)}")
    dtype = torch.promote_types(member.dtype, torch.float32)
    if weights is None:
        return torch.full((member.shape[0],), 1.0 / member.shape[0], dtype=dtype, device=member.device)
    weights = torch.as_tensor(weights).to(device=member.device, dtype=dtype)
    if weights.shape != (member.shape[0],):
        raise ValueError(f"`weights` needs one entry per member ({member.shape[0]}), got shape {tuple(weights.shape)}")
    return weights


def widened(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 for the maths, or as it is when it is float64 already (half and bfloat16 are widened)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def log_mean_probs(member_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """log p̄ with p̄ = Σ_i w_i softmax(z_i) over the last dimension, computed stably with ``logsumexp``.

    ``member_logits`` has the members on its first axis (any number of further axes); ``weights``
    (one per member, uniform when ``None``) should sum to 1.
    """
    if member_logits.dim() < 2:
        raise ValueError(f"`member_logits` needs a member axis and a class axis, got shape {tuple(member_logits.shape)}")
    return _log_weighted_mean(torch.log_softmax(member_logits, dim=-1), weights)


def _log_weighted_mean(log_probs: Tensor, weights: Tensor | None) -> Tensor:
    """log Σ_i w_i exp(``log_probs[i]``) (uniform ``weights`` when ``None``), computed stably with ``logsumexp``."""
    n = log_probs.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=log_probs.dtype, device=log_probs.device) if weights is None else torch.as_tensor(weights).to(log_probs)
    log_w = torch.log(w.clamp_min(torch.finfo(log_probs.dtype).tiny))
    return torch.logsumexp(log_probs + log_w.reshape((-1,) + (1,) * (log_probs.dim() - 1)), dim=0)


def check_temperature(temperature: float | Tensor) -> float:
    """``temperature`` as a float (``ValueError`` unless it is a finite number > 0)."""
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    t = float(temperature) if number or (isinstance(temperature, Tensor) and temperature.numel() == 1) else math.nan
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}")
    return t


def temper(log_probs: Tensor, temperature: float | Tensor) -> Tensor:
    """log softmax(log_probs / T): the distribution ``exp(log_probs)`` sharpened (T < 1) or flattened (T > 1).

    The class ranking is unchanged; T = 1 returns ``log_probs`` itself.
    """
    t = check_temperature(temperature)
    return log_probs if t == 1.0 else torch.log_softmax(log_probs / t, dim=-1)


def combine_probabilities(member_logits: Tensor, weights: Tensor | None = None, temperature: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Every member's probabilities and the ensemble's: ``(member_probs, probs)``.

    ``probs`` = softmax(log p̄ / T) with p̄ = Σ_i w_i softmax(z_i): T = 1 gives the weighted mean of
    the member probabilities; the temperature scales the combined distribution, not the members.
    """
    member_log_probs, log_probs = combine_log_probabilities(member_logits, weights, temperature)
    return member_log_probs.exp(), log_probs.exp()


def combine_log_probabilities(member_logits: Tensor, weights: Tensor | None = None, temperature: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`combine_probabilities` in log space, ``(member_log_probs, log_probs)``: finite where the
    probabilities underflow to 0 (a confident member's wrong classes), as a negative log-likelihood needs."""
    weights = _check_members(member_logits, weights)
    member_log_probs = torch.log_softmax(widened(member_logits), dim=-1)
    return member_log_probs, temper(_log_weighted_mean(member_log_probs, weights), temperature)


def predictive_entropy(probs: Tensor) -> Tensor:
    """H[p] = −Σ_c p_c log p_c over the last dimension (nats; 0·log 0 = 0).

    Computed in at least float32 (``xlogy``: exact for tiny probabilities, no clamp); the result is in
    :func:`widened` dtype (float32 for half / bfloat16 / float32 probabilities, float64 for float64).
    """
    probs = widened(probs)
    return 0.0 - torch.special.xlogy(probs, probs).sum(-1)  # 0.0 - 0.0 = +0.0 for a one-hot p


def mutual_information(member_probs: Tensor, weights: Tensor | None = None) -> Tensor:
    """H[p̄] − Σ_i w_i H[p_i] per input, ``(batch,)``: 0 when the members agree, up to log(members) when they disagree completely.

    Computed in at least float32, weights included; the result is in :func:`widened` dtype.
    """
    weights = _check_members(member_probs, weights)
    member_probs = widened(member_probs)
    mean = (member_probs * weights.view(-1, 1, 1)).sum(0)
    expected = (predictive_entropy(member_probs) * weights.view(-1, 1)).sum(0)
    return (predictive_entropy(mean) - expected).clamp_min(0.0)


def uncertainty_decomposition(member_logits: Tensor, weights: Tensor | None = None, temperature: float | Tensor = 1.0) -> dict[str, Tensor]:
    """The ensemble's probabilities and where their uncertainty comes from.

    Returns ``probs`` (softmax(log p̄ / T), see :func:`combine_probabilities`), ``entropy`` (their
    predictive entropy: the total uncertainty), ``mutual_information`` (H[p̄] − Σ_i w_i H[p_i] of
    the members' own probabilities: the part due to member disagreement; T does not enter) and
    ``member_probs`` ``(members, batch, classes)``.
    """
    member_probs, probs = combine_probabilities(member_logits, weights, temperature)
    return {
        "probs": probs,
        "entropy": predictive_entropy(probs),
        "mutual_information": mutual_information(member_probs, weights),
        "member_probs": member_probs,
    }


def aurc(confidence: Tensor, correct: Tensor) -> Tensor:
    """Area under the risk–coverage curve (lower is better).

    Inputs are sorted by decreasing ``confidence`` (a stable sort: ties keep their order); at
    coverage k/n the risk is the error rate of the k most confident inputs, and the AURC is the
    mean of the n risks. A ranking that puts every error last reaches the minimum
    (1/n) Σ_{k=n−m+1}^{n} (k − n + m)/k for m errors; a random one about the error rate m/n.
    """
    confidence, correct = torch.as_tensor(confidence).flatten(), torch.as_tensor(correct).flatten()
    if confidence.numel() == 0 or confidence.shape != correct.shape:
        raise ValueError(f"`confidence` and `correct` need the same non-zero number of entries, got {confidence.numel()} and {correct.numel()}")
    order = torch.argsort(confidence, descending=True, stable=True)
    errors = (~correct.bool())[order].double()
    risk = errors.cumsum(0) / torch.arange(1, errors.numel() + 1, dtype=torch.float64, device=errors.device)
    return risk.mean()


def ood_detection_metrics(in_scores: Tensor, ood_scores: Tensor) -> dict[str, Tensor]:
    """How well an uncertainty score tells out-of-distribution inputs (positives) from in-distribution ones.

    Returns ``auroc``, ``aupr`` (average precision with OOD as the positive class) and ``fpr95``
    (the share of in-distribution inputs flagged when 95 % of the OOD inputs are), from
    torchmetrics. Higher scores must mean "more likely OOD" (entropy, mutual information).
    """
    in_scores, ood_scores = torch.as_tensor(in_scores).flatten().double(), torch.as_tensor(ood_scores).flatten().double()
    if in_scores.numel() == 0 or ood_scores.numel() == 0:
        raise ValueError(f"need in-distribution and OOD scores, got {in_scores.numel()} and {ood_scores.numel()}")
    scores = torch.cat([in_scores, ood_scores])
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("OOD scores hold NaN or Inf")
    # into [0, 1] keeping the order (torchmetrics takes scores outside [0, 1] for logits)
    span = scores.max() - scores.min()
    scores = (scores - scores.min()) / span if bool(span > 0) else torch.zeros_like(scores)
    target = torch.cat([torch.zeros_like(in_scores, dtype=torch.long), torch.ones_like(ood_scores, dtype=torch.long)])
    fpr, tpr, _ = binary_roc(scores, target)
    return {
        "auroc": binary_auroc(scores, target),
        "aupr": binary_average_precision(scores, target),
        "fpr95": fpr[tpr >= 0.95].min(),
    }


def fit_temperature(logits: Tensor, target: Tensor, max_iter: int = 100) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on ``(logits, target)``.

    LBFGS (strong-Wolfe line search) on log T from T = 1, in float64; T is kept in
    :data:`TEMPERATURE_RANGE`. Returns 1.0 whenever the fitted T does not lower the NLL, so the
    NLL on the fitting data is never raised. ``logits`` are ``(samples, classes)`` (class logits or
    log-probabilities), ``target`` integer classes ``(samples,)``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"need logits (samples, classes) and targets (samples,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    logits, target = logits.detach().double(), target.detach().long()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("`logits` hold NaN or Inf")
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(low, high).exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().clamp(low, high).exp())
    with torch.no_grad():
        fitted, plain = F.cross_entropy(logits / temperature, target), F.cross_entropy(logits, target)
    return temperature if math.isfinite(temperature) and bool(fitted < plain) else 1.0


def reliability_bins(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Equal-width confidence bins (i/n, (i+1)/n] (0 goes to the first bin) for a reliability diagram.

    Returns ``edges`` ``(n_bins + 1,)``, ``counts`` (inputs per bin), ``accuracy`` and
    ``confidence`` (their mean per bin, 0 for an empty bin) and ``ece`` = Σ counts/N · |accuracy − confidence|.
    """
    check_int(n_bins, "n_bins", 1)
    confidence, correct = torch.as_tensor(confidence).flatten().double(), torch.as_tensor(correct).flatten().double()
    if confidence.shape != correct.shape:
        raise ValueError(f"`confidence` and `correct` need the same number of entries, got {confidence.numel()} and {correct.numel()}")
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    denominator = counts.clamp_min(1).double()
    accuracy = torch.bincount(index, weights=correct, minlength=n_bins) / denominator
    mean_confidence = torch.bincount(index, weights=confidence, minlength=n_bins) / denominator
    ece = ((counts.double() / max(1, confidence.numel())) * (accuracy - mean_confidence).abs()).sum()
    return {"edges": torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64), "counts": counts, "accuracy": accuracy, "confidence": mean_confidence, "ece": ece}
