"""Byzantine members during real fits: robust rules hold, the mean does not, NaN never gets through.

7 members on digits, members 0 and 1 send corrupted weights at every sync (``ByzantineMembers``),
``sync="replace"`` so that every member continues from the consensus. The model is a tanh MLP
without normalisation: BatchNorm and ReLU-only nets are (almost) invariant to the scaling that
these attacks do to a mean, which would hide the failure this test must show.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
from models import DigitsDataModule, TanhDigitsModule

from hqde_lightning import HQDEStrategy
from hqde_lightning.aggregation import GeometricMedian, Krum, TrimmedMean
from hqde_lightning.callbacks import ByzantineMembers


def _fit(aggregator, attack: str | None, byzantine=(0, 1), **strategy_kwargs):
    pl.seed_everything(0, verbose=False)
    strategy = HQDEStrategy(num_members=7, sync="replace", aggregator=aggregator, seed=1, **strategy_kwargs)
    callbacks = [] if attack is None else [ByzantineMembers(byzantine, attack=attack)]
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=3, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    model, data = TanhDigitsModule(), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    return results["ensemble/test_acc"], strategy, model


@pytest.fixture(scope="module")
def clean_accuracy(ray_session):
    accuracy, _, _ = _fit("mean", None)
    assert accuracy > 0.9
    return accuracy


@pytest.mark.parametrize(
    ("aggregator", "attack"),
    [
        (GeometricMedian(), "sign_flip"),
        (TrimmedMean(beta=0.3), "scale"),
        (Krum(num_byzantine=2), "sign_flip"),
        pytest.param(GeometricMedian(), "scale", marks=pytest.mark.slow),
        pytest.param(TrimmedMean(beta=0.3), "sign_flip", marks=pytest.mark.slow),
        pytest.param(Krum(num_byzantine=2), "scale", marks=pytest.mark.slow),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_robust_rules_stay_within_two_points(clean_accuracy, aggregator, attack):
    accuracy, _, _ = _fit(aggregator, attack)
    assert accuracy >= clean_accuracy - 0.02


@pytest.mark.parametrize(("attack", "min_drop"), [("scale", 0.05), ("sign_flip", 0.01)])
def test_mean_visibly_fails(clean_accuracy, attack, min_drop):
    accuracy, _, _ = _fit("mean", attack)
    assert accuracy < clean_accuracy - min_drop


def test_outlier_test_and_reputation_rescue_the_mean(clean_accuracy):
    accuracy, strategy, _ = _fit("mean", "scale", outlier_threshold=3.5)
    assert accuracy >= clean_accuracy - 0.02
    for sync in strategy.sync_history:
        assert {0, 1} <= set(sync["excluded"]) and set(sync["info"]["flagged"]) >= {0, 1}
    scores = strategy.coordinator_state["aggregator"]["reputation"]["scores"].tolist()
    assert max(scores[:2]) < 0.2, "repeat offenders lose their reputation"
    assert min(scores[2:]) > 0.9, "honest members keep theirs"


@pytest.mark.parametrize(
    ("aggregator", "attack"),
    [("mean", "nan"), (GeometricMedian(), "inf"), (TrimmedMean(beta=0.3), "nan")],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_non_finite_weights_never_reach_the_consensus(ray_session, aggregator, attack):
    _, strategy, model = _fit(aggregator, attack, byzantine=(3,))
    assert all(math.isfinite(float(v.abs().max())) for v in model.state_dict().values() if v.is_floating_point())
    assert all(3 in sync["excluded"] for sync in strategy.sync_history)
