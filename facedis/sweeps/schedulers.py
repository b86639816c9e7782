"""Pareto-aware early stopping for two minimised objectives (E_dis, E_rec): a Ray Tune ``TrialScheduler``.

ASHA compares one number per trial. On the scalar ``objective = E_dis/s_dis + E_rec/s_rec`` it
stops a trial that is best in one error and mediocre in the other, although that trial is on
the Pareto front of (E_dis, E_rec) and may be the very one a user wants. :class:`ParetoRungScheduler`
keeps ASHA's asynchronous rungs and replaces its cut:

- rungs at ``grace_period · reduction_factor^k`` (in ``time_attr`` units, here finished epochs),
  below ``max_t``; each trial is judged once per rung, at its first result at or past the rung;
- at a rung the trial's (E_dis, E_rec) is compared with the values the other trials recorded at
  the same rung (same budget: apples with apples); it is **stopped only when at least
  ``dominated_by`` of them dominate it** (no worse in both errors, better in one);
- so a trial on the rung's current front (dominated by none) always continues, whatever
  ``dominated_by`` is; with ``dominated_by = 2`` (default) a trial dominated by a single other
  trial continues too (one better trial can be noise);
- a result without a finite value of either metric counts as dominated by every recorded trial;
- its values are recorded at the rung whether it continues or not (as ASHA does), and a trial
  that ends at or past a rung without having been judged there is recorded on completion.

As with ASHA, the early trials at a rung meet few rivals and are rarely stopped. The rung
records are not part of Tune's experiment state: after ``--resume`` they start empty (ASHA too).
"""

from __future__ import annotations

import math
import pickle
from typing import Sequence

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from facedis.sweeps import pareto


def rung_milestones(max_t: float, grace_period: float, reduction_factor: float) -> list[float]:
    """``grace · rf^k`` for k = 0, 1, ... while below ``max_t`` (ascending)."""
    if not grace_period > 0:
        raise ValueError(f"grace_period must be > 0, got {grace_period!r}")
    if not reduction_factor > 1:
        raise ValueError(f"reduction_factor must be > 1, got {reduction_factor!r}")
    out, m = [], float(grace_period)
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return out


class ParetoRungScheduler(FIFOScheduler):
    """Stop a trial at a rung only when ``dominated_by`` or more trials recorded at that rung dominate it.

    Args:
        metrics: the two result keys, both minimised (``modes`` may flip either to ``"max"``).
        time_attr: the result key that counts progress (``epochs_done``).
        max_t: the trials' full budget in ``time_attr`` units (no rung at or past it).
        grace_period: the first rung.
        reduction_factor: the spacing of the rungs (``grace · rf^k``).
        dominated_by: how many dominating trials at a rung stop a trial (>= 1).
    """

    def __init__(self, metrics: Sequence[str] = ("E_dis_ref_mean", "E_rec_mean"),
                 modes: Sequence[str] = ("min", "min"), time_attr: str = "epochs_done", max_t: float = 100,
                 grace_period: float = 1, reduction_factor: float = 2, dominated_by: int = 2):
        super().__init__()
        metrics, modes = list(metrics), list(modes)
        if len(metrics) != 2 or len(modes) != 2:
            raise ValueError(f"ParetoRungScheduler needs two metrics and two modes, got {metrics} / {modes}")
        if any(m not in ("min", "max") for m in modes):
            raise ValueError(f"modes must be 'min' or 'max', got {modes}")
        if isinstance(dominated_by, bool) or not isinstance(dominated_by, int) or dominated_by < 1:
            raise ValueError(f"dominated_by must be an integer >= 1, got {dominated_by!r}")
        self._metrics = metrics
        self._signs = [1.0 if m == "min" else -1.0 for m in modes]
        self._metric = metrics[0]  # what Tune's strict result check looks for
        self._time_attr = time_attr
        self._max_t = max_t
        self._dominated_by = dominated_by
        self._milestones = rung_milestones(max_t, grace_period, reduction_factor)
        #: milestone -> {trial_id: (a, b)} (minimised; nan when missing)
        self._rungs: dict[float, dict[str, tuple[float, float]]] = {m: {} for m in self._milestones}
        #: (trial_id, milestone, number of dominating trials, number compared, decision)
        self.decisions: list[tuple[str, float, int, int, str]] = []
        self._num_stopped = 0

    # ---- Tune hooks

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the scheduler has its own two metrics; nothing to take from TuneConfig

    @property
    def milestones(self) -> list[float]:
        return list(self._milestones)

    def _point(self, result: dict) -> tuple[float, float]:
        out = []
        for key, sign in zip(self._metrics, self._signs):
            v = result.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            out.append(sign * float(v) if ok else math.nan)
        return out[0], out[1]

    def _pending_milestone(self, trial_id: str, t: float) -> float | None:
        """The highest rung at or below ``t`` this trial has not been judged at (rungs it skipped
        over, e.g. after a restore, are not judged retroactively)."""
        reached = [m for m in self._milestones if t >= m]
        if not reached or trial_id in self._rungs[reached[-1]]:
            return None
        return reached[-1]

    def judge(self, trial_id: str, milestone: float, point: tuple[float, float]) -> str:
        """Decide for one trial at one rung and record its point there (pure bookkeeping; testable)."""
        recorded = self._rungs[milestone]
        others = [q for tid, q in recorded.items() if tid != trial_id]
        n_dom = sum(pareto.dominates(q, point) for q in others)
        action = TrialScheduler.STOP if n_dom >= self._dominated_by else TrialScheduler.CONTINUE
        recorded[trial_id] = point
        self.decisions.append((trial_id, milestone, n_dom, len(others), action))
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        t = result.get(self._time_attr)
        if not isinstance(t, (int, float)):
            return TrialScheduler.CONTINUE
        milestone = self._pending_milestone(trial.trial_id, t)
        if milestone is None:
            return TrialScheduler.CONTINUE
        return self.judge(trial.trial_id, milestone, self._point(result))

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        t = (result or {}).get(self._time_attr)
        if isinstance(t, (int, float)):
            milestone = self._pending_milestone(trial.trial_id, t)
            if milestone is not None:
                self._rungs[milestone][trial.trial_id] = self._point(result)

    def debug_string(self) -> str:
        rungs = " | ".join(f"t={m:g}: {len(r)} recorded" for m, r in self._rungs.items())
        return (f"Using ParetoRungScheduler ({self._metrics[0]}, {self._metrics[1]}; stop when dominated by "
                f">= {self._dominated_by}): num_stopped={self._num_stopped}; {rungs or 'no rungs'}")

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
