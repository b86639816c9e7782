"""Ray Tune sweeps (facedis/sweeps/, entry script sweeps/tune.py): Pareto maths, search spaces, and one real killed-and-resumed ASHA sweep.

The sweep test runs ``python sweeps/tune.py --dataset synth --smoke-test`` (4 trials, ASHA, CPU,
tiny synth data) in a subprocess, SIGKILLs it (driver, raylet, workers) once Tune has recorded a
finished trial, resumes it with ``--resume`` and then checks the outputs.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facedis.sweeps import pareto, spaces

REPO = Path(__file__).resolve().parent.parent
TUNE_PY = REPO / "sweeps" / "tune.py"


# --------------------------------------------------------------------------------------------
# Pareto front and scalarised pick on hand-made points


def test_pareto_front_hand_made():
    pts = [
        (1.0, 5.0),   # 0 front (best E_dis)
        (2.0, 2.0),   # 1 front
        (5.0, 1.0),   # 2 front (best E_rec)
        (2.0, 3.0),   # 3 dominated by 1
        (3.0, 3.0),   # 4 dominated by 1
        (2.0, 2.0),   # 5 duplicate of 1: duplicates do not dominate each other
        (6.0, 1.0),   # 6 dominated by 2 (equal E_rec, worse E_dis)
        (math.nan, 0.1),  # 7 missing value: never on the front
    ]
    assert pareto.pareto_front(pts) == [0, 1, 2, 5]
    assert pareto.pareto_front([]) == []
    assert pareto.pareto_front([(3.0, 4.0)]) == [0]


def test_pareto_front_brute_force_random():
    import random

    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(0, 6) / 2, rng.randint(0, 6) / 2) for _ in range(rng.randint(1, 12))]
        expect = [i for i, p in enumerate(pts)
                  if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)]
        assert pareto.pareto_front(pts) == expect


def test_scores_and_select():
    pts = [(1.0, 5.0), (2.0, 2.0), (5.0, 1.0), (3.0, 3.0)]
    s = pareto.scores(pts, "median")
    # medians: E_dis 2.5, E_rec 2.5 -> score = a/2.5 + b/2.5
    assert s == pytest.approx([(1 + 5) / 2.5, (2 + 2) / 2.5, (5 + 1) / 2.5, (3 + 3) / 2.5])
    assert pareto.select(pts, k=1) == [1]
    assert pareto.select(pts, k=5) == [1, 0, 2]  # only front points; ties by index
    # weight 1.0 = E_dis only -> the lowest E_dis on the front
    assert pareto.select(pts, k=1, weight=1.0) == [0]
    assert pareto.select(pts, k=1, method="rank") == [1]
    r = pareto.scores(pts, "rank")
    assert r[1] < r[0] and r[1] < r[2]
    assert math.isnan(pareto.scores([(1.0, math.nan), (1.0, 1.0)])[0])


def test_plot_front(tmp_path):
    pts = [(1.0, 5.0), (2.0, 2.0), (5.0, 1.0), (3.0, 3.0)]
    pareto.plot_front(pts, ["a", "b", "c", "d"], [0, 1, 2], [1], tmp_path / "f.png", dimmed=[3])
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------
# search spaces


def test_every_dataset_space_is_valid():
    from ray import tune

    for ds in ("synth", "coma", "bu3dfe", "facescape"):
        space = spaces.build_space(ds)
        for key in ("loss.recon", "loss.kl", "loss.adv_id", "loss.latent_consistency", "loss.laplacian",
                    "model.id_dim", "model.exp_dim"):
            assert key in space, (ds, key)
        ps = spaces.to_param_space(space)
        assert isinstance(ps["loss.recon"], tune.search.sample.Float)
        assert isinstance(ps["model.id_dim"], tune.search.sample.Categorical)
        # the paper's values lie inside the ranges
        for mode_vals in spaces.PAPER_VALUES[ds].values():
            for k, v in mode_vals.items():
                spec = space[k]
                if spec.startswith("loguniform"):
                    lo, hi = map(float, spec.split(":")[1:])
                    assert lo <= v <= hi, (ds, k, v, spec)


def test_space_overrides_modes_and_ties(tmp_path):
    sf = tmp_path / "space.yaml"
    sf.write_text("loss.adv_id: loguniform:1e-5:1e-4\nmodel.id_dim: [8, 16]\noptim.lr_vae: 0.001\n")
    space = spaces.build_space("coma", "-ne-gt-id-dis", spaces.parse_assignments(["loss.recon=uniform:1:2"]), sf)
    assert space["loss.recon"] == "uniform:1:2"
    assert space["model.id_dim"] == [8, 16]
    assert space["optim.lr_vae"] == 0.001
    assert space["mode"] == "-ne-gt-id-dis"
    ps = spaces.to_param_space(space)
    assert ps["optim.lr_vae"] == 0.001
    sample = {"loss.kl": 1e-4, "mode": "-ne-gt-id-dis", "loss.recon": 1.5}
    assert spaces.expand_sample(sample) == {"method.neutral_gt": False, "method.id_discriminator": False,
                                            "loss.kl_id": 1e-4, "loss.kl_exp": 1e-4, "loss.recon": 1.5}
    # an untied key replaces the tied one
    space = spaces.build_space("coma", "search", {"loss.kl_id": "loguniform:1e-6:1e-5"})
    assert "loss.kl" not in space and space["loss.kl_id"] == "loguniform:1e-6:1e-5"
    assert space["mode"] == "choice:" + ",".join(spaces.MODES)
    assert set(spaces.parse_spec(space["mode"]).categories) == set(spaces.MODES)
    assert spaces.parse_spec("grid:4,8") == {"grid_search": [4, 8]}
    assert spaces.parse_spec("fixed:3") == 3
    assert spaces.parse_spec("randint:1:5").lower == 1


def test_space_errors():
    from facedis.config import ConfigError

    with pytest.raises(spaces.SpaceError, match="mode"):
        spaces.build_space("coma", "+ne-gt")
    with pytest.raises(ConfigError, match="recn"):
        spaces.build_space("coma", space={"loss.recn": "loguniform:1:2"})
    with pytest.raises(spaces.SpaceError):
        spaces.parse_spec("loguniform:0:1")
    with pytest.raises(spaces.SpaceError):
        spaces.parse_spec("uniform:a:1")
    with pytest.raises(spaces.SpaceError):
        spaces.build_space("mnist")
    with pytest.raises(spaces.SpaceError):
        spaces.parse_assignments(["loss.recon"])


def test_summarise_front_only_over_completed():
    from facedis.sweeps.tune import summarise

    def r(tid, d, e, done):
        return {"trial_id": tid, "status": "completed" if done else "stopped", "completed": done,
                "metrics": {"E_dis_ref_mean": d, "E_rec_mean": e}, "config": {"loss.recon": 1.0}}

    results = [r("a", 1.0, 5.0, True), r("b", 2.0, 2.0, True), r("c", 0.1, 0.1, False), r("d", 3.0, 3.0, True)]
    rows, front, chosen = summarise(results, k=2)
    assert front == [0, 1] and chosen == [1, 0]
    assert [row["on_front"] for row in rows] == [True, True, False, False]
    assert rows[2]["eligible"] is False
    rows, front, chosen = summarise(results, eligible="all")
    assert front == [2] and chosen == [2]


# --------------------------------------------------------------------------------------------
# a real sweep: smoke test, killed after a finished trial, resumed


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(d))
    return pids


def _trial_statuses(exp_dir: Path) -> dict[str, tuple[str, bool]]:
    """Trial id -> (status, has a checkpoint) from Tune's last saved experiment state."""
    files = sorted(glob.glob(str(exp_dir / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        data = json.loads(Path(files[-1]).read_text())
        out = {}
        for trial_json, meta in data["trial_data"]:
            t = json.loads(trial_json)
            meta = json.loads(meta) if isinstance(meta, str) else meta
            out[t["trial_id"]] = (t["status"], bool((meta.get("last_result") or {}).get("checkpoint_dir_name")))
        return out
    except (ValueError, KeyError, IndexError, TypeError, OSError):
        return {}


def _results(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    pytest.importorskip("facedis.engine", reason="facedis.engine not written yet")
    out = tmp_path_factory.mktemp("sweep") / "smoke"
    env = dict(os.environ)  # facedis is installed: the Ray workers import facedis.sweeps.tune from it
    # --smoke-test keeps its data set and pretrained-D cache under $TMPDIR/facedis-smoke: a private
    # TMPDIR, so nothing an earlier session (or a concurrent one) left there is reused
    env["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
    log = out.parent / "first.log"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(TUNE_PY), "--dataset", "synth", "--smoke-test", "--out", str(out)],
                            env=env, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    status: dict[str, tuple[str, bool]] = {}
    first_done = None
    try:
        # kill once a trial has finished and, if possible, a running one has a recorded checkpoint
        # (so the resume exercises restoring a trial into the engine's run directory)
        while time.time() - t0 < 400 and proc.poll() is None:
            status = _trial_statuses(out / "tune")
            if any(s == "TERMINATED" for s, _ in status.values()):
                first_done = first_done or time.time()
                if any(s == "RUNNING" and c for s, c in status.values()) or time.time() - first_done > 8:
                    break
            time.sleep(0.2)
        running_at_kill = proc.poll() is None
    finally:
        for pid in _session_pids(proc.pid):  # the driver, Ray's daemons and the trial workers
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        try:  # the killed Ray's private temp dir
            tmp = json.loads((out / "sweep.json").read_text()).get("ray_temp_dir")
            if tmp and Path(tmp).name.startswith("rayfd"):
                shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, ValueError):
            pass
    assert any(s == "TERMINATED" for s, _ in status.values()), log.read_text()[-3000:]
    finished = {t: len(_results(out / "tune" / t)) for t, (s, _) in status.items() if s == "TERMINATED"}
    restored = [t for t, (s, c) in status.items() if s == "RUNNING" and c]
    killed_s = time.time() - t0
    res = subprocess.run([sys.executable, str(TUNE_PY), "--resume", str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"out": out, "finished_before": finished, "running_at_kill": running_at_kill, "restored": restored, "stdout": res.stdout,
            "killed_s": killed_s, "total_s": time.time() - t0}


@pytest.mark.slow
def test_resume_does_not_redo_finished_trials(sweep):
    assert sweep["running_at_kill"], "the sweep finished before it could be killed"
    for trial, n in sweep["finished_before"].items():
        assert n >= 1
        assert len(_results(sweep["out"] / "tune" / trial)) == n, trial
    assert "resuming" in sweep["stdout"]
    # a trial killed while running continued from its Tune checkpoint (copied to checkpoints/last)
    for trial in sweep["restored"]:
        results = _results(sweep["out"] / "tune" / trial)
        epochs = [r["epoch"] for r in results]
        assert epochs == list(range(1, len(epochs) + 1)), (trial, epochs)  # no epoch trained twice
        after = [r for r in results if r["iterations_since_restore"] < r["training_iteration"]]
        assert after and after[0]["epoch"] > 1, (trial, epochs)  # continued, not restarted
        lines = (sweep["out"] / "runs" / trial / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == epochs


@pytest.mark.slow
def test_every_trial_reported_edis_erec(sweep):
    out = sweep["out"]
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) >= 4
    assert sum(r["status"] == "completed" for r in rows) >= 1
    for r in rows:
        assert r["status"] in ("completed", "stopped"), r
        results = _results(out / "tune" / r["trial_id"])
        assert results, r["trial_id"]
        for res in results:
            for k in ("E_dis_ref_mean", "E_rec_mean", "E_dis_vstd_mean", "AVD_neu_mean", "epoch"):
                assert math.isfinite(res[k]), (r["trial_id"], k)
        assert int(r["num_results"]) == len(results)
    # ASHA ran: every trial reported at most max_t epochs, epochs are 1..3
    assert max(int(r["epochs_done"]) for r in rows) == 3
    assert "winner: trial" in sweep["stdout"] and str(out) in sweep["stdout"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_front_matches_reported_values(sweep):
    rows = list(csv.DictReader(open(sweep["out"] / "trials.csv")))
    elig = [r for r in rows if r["eligible"] == "True"]
    assert elig
    pts = {r["trial_id"]: (float(r["E_dis_ref_mean"]), float(r["E_rec_mean"])) for r in elig}
    expect = {t for t, p in pts.items() if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts.values())}
    assert {r["trial_id"] for r in rows if r["on_front"] == "True"} == expect
    # last values in the CSV are the last values each trial reported
    for r in elig:
        last = _results(sweep["out"] / "tune" / r["trial_id"])[-1]
        assert float(r["E_dis_ref_mean"]) == pytest.approx(last["E_dis_ref_mean"])
        assert float(r["E_rec_mean"]) == pytest.approx(last["E_rec_mean"])
    sel = json.loads((sweep["out"] / "selection.json").read_text())
    assert sel["best"] and sel["best"][0]["trial_id"] in expect


@pytest.mark.slow
def test_best_config_loads_and_trains(sweep, tmp_path):
    from facedis import engine
    from facedis.config import load_config

    from facedis.cluster.grids import resolve_grid

    best = sorted(sweep["out"].glob("best*.yaml"))
    assert len(best) == 1
    _, entries = resolve_grid(f"sweep:{sweep['out']}")  # the cluster launcher takes the directory as is
    assert [e.config for e in entries] == [best[0].resolve()]
    cfg = load_config(best[0])
    row = json.loads((sweep["out"] / "selection.json").read_text())["best"][0]
    assert cfg.loss.recon == pytest.approx(row["config"]["loss.recon"])
    assert cfg.loss.kl_id == cfg.loss.kl_exp == pytest.approx(row["config"]["loss.kl"])
    assert cfg.model.id_dim == row["config"]["model.id_dim"] and cfg.mode == row["config"]["mode"]
    assert Path(cfg.data.root).is_absolute()
    cfg = load_config(best[0], overrides={"train.epochs": 1, "run.dir": str(tmp_path / "run"), "train.progress": False})
    metrics = engine.train(cfg)
    assert math.isfinite(metrics["E_rec_mean"]) and math.isfinite(metrics["E_dis_ref_mean"])
    assert (tmp_path / "run" / "metrics.json").exists()


# --------------------------------------------------------------------------------------------
# from the sweep to the paper's tables: retrain its selected configs, aggregate with --sweep


@pytest.mark.slow
def test_sweep_to_paper_tables_in_two_commands(sweep, tmp_path):
    import statistics

    from facedis import paper_numbers
    from facedis.cluster import aggregate as agg

    out, runs, rep = sweep["out"], tmp_path / "runs", tmp_path / "rep"
    # not retrained yet: a clear error saying how to retrain
    r = subprocess.run([sys.executable, str(REPO / "launch" / "aggregate.py"), "--sweep", str(out),
                        "--runs-root", str(runs), "--out", str(rep)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and f"facedis submit --grid sweep:{out}" in r.stderr, r.stderr
    # command 1: retrain the selected config on two seeds (in-process debug executor, CPU)
    r = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--grid", f"sweep:{out}", "--seeds", "0", "1",
                        "--runs-root", str(runs), "--cluster", "debug", "--gpus-per-node", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # command 2: the tables, with the sweep's selection beside the retrained seeds
    r = subprocess.run([sys.executable, str(REPO / "launch" / "aggregate.py"), "--sweep", str(out),
                        "--runs-root", str(runs), "--out", str(rep), "--no-plot"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sel = json.loads((out / "selection.json").read_text())["best"]
    label = Path(sel[0]["yaml"]).stem
    grid = runs / f"sweep-{out.name}"
    finals = [json.loads((grid / label / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    row = next(x for x in csv.DictReader(open(rep / "sweep.csv")) if x["config"] == label)
    assert row["trial"] == sel[0]["trial_id"] and row["rank"] == "1" and row["seeds"] == "2"
    assert row["mode"] == "+ne-gt+id-dis" and "loss.recon=" in row["sampled"]
    for head, key in (("E_dis", "E_dis_ref_mean"), ("E_rec", "E_rec_mean"), ("AVD_neu", "AVD_neu_mean")):
        vals = [f[key] for f in finals]
        assert float(row[head]) == pytest.approx(statistics.mean(vals))
        assert float(row[f"{head} (seed std)"]) == pytest.approx(statistics.stdev(vals))
    trial = next(x for x in csv.DictReader(open(out / "trials.csv")) if x["trial_id"] == sel[0]["trial_id"])
    assert float(row["sweep E_dis"]) == pytest.approx(float(trial["E_dis_ref_mean"]))
    assert float(row["sweep E_rec"]) == pytest.approx(float(trial["E_rec_mean"]))
    assert row["paper E_dis"] == ""  # synth: the paper has no numbers
    md = (rep / "tables.md").read_text()
    assert f"## Sweep selection: `{out.resolve()}`" in md and f"ours: {label}" in md
    assert "Table I layout: synth (no published numbers)" in md
    # the same selection on a data set the paper covers gets its Table IV row (same mode)
    info = agg.read_sweep(out)
    coma = agg.sweep_rows([], {**info, "dataset": "coma"})
    p = paper_numbers.ablation_row("coma", True, True)
    assert coma[0]["paper E_dis"][0] == p["E_dis_mean"] and coma[0]["paper E_rec"][0] == p["E_rec_mean"]
    assert coma[0]["seeds"] == 0 and coma[0]["E_dis"] == (None, None)
