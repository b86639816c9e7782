"""Multi-objective sweeps: hypervolume, the Pareto-aware scheduler, the Optuna searcher, the missing
``optuna`` extra, and the comparison command (facedis/sweeps/{pareto,schedulers,searchers,compare}.py).

Real Ray Tune (a private local Ray, 1-2 CPUs, its own short temp dir) and real Optuna throughout;
the toy trainables below report fixed (E_dis, E_rec) curves so that every scheduling decision is
known in advance.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest

from facedis.sweeps import pareto

REPO = Path(__file__).resolve().parent.parent
TUNE_PY = REPO / "sweeps" / "tune.py"
METRICS = ("E_dis_ref_mean", "E_rec_mean")


# --------------------------------------------------------------------------------------------
# hypervolume


def _hv_brute(points, ref) -> Fraction:
    """Area of the union of boxes [a, ra] x [b, rb] on the grid of all coordinates (exact, rational)."""
    pts = [(Fraction(a), Fraction(b)) for a, b in points if a < ref[0] and b < ref[1]]
    xs = sorted({a for a, _ in pts} | {Fraction(ref[0])})
    ys = sorted({b for _, b in pts} | {Fraction(ref[1])})
    area = Fraction(0)
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            if any(a <= x0 and b <= y0 for a, b in pts):
                area += (x1 - x0) * (y1 - y0)
    return area


def test_hypervolume_hand_made():
    ref = (4.0, 4.0)
    assert pareto.hypervolume([], ref) == 0.0
    assert pareto.hypervolume([(1.0, 1.0)], ref) == 9.0
    # two front points: 3x1 + 1x3 - overlap 1x1 ... = union of [1,4]x[3,4] and [3,4]x[1,4]
    assert pareto.hypervolume([(1.0, 3.0), (3.0, 1.0)], ref) == pytest.approx(3 + 3 - 1)
    # dominated points, duplicates, points outside the box and missing values add nothing
    pts = [(1.0, 3.0), (3.0, 1.0), (3.0, 3.0), (1.0, 3.0), (5.0, 0.5), (0.5, 4.0), (math.nan, 0.1), (2.0, None)]
    assert pareto.hypervolume(pts, ref) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="finite"):
        pareto.hypervolume([(1.0, 1.0)], (math.inf, 1.0))


def test_hypervolume_brute_force_random():
    rng = random.Random(0)
    for _ in range(60):
        ref = (rng.randint(3, 8), rng.randint(3, 8))
        pts = [(rng.randint(0, 9) / 2, rng.randint(0, 9) / 2) for _ in range(rng.randint(0, 10))]
        assert pareto.hypervolume(pts, ref) == pytest.approx(float(_hv_brute(pts, ref)), abs=1e-12), (pts, ref)


def test_dominates():
    assert pareto.dominates((1, 1), (1, 2)) and not pareto.dominates((1, 2), (1, 2))
    assert not pareto.dominates((0, 3), (1, 2)) and not pareto.dominates((1, 2), (0, 3))
    assert pareto.dominates((5, 5), (math.nan, 1)) and not pareto.dominates((math.nan, 1), (5, 5))


# --------------------------------------------------------------------------------------------
# ParetoRungScheduler: the decision rule on its own


def test_rung_milestones():
    from facedis.sweeps.schedulers import rung_milestones

    assert rung_milestones(8, 1, 2) == [1, 2, 4]
    assert rung_milestones(9, 1, 2) == [1, 2, 4, 8]
    assert rung_milestones(10, 2, 3) == [2, 6]
    assert rung_milestones(1, 1, 2) == []
    with pytest.raises(ValueError):
        rung_milestones(8, 1, 1)


def test_pareto_scheduler_rule():
    from ray.tune.schedulers import TrialScheduler

    from facedis.sweeps.schedulers import ParetoRungScheduler

    s = ParetoRungScheduler(metrics=METRICS, max_t=8, grace_period=1, reduction_factor=2, dominated_by=2)
    assert s.milestones == [1, 2, 4]
    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert s.judge("a", 1, (1.0, 1.0)) == C      # the first trial at a rung meets nobody
    assert s.judge("b", 1, (2.0, 2.0)) == C      # dominated by one trial only
    assert s.judge("c", 1, (0.1, 9.0)) == C      # on the front: best E_dis, worst E_rec
    assert s.judge("d", 1, (3.0, 3.0)) == S      # dominated by a and b
    assert s.judge("e", 1, (9.0, 0.1)) == C      # on the front again
    assert s.judge("f", 1, (math.nan, 0.0)) == S  # a missing value is dominated by every trial
    # a point on the current front is never stopped, whatever the threshold
    s1 = ParetoRungScheduler(metrics=METRICS, max_t=8, dominated_by=1)
    rng = random.Random(1)
    seen = []
    for i in range(40):
        p = (rng.random(), rng.random())
        on_front = not any(pareto.dominates(q, p) for q in seen)
        assert (s1.judge(str(i), 1, p) == C) == on_front
        seen.append(p)
    with pytest.raises(ValueError):
        ParetoRungScheduler(dominated_by=0)
    with pytest.raises(ValueError):
        ParetoRungScheduler(metrics=["E_rec_mean"])


def test_pareto_scheduler_judges_once_per_rung():
    from ray.tune.schedulers import TrialScheduler

    from facedis.sweeps.schedulers import ParetoRungScheduler

    class T:  # what on_trial_result reads of a trial
        def __init__(self, tid):
            self.trial_id = tid

    s = ParetoRungScheduler(metrics=METRICS, max_t=8, grace_period=1, reduction_factor=2, dominated_by=1)
    r = lambda t, d, e: {"epochs_done": t, METRICS[0]: d, METRICS[1]: e}  # noqa: E731
    assert s.on_trial_result(None, T("a"), r(1, 1.0, 1.0)) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, T("b"), r(1, 2.0, 2.0)) == TrialScheduler.STOP
    assert s.on_trial_result(None, T("a"), r(1, 5.0, 5.0)) == TrialScheduler.CONTINUE  # judged at 1 already
    assert s.on_trial_result(None, T("a"), r(3, 5.0, 5.0)) == TrialScheduler.CONTINUE  # rung 2: alone
    assert s.on_trial_result(None, T("c"), r(2, 6.0, 6.0)) == TrialScheduler.STOP      # rung 2: a dominates
    assert s.on_trial_result(None, T("d"), {"epochs_done": 1}) == TrialScheduler.STOP  # no values at all
    assert s.on_trial_result(None, T("e"), {METRICS[0]: 1.0}) == TrialScheduler.CONTINUE  # no time: not judged
    assert [(d[0], d[1], d[4]) for d in s.decisions] == [
        ("a", 1, "CONTINUE"), ("b", 1, "STOP"), ("a", 2, "CONTINUE"), ("c", 2, "STOP"), ("d", 1, "STOP")]
    assert "num_stopped=3" in s.debug_string()


# --------------------------------------------------------------------------------------------
# real Ray Tune runs of a toy trainable


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray (2 CPUs, short temp dir of its own), shut down after the module."""
    import ray
    from ray import cloudpickle

    # the toy trainables live in this test module, which Ray's workers cannot import: ship them by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = tempfile.mkdtemp(prefix="rayfdt", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


#: (E_dis, E_rec) of each toy trial, the same at every epoch, in the order the trials run
TOY = [
    (1.0, 1.0),    # 0
    (1.1, 1.1),    # 1 dominated by 0 only: continues
    (1.2, 1.2),    # 2 dominated by 0 and 1: Pareto stops it at the first rung
    (0.1, 3.0),    # 3 best E_dis, on the front; worst scalar objective (3.1): ASHA stops it
    (1.05, 0.9),   # 4 on the front
    (1.3, 1.3),    # 5 dominated by 0, 1, 2 (and 4)
]


def _toy_trainable(config):
    from ray import tune

    d, e = TOY[config["i"]]
    for epoch in range(1, 5):
        tune.report({"epochs_done": epoch, "epoch": epoch, METRICS[0]: d, METRICS[1]: e, "objective": d + e})


def _fit(tmp_path, scheduler, search_alg=None, param_space=None, name="toy", num_samples=1):
    from ray import tune

    tuner = tune.Tuner(
        _toy_trainable,
        param_space=param_space if param_space is not None else {"i": tune.grid_search(list(range(len(TOY))))},
        tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search_alg, num_samples=num_samples,
                                    max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0),
    )
    return tuner.fit()


def _epochs(grid) -> dict[int, int]:
    return {r.config["i"]: int(r.metrics["epochs_done"]) for r in grid}


@pytest.mark.slow
def test_pareto_scheduler_keeps_front_trials_asha_does_not(ray_local, tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from facedis.sweeps.schedulers import ParetoRungScheduler

    # trials run one at a time in order, so at the first rung trial i meets trials 0..i-1
    expect_stopped = {i for i, p in enumerate(TOY) if sum(pareto.dominates(q, p) for q in TOY[:i]) >= 2}
    assert expect_stopped == {2, 5}
    sched = ParetoRungScheduler(metrics=METRICS, time_attr="epochs_done", max_t=4, grace_period=1,
                                reduction_factor=2, dominated_by=2)
    got = _epochs(_fit(tmp_path, sched, name="pareto"))
    assert {i for i, n in got.items() if n < 4} == expect_stopped
    assert got[3] == 4  # the best-E_dis trial ran its whole budget
    asha = ASHAScheduler(time_attr="epochs_done", metric="objective", mode="min", max_t=4, grace_period=1,
                         reduction_factor=2)
    got = _epochs(_fit(tmp_path, asha, name="asha"))
    assert got[3] < 4  # ASHA on the scalar objective threw the front trial away


@pytest.mark.slow
def test_optuna_searcher_tells_final_values_and_prunes_stopped_trials(ray_local, tmp_path):
    from ray import tune

    from facedis.sweeps.schedulers import ParetoRungScheduler
    from facedis.sweeps.searchers import BudgetAwareOptunaSearch, make_searcher

    searcher = make_searcher("optuna", metrics=METRICS, seed=0, num_samples=6, budget=4)
    assert isinstance(searcher, BudgetAwareOptunaSearch)
    sched = ParetoRungScheduler(metrics=METRICS, max_t=4, grace_period=1, reduction_factor=2, dominated_by=1)
    grid = _fit(tmp_path, sched, search_alg=searcher, param_space={"i": tune.choice(list(range(len(TOY))))},
                name="optuna", num_samples=6)
    assert len(grid) == 6 and not grid.errors
    study = searcher._ot_study  # noqa: SLF001 - the Optuna study Ray's OptunaSearch holds
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    by_params = {}
    for r in grid:
        by_params.setdefault(r.config["i"], []).append(int(r.metrics["epochs_done"]))
    states = sorted(t.state.name for t in trials)
    n_stopped = sum(n < 4 for ns in by_params.values() for n in ns)
    assert states.count("PRUNED") == n_stopped and states.count("COMPLETE") == 6 - n_stopped
    for t in trials:
        if t.state.name == "COMPLETE":  # the final values of that config
            assert tuple(t.values) == pytest.approx(TOY[t.params["i"]])
        else:
            assert t.values is None
    assert study.directions[0].name == "MINIMIZE" and len(study.directions) == 2


# --------------------------------------------------------------------------------------------
# the optuna extra


def test_missing_optuna_names_the_extra(monkeypatch):
    from facedis.extras import MissingExtraError
    from facedis.sweeps import searchers

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now fails
    with pytest.raises(MissingExtraError, match=r"pip install 'facedis\[optuna\]'"):
        searchers.make_searcher("optuna", metrics=METRICS, seed=0, num_samples=4, budget=2)
    assert searchers.make_searcher("random", metrics=METRICS, seed=0, num_samples=4, budget=2) is not None


def test_missing_optuna_cli_error_before_anything_runs(tmp_path):
    out = tmp_path / "sweep"
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from facedis.cli import main\n"
            f"sys.exit(main(['tune', '--dataset', 'synth', '--search', 'optuna', '--out', {str(out)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "facedis tune --search optuna needs Optuna (optuna)" in r.stderr
    assert "pip install 'facedis[optuna]'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "sweeps").exists()  # nothing prepared, nothing written
    # the comparison needs it too (an optuna arm), and says so before any baseline or sweep runs
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from facedis.extras import MissingExtraError\n"
            "from facedis.sweeps import compare\n"
            "try:\n"
            f"    compare.main(['--out', {str(tmp_path / 'cmp')!r}])\n"
            "except MissingExtraError as e:\n"
            "    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 3 and "facedis[optuna]" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "cmp").exists()


def test_optuna_rejects_grid_dimensions(tmp_path, monkeypatch):
    from facedis.sweeps import tune

    monkeypatch.setattr(tune, "quiet_ray_env", lambda local: None)  # leave this process's environment alone
    with pytest.raises(SystemExit, match="grid: dimensions.*model.id_dim"):
        tune.run(["--dataset", "synth", "--search", "optuna", "--space", "model.id_dim=grid:2,4",
                  "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_scheduler_defaults_follow_the_search():
    from facedis.sweeps import tune

    assert tune.DEFAULT_SCHEDULER == {"random": "asha", "optuna": "pareto"}
    a = tune.parse_args(["--dataset", "synth", "--search", "optuna"])
    assert a.search == "optuna" and a.scheduler is None and a.sampler == "tpe"
    b = tune.parse_args(["--resume", "x", "--address", "auto"])  # the flags cluster jobs use, unchanged
    assert b.resume == Path("x") and b.address == "auto"


# --------------------------------------------------------------------------------------------
# a real Optuna sweep through the CLI


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("optuna-sweep") / "s"
    env = dict(os.environ, TMPDIR=str(tmp_path_factory.mktemp("tmpdir")))  # a private smoke data set
    r = subprocess.run([sys.executable, str(TUNE_PY), "--dataset", "synth", "--smoke-test", "--search", "optuna",
                        "--num-samples", "5", "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"out": out, "stdout": r.stdout}


def _results(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


@pytest.mark.slow
def test_optuna_sweep_outputs_and_stopping(optuna_sweep):
    out = optuna_sweep["out"]
    state = json.loads((out / "sweep.json").read_text())
    assert state["search"] == "optuna" and state["scheduler"] == "pareto" and state["sampler"] == "tpe"
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 5 and all(r["status"] in ("completed", "stopped") for r in rows)
    assert "winner: trial" in optuna_sweep["stdout"]
    # every stop happened at a rung where >= 2 trials' values at that rung dominated the trial's
    epochs = 3
    hist = {r["trial_id"]: _results(out / "tune" / r["trial_id"]) for r in rows}
    at = {tid: {int(x["epochs_done"]): (x[METRICS[0]], x[METRICS[1]]) for x in res} for tid, res in hist.items()}
    for r in rows:
        if r["status"] == "stopped":
            t = int(r["epochs_done"])
            assert t < epochs
            p = at[r["trial_id"]][t]
            others = [v[t] for tid, v in at.items() if tid != r["trial_id"] and t in v]
            assert sum(pareto.dominates(q, p) for q in others) >= 2, (r["trial_id"], t, p, others)
    sel = json.loads((out / "selection.json").read_text())
    assert sel["best"] and (out / sel["best"][0]["yaml"]).is_file()


# --------------------------------------------------------------------------------------------
# the comparison command, tiny


@pytest.mark.slow
def test_compare_command(tmp_path):
    out, doc, fig = tmp_path / "cmp", tmp_path / "doc.md", tmp_path / "figs" / "cmp.png"
    doc.write_text("# Doc\n\nbefore\n\n<!-- sweep-compare:begin -->\nold\n<!-- sweep-compare:end -->\n\nafter\n")
    argv = [sys.executable, "-m", "facedis.sweeps.compare", "--seeds", "0", "1", "--num-samples", "2", "--epochs", "2",
            "--out", str(out), "--doc", str(doc), "--figure", str(fig)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "compare.json").read_text())
    ref = res["reference"]["point"]
    # the reference point is what the two baseline runs measured
    im = json.loads((out / "reference" / "identity_map" / "metrics.json").read_text())
    mf = json.loads((out / "reference" / "mean_face" / "metrics.json").read_text())
    assert ref == [pytest.approx(im[METRICS[0]]), pytest.approx(mf[METRICS[1]])]
    assert len(res["sweeps"]) == 4
    for s in res["sweeps"]:
        rows = list(csv.DictReader(open(Path(s["out"]) / "trials.csv")))
        assert len(rows) == 2
        done = [(float(x[METRICS[0]]), float(x[METRICS[1]])) for x in rows if x["completed"] == "True"]
        assert s["hypervolume"] == pytest.approx(pareto.hypervolume(done, ref))
        sweep = json.loads((Path(s["out"]) / "sweep.json").read_text())
        assert (sweep["search"], sweep["scheduler"], sweep["seed"]) == (s["search"], s["scheduler"], s["seed"])
        assert sweep["num_samples"] == 2 and sweep["base"]["train"]["epochs"] == 2
    text = doc.read_text()
    assert text.startswith("# Doc\n\nbefore\n") and text.rstrip().endswith("after") and "\nold\n" not in text
    assert "| random+asha |" in text and "| optuna+pareto |" in text and "](figs/cmp.png)" in text
    hv = [s["hypervolume"] for s in res["sweeps"] if s["arm"] == "random+asha"]
    m = sum(hv) / 2
    sd = math.sqrt(sum((h - m) ** 2 for h in hv))
    assert f"| random+asha | {m:.3f} ± {sd:.3f} |" in text
    assert fig.read_bytes()[:4] == b"\x89PNG"
    # a rerun reuses the finished sweeps
    mtimes = {s["out"]: (Path(s["out"]) / "trials.csv").stat().st_mtime_ns for s in res["sweeps"]}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all((Path(k) / "trials.csv").stat().st_mtime_ns == v for k, v in mtimes.items())
