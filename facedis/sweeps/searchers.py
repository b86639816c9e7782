"""Search algorithms of ``facedis tune --search``: Ray Tune's random search, or Optuna's
multi-objective samplers over (E_dis, E_rec) through ``ray.tune.search.optuna.OptunaSearch``.

``--search optuna`` needs the ``optuna`` extra (``pip install 'facedis[optuna]'``); a missing
Optuna is a :class:`facedis.extras.MissingExtraError` naming it, raised before anything runs.

Optuna is told each trial's **final** (E_dis, E_rec) once, when the trial ends (a multi-objective
Optuna study takes no intermediate values). A trial an early-stopping scheduler ended before
its full budget is told as *pruned*, without values: its last values come from an earlier epoch
and are not comparable with finished trials' (on the synthetic set an early model is still close
to the mean face, whose E_dis is near 0: taken as final, such trials would look like the best
E_dis there is). Optuna's multi-objective TPE ranks pruned trials after the completed ones (the
"bad" group), the successive-halving reading of "stopped early". Errored trials and trials with
a non-finite value are told as failed.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from ray.tune.search.optuna import OptunaSearch

from facedis.extras import require

logger = logging.getLogger(__name__)

SEARCHES = ("random", "optuna")
SAMPLERS = ("tpe", "nsga2")


def require_optuna(what: str = "facedis tune --search optuna"):
    """``import optuna`` or :class:`~facedis.extras.MissingExtraError` naming ``facedis[optuna]``."""
    return require("optuna", "optuna", what)


def default_startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the front: a third of the budget, between 4 and 10."""
    return max(4, min(10, num_samples // 3))


class BudgetAwareOptunaSearch(OptunaSearch):
    """:class:`OptunaSearch` that tells Optuna a trial stopped before ``budget`` (``budget_attr``
    units) as pruned, and a non-finite value as a failure (see the module docstring)."""

    def __init__(self, *args, budget_attr: str = "epochs_done", budget: float = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._budget_attr = budget_attr
        self._budget = budget
        self.told: dict[str, tuple[str, Any]] = {}  # trial id -> (Optuna state name, values)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        vals = [(result or {}).get(m) for m in metrics]
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
        done = (result or {}).get(self._budget_attr)
        if error or (result and not finite):
            state, values = TrialState.FAIL, None
        elif not result or not isinstance(done, (int, float)) or done < self._budget:
            state, values = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
            values = [float(v) for v in vals] if isinstance(self.metric, list) else float(vals[0])
        self._ot_study.tell(self._ot_trials[trial_id], values, state=state)
        self._completed_trials.add(trial_id)
        self.told[trial_id] = (state.name, values)


def optuna_sampler(name: str, seed: int, num_samples: int, startup_trials: int | None = None):
    """A seeded Optuna sampler: ``tpe`` (multi-objective TPE) or ``nsga2`` (NSGA-II)."""
    optuna = require_optuna()
    if name == "tpe":
        n = startup_trials if startup_trials is not None else default_startup_trials(num_samples)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, num_samples // 4)))
    raise ValueError(f"unknown Optuna sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def check_space(space: dict[str, Any], search: str) -> None:
    """Optuna cannot take ``grid:`` dimensions (Ray Tune's grid search); ``SystemExit`` naming them."""
    if search != "optuna":
        return
    grids = [k for k, v in space.items() if isinstance(v, str) and v.startswith("grid:")]
    if grids:
        raise SystemExit(f"--search optuna cannot sample grid: dimensions ({', '.join(grids)}); "
                         f"use choice: instead, or --search random")


def make_searcher(search: str, *, metrics: Sequence[str], seed: int, num_samples: int, budget: float,
                  sampler: str = "tpe", startup_trials: int | None = None, budget_attr: str = "epochs_done"):
    """The ``search_alg`` for ``tune.TuneConfig``: Ray's seeded random search, or Optuna over ``metrics``
    (both minimised)."""
    if search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    if search == "optuna":
        require_optuna()
        return BudgetAwareOptunaSearch(metric=list(metrics), mode=["min"] * len(metrics),
                                       sampler=optuna_sampler(sampler, seed, num_samples, startup_trials),
                                       budget_attr=budget_attr, budget=budget)
    raise ValueError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
