"""The launcher against a real single-node Slurm (``.ci/slurm-up.sh``): grid -> wait -> aggregate,
requeue/preemption -> resume, and the DDP environment of a 2-task job.

Uses the cluster named by ``SLURM_CONF`` (or the one ``.ci/slurm-up.sh`` writes). If none is
running but Slurm is installed and we are root, the module starts it (and stops it afterwards).
Skipped only where Slurm is not installed and ``CI`` is not true; with ``CI=true`` an unavailable
Slurm is a failure.
"""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml

from test_launch import IN_CI, REPO, need_engine, prepare_synth, tiny_overrides, write_sweep_dir

pytestmark = pytest.mark.slurm

SLURM_DIR = Path(os.environ.get("SLURM_DIR", "/tmp/facedis-slurm"))
METRICS = ("E_rec_mean", "E_rec_std", "E_rec_median", "AVD_neu_mean", "AVD_neu_std", "AVD_neu_median",
           "E_dis_ref_mean", "E_dis_ref_median", "E_dis_vstd_mean", "E_dis_vstd_median")


def _cluster_up(env) -> bool:
    if not shutil.which("sinfo", path=env.get("PATH")):
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in r.stdout.split())


def _unavailable(msg: str):
    if IN_CI:
        pytest.fail(f"CI=true but Slurm is unavailable: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def slurm_env():
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    if not env.get("SLURM_CONF") and (SLURM_DIR / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    started = False
    if not _cluster_up(env):
        installed = shutil.which("slurmctld", path=env["PATH"]) and shutil.which("sinfo", path=env["PATH"])
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            if not installed:
                _unavailable("Slurm is not installed (no sinfo/slurmctld) and installing it needs root + apt-get; "
                             "run `.ci/slurm-up.sh` as root to install and start it")
            _unavailable("Slurm is installed but not running, and starting it needs root (`.ci/slurm-up.sh`)")
        # root: slurm-up.sh installs the Debian packages when missing, then starts the daemons
        r = subprocess.run([str(REPO / ".ci" / "slurm-up.sh")], env={**env, "SLURM_DIR": str(SLURM_DIR)},
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            _unavailable(f".ci/slurm-up.sh failed:\n{r.stderr[-2000:]}")
        env["SLURM_CONF"] = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
        started = True
        if not _cluster_up(env):
            _unavailable("slurm-up.sh ran but sinfo shows no usable node")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # submitit's sacct/scancel calls in this process
    yield env
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if started:
        subprocess.run([str(REPO / ".ci" / "slurm-down.sh")], env={**env, "SLURM_DIR": str(SLURM_DIR)}, timeout=120)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    need_engine()
    return prepare_synth(tmp_path_factory.mktemp("slurm-synth") / "data")


def submit_cli(args, env, cwd, timeout=600):
    r = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"submit.py failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def manifest(grid_dir: Path) -> dict[str, dict]:
    recs = [json.loads(l) for l in (grid_dir / ".launch" / "jobs.jsonl").read_text().splitlines() if l.strip()]
    return {r["label"] + f"/seed{r['seed']}": r for r in recs}


def wait_job(job, deadline: float):
    while not job.done(force_check=True):
        if time.time() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} did not finish in time; state {job.state}")
        time.sleep(1)
    return job.result()


# ------------------------------------------------------------------------------------------------


def test_two_task_job_gets_ddp_environment(slurm_env, tmp_path):
    """A 2-task CPU job: world size 2, ranks 0/1, one master address/port, gloo all-reduce works."""
    r = submit_cli(["--probe", "--cluster", "slurm", "--partition", "debug", "--gpus-per-node", "0",
                    "--tasks-per-node", "2", "--time", "00:05:00", "--runs-root", str(tmp_path / "runs")],
                   slurm_env, tmp_path, timeout=300)
    results = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(results) == 2, r.stdout
    envs = [x["env"] for x in results]
    assert sorted(int(e["RANK"]) for e in envs) == [0, 1]
    assert sorted(int(e["LOCAL_RANK"]) for e in envs) == [0, 1]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert len({e["MASTER_ADDR"] for e in envs}) == 1 and len({e["MASTER_PORT"] for e in envs}) == 1
    assert {e["ACCELERATE_USE_CPU"] for e in envs} == {"true"}
    assert all(x["num_processes"] == 2 and x["distributed_type"].endswith("MULTI_CPU") for x in results)
    assert sorted(x["process_index"] for x in results) == [0, 1]
    assert all(x["rank_sum"] == 1.0 for x in results)  # all_reduce(rank) over the real process group


def test_grid_submit_wait_aggregate(slurm_env, synth, tmp_path):
    """2 configs x 2 seeds as one job array on Slurm -> wait -> status -> aggregate; table == runs' metrics."""
    best = write_sweep_dir(tmp_path / "best", {"with-dis": {"method": {"id_discriminator": True}},
                                               "no-dis": {"method": {"id_discriminator": False}}})
    runs = tmp_path / "runs"
    args = ["--grid", f"sweep:{best}", "--seeds", "0", "1", "--cluster", "slurm", "--partition", "debug",
            "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00", "--runs-root", str(runs), "--wait"]
    for o in tiny_overrides(synth, tmp_path / "artefacts"):
        args += ["--set", o]
    t0 = time.time()
    r = submit_cli(args, slurm_env, tmp_path)
    print(f"grid of 4 runs on Slurm: {time.time() - t0:.1f} s")
    grid = runs / "sweep-best"
    jobs = manifest(grid)
    assert sorted(jobs) == ["no-dis/seed0", "no-dis/seed1", "with-dis/seed0", "with-dis/seed1"]
    assert len({j["job_id"].split("_")[0] for j in jobs.values()}) == 1, "expected one job array"
    assert r.stdout.count("done    ") == 4, r.stdout

    # submitit reports a job done once its result file exists; Slurm's accounting says COMPLETED a
    # moment later, when the job's process has exited: poll the status tool until it catches up
    deadline = time.time() + 90
    while True:
        st = subprocess.run([sys.executable, str(REPO / "launch" / "status.py"), str(grid), "--json"], env=slurm_env,
                            capture_output=True, text=True, timeout=120)
        rows = [json.loads(l) for l in st.stdout.splitlines()]
        if all(x["state"] == "COMPLETED" for x in rows) or time.time() > deadline:
            break
        time.sleep(2)
    assert len(rows) == 4 and all(x["state"] == "COMPLETED" and x["finished"] and x["last"] for x in rows), st.stdout

    # resubmission skips everything
    again = submit_cli(args, slurm_env, tmp_path)
    assert again.stdout.count("finished (metrics.json exists)") == 4 and "nothing to submit" in again.stdout

    out = tmp_path / "report"
    a = subprocess.run([sys.executable, str(REPO / "launch" / "aggregate.py"), str(grid), "--out", str(out), "--strict"],
                       env=slurm_env, capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    summary = {row["config"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert set(summary) == {"with-dis", "no-dis"}
    for label in ("with-dis", "no-dis"):
        ms = [json.loads((grid / label / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        assert summary[label]["n_seeds"] == "2" and summary[label]["missing_seeds"] == ""
        for k in METRICS:
            vals = [m[k] for m in ms]
            assert float(summary[label][f"{k}_mean"]) == pytest.approx(statistics.mean(vals), rel=1e-9, abs=1e-12)
            assert float(summary[label][f"{k}_std"]) == pytest.approx(statistics.stdev(vals), rel=1e-9, abs=1e-12)
        md = (out / "tables.md").read_text()
        vals = [m["E_rec_mean"] for m in ms]
        assert f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" in md
        cfgs = [yaml.safe_load((grid / label / f"seed{s}" / "config.yaml").read_text()) for s in (0, 1)]
        assert [c["train"]["seed"] for c in cfgs] == [0, 1]
        assert {c["method"]["id_discriminator"] for c in cfgs} == {label == "with-dis"}
    assert (out / "summary.png").stat().st_size > 0 and (out / "table4.csv").is_file()
    assert "None." in (out / "tables.md").read_text().split("## Missing or failed runs")[1][:20]


# epochs for the interruption test: long enough that a requeue lands mid-run
REQUEUE_EPOCHS = int(os.environ.get("FACEDIS_TEST_REQUEUE_EPOCHS", "8"))


def test_requeue_and_preemption_resume_to_same_metrics(slurm_env, synth, tmp_path):
    """Three identical runs: one requeued with `scontrol requeue`, one preempted (USR2 -> submitit checkpoint ->
    requeue), one left alone. The interrupted ones resume from their checkpoints and end with the same metrics."""
    best = write_sweep_dir(tmp_path / "same", {"requeued": {}, "preempted": {}, "reference": {}})
    runs = tmp_path / "runs"
    args = ["--grid", f"sweep:{best}", "--seeds", "0", "--cluster", "slurm", "--partition", "debug",
            "--gpus-per-node", "0", "--time", "00:15:00", "--runs-root", str(runs), "--no-wait"]
    for o in [*tiny_overrides(synth, tmp_path / "artefacts"), f"train.epochs={REQUEUE_EPOCHS}",
              "train.checkpoint_every=1"]:
        args += ["--set", o]
    submit_cli(args, slurm_env, tmp_path)
    grid = runs / "sweep-same"
    recs = manifest(grid)
    jobs = {k.split("/")[0]: submitit.SlurmJob(folder=r["folder"], job_id=r["job_id"]) for k, r in recs.items()}
    dirs = {k: grid / k / "seed0" for k in jobs}
    deadline = time.time() + 480

    def interrupt_when_checkpointed(name, action):
        d = dirs[name]
        while not (d / "checkpoints" / "last").exists():
            assert not (d / "metrics.json").exists(), f"{name} finished before its first checkpoint was seen"
            assert time.time() < deadline, f"{name}: no checkpoint appeared"
            time.sleep(0.1)
        lines_before = len((d / "metrics.jsonl").read_text().splitlines()) if (d / "metrics.jsonl").exists() else 0
        action()
        return lines_before

    before_rq = interrupt_when_checkpointed(
        "requeued", lambda: subprocess.run(["scontrol", "requeue", jobs["requeued"].job_id], env=slurm_env, check=True))
    before_pe = interrupt_when_checkpointed("preempted", lambda: jobs["preempted"]._interrupt())
    assert before_rq < REQUEUE_EPOCHS and before_pe < REQUEUE_EPOCHS

    results = {k: wait_job(j, deadline) for k, j in jobs.items()}
    final = {k: json.loads((d / "metrics.json").read_text()) for k, d in dirs.items()}
    for k in ("requeued", "preempted"):
        for m in METRICS:
            assert final[k][m] == pytest.approx(final["reference"][m], rel=1e-6, abs=1e-9), (k, m)
        assert final[k]["epoch"] == final["reference"]["epoch"]
        assert isinstance(results[k], dict)
        # the job really ran twice: two starts in its log, and Slurm recorded the requeue
        log = jobs[k].paths.stdout.read_text()
        assert log.count("[facedis.launch] requeued/seed0 on" if k == "requeued" else "[facedis.launch] preempted/seed0 on") == 2, log
        states = subprocess.run(["sacct", "-j", jobs[k].job_id, "-D", "-X", "-n", "-P", "-o", "State"], env=slurm_env,
                                capture_output=True, text=True).stdout.split()
        assert "REQUEUED" in states or "PREEMPTED" in states, states
        # resumed, not restarted: every epoch was logged once
        epochs = [json.loads(l)["epoch"] for l in (dirs[k] / "metrics.jsonl").read_text().splitlines() if l.strip()]
        assert epochs == sorted(set(epochs)) and epochs[-1] == final[k]["epoch"], epochs
    assert "checkpoint" in jobs["preempted"].paths.stdout.read_text() + jobs["preempted"].paths.stderr.read_text()
