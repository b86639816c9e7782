"""Ray Tune sweeps as Slurm jobs (``facedis submit --sweep``, facedis/cluster/ray_sweep.py).

Without Slurm: the ``--sweep`` argument checks (exit status 2, nothing created, no executor built),
the Ray commands and sizes the job builds, a sweep's progress read from its files, and the cleanup of
marked processes (real processes).

On the real single-node Slurm of ``.ci/slurm-up.sh`` (marker ``slurm``; the fixture of
tests/test_slurm.py): one job brings up its own Ray head in the allocation and runs the smoke-test
synth sweep (4 trials x 3 epochs, 2 CPUs); once a trial has finished it is requeued with
``scontrol requeue``; once the resumed sweep has made progress it gets the preemption/timeout signal
(USR2, as ``--signal-delay-s`` before the time limit); the third run completes the sweep. The checks:
the results, no trial redone, ``facedis status`` mid-sweep and at the end, and no Ray process of the
job left on the machine after each interruption and at the end (processes are told apart from anyone
else's Ray by the job's temp dir, which every process of the job's Ray carries in its environment).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml

from facedis.cluster import ray_sweep, status, submit
from test_launch import REPO, need_engine, no_slurm  # noqa: F401 - no_slurm is a fixture
from test_slurm import slurm_env, submit_cli, wait_job  # noqa: F401 - slurm_env is a fixture

SMOKE_TRIALS, SMOKE_EPOCHS = 4, 3


# ------------------------------------------------------------------------------------ argument checks

GOOD = ["--sweep", "synth", "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "2", "--time", "00:10:00",
        "--cluster", "slurm"]


def _replace(argv: list[str], option: str, value: str | None) -> list[str]:
    out = list(argv)
    i = out.index(option)
    if value is None:
        del out[i:i + 2]
    else:
        out[i + 1] = value
    return out


@pytest.mark.parametrize("argv, match", [
    (_replace(GOOD, "--nodes", "0"), "--nodes"),
    (_replace(GOOD, "--nodes", "-2"), "--nodes"),
    (_replace(GOOD, "--gpus-per-node", "-1"), "--gpus-per-node"),
    (_replace(GOOD, "--cpus-per-task", "0"), "--cpus-per-task"),
    (_replace(GOOD, "--cpus-per-task", None), "needs --cpus-per-task"),
    (_replace(GOOD, "--cluster", "local"), "--cluster slurm"),
    (_replace(GOOD, "--sweep", "mnist"), "neither a data set"),
    ([*GOOD, "--seeds", "1"], "--seeds"),
    ([*GOOD, "--config", "synth"], "--config"),
    ([*GOOD, "--grid", "ablation"], "--grid"),
    ([*GOOD, "--tasks-per-node", "2"], "--tasks-per-node"),
    ([*GOOD, "--probe"], "--probe"),
    ([*GOOD, "--partition", "gpu; rm -rf /"], "partition"),
    ([*GOOD, "--grid-name", "a b"], "sweep name"),
    ([*GOOD, "--ray-join-timeout-s", "0"], "--ray-join-timeout-s"),
    ([*GOOD, "--", "--address", "auto"], "--address after --"),
    ([*GOOD, "--", "--out", "elsewhere"], "--out after --"),
    ([*GOOD, "--", "--resume"], "--resume after --"),
    ([*GOOD, "--", "--num-cpus", "4"], "--num-cpus after --"),
    ([*GOOD, "--", "--dataset", "coma"], "--dataset after --"),
    ([*GOOD, "--", "--cpus-per-trial", "4"], "no node could run a trial"),
    ([*GOOD, "--", "--gpus-per-trial", "1"], "no node could run a trial"),
    ([*GOOD, "--", "--no-such-option"], "no-such-option"),
    ([*GOOD, "--", "--scheduler", "nope"], "scheduler"),
    (["--config", "synth", "--", "--smoke-test"], "only with --sweep"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_sweep_cli_rejects_bad_arguments(argv, match, no_slurm, tmp_path, capsys):  # noqa: F811
    """Every bad --sweep argument exits with status 2 and a message naming it; nothing is created."""
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        submit.main(["--runs-root", str(runs), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err
    assert not runs.exists()


def test_sweep_dry_run_and_resubmission_rules(no_slurm, tmp_path, capsys):  # noqa: F811
    runs = tmp_path / "runs"
    argv = [*GOOD, "--runs-root", str(runs), "--dry-run", "--set", "train.epochs=2", "--", "--smoke-test",
            "--num-samples", "3"]
    assert submit.main(argv) == 0
    out = capsys.readouterr().out
    assert "sweep tune-synth-smoke: 1 node(s) x (2 CPUs, 0 GPUs)" in out
    assert "facedis tune --dataset synth --set=train.epochs=2 --smoke-test --num-samples 3 --address <head>" in out
    assert f"would   submit the sweep -> {runs.resolve() / 'tune-synth-smoke' / 'sweep'}" in out
    assert not runs.exists()
    # a preset: its data set picks the search space, the preset is the base config
    assert submit.main([*_replace(GOOD, "--sweep", "rows/coma-negt-iddis"), "--runs-root", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep tune-coma-negt-iddis" in out and "--dataset coma --config " in out and "coma-negt-iddis.yaml" in out

    # the directory holds a sweep submitted with other options: refused (status 2), not silently resumed
    run_dir = runs / "tune-synth-smoke"
    ray_sweep.atomic_write(ray_sweep.request_path(run_dir), json.dumps({"sweep": "synth", "tune_argv": ["--dataset", "synth"]}))
    with pytest.raises(SystemExit) as e:
        submit.main(argv)
    assert e.value.code == 2 and "submitted with other options" in capsys.readouterr().err
    # a finished sweep is not submitted again
    tune_argv = ["--dataset", "synth", "--set=train.epochs=2", "--smoke-test", "--num-samples", "3"]
    ray_sweep.atomic_write(ray_sweep.request_path(run_dir), json.dumps({"sweep": "synth", "tune_argv": tune_argv}))
    ray_sweep.atomic_write(ray_sweep.finished_path(run_dir), "{}")
    assert submit.main([a for a in argv if a != "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "nothing to submit" in out


def test_executor_parameters_one_task_per_node(no_slurm):  # noqa: F811
    p = submit.executor_parameters("slurm", nodes=3, gpus_per_node=4, cpus_per_task=32, one_task_per_node=True,
                                   job_name="facedis-tune-coma")
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (3, 1, 4, 32)
    with pytest.raises(ValueError, match="one task per node"):
        submit.executor_parameters("slurm", gpus_per_node=4, tasks_per_node=4, one_task_per_node=True)


# ------------------------------------------------------------------------------------ the job's parts


def test_ray_commands_and_sizes(tmp_path):
    assert ray_sweep.ray_temp_dir("1234", 2, 0) == "/tmp/rfd1234-2-0"
    with pytest.raises(ValueError, match="too long"):
        ray_sweep.ray_temp_dir("1234", 0, 0, root="/tmp/" + "x" * 40)
    assert ray_sweep.node_memory_bytes({"SLURM_MEM_PER_NODE": "4000"}) == 4000 * 1024**2
    assert ray_sweep.node_memory_bytes({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "3"}) == 3000 * 1024**2
    assert ray_sweep.node_memory_bytes({}) is None
    opts = ray_sweep.memory_options(10 * 1024**3)
    assert opts == ["--object-store-memory", str(3 * 1024**3), "--memory", str(7 * 1024**3)]
    assert ray_sweep.memory_options(100 * 1024**2)[:2] == ["--object-store-memory", str(80 * 1024**2)]  # Ray's minimum
    assert ray_sweep.memory_options(None) == []

    ports = {"dashboard_agent": 40001, "dashboard": 40002, "client": 40003}
    head = ray_sweep.ray_start_command(head_address=None, node_ip="10.0.0.1", cpus=8, gpus=2, temp_dir="/tmp/rfd1-0-0",
                                       ports=ports, mem_bytes=10 * 1024**3)
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head and "--port=0" in head
    for opt in ("--node-ip-address=10.0.0.1", "--num-cpus=8", "--num-gpus=2", "--temp-dir=/tmp/rfd1-0-0",
                "--dashboard-port=40002", "--ray-client-server-port=40003", "--dashboard-agent-listen-port=40001",
                "--object-store-memory", "--include-dashboard=false"):
        assert opt in head, opt
    worker = ray_sweep.ray_start_command(head_address="10.0.0.1:6380", node_ip="10.0.0.2", cpus=8, gpus=2,
                                         temp_dir="/tmp/rfd1-0-1", ports=ports)
    assert "--address=10.0.0.1:6380" in worker and "--head" not in worker and "--block" in worker
    assert not any(w.startswith(("--port", "--dashboard-port", "--ray-client")) for w in worker)

    spec = ray_sweep.SweepSpec(name="s", run_dir=str(tmp_path / "s"), tune_argv=["--dataset", "synth"], nodes=2,
                               cpus_per_node=8)
    assert ray_sweep.tune_command(spec, "10.0.0.1:6380", False, python="py")[-4:] == [
        "--address", "10.0.0.1:6380", "--out", str(tmp_path / "s" / "sweep")]
    assert ray_sweep.tune_command(spec, "a:1", True, python="py")[-2:] == ["--resume", str(tmp_path / "s" / "sweep")]
    assert not ray_sweep.has_started(spec.out)


def test_checkpoint_is_fresh_resubmission_and_nothing_runtime_is_pickled(tmp_path):
    spec = ray_sweep.SweepSpec(name="s", run_dir=str(tmp_path), tune_argv=[], nodes=1, cpus_per_node=1)
    job = ray_sweep.RaySweepJob()
    delayed = job.checkpoint(spec)
    assert isinstance(delayed.function, ray_sweep.RaySweepJob) and delayed.function is not job
    assert delayed.args == (spec,)
    job._node = object()  # a running job's state never travels with a (re)submission
    assert pickle.loads(pickle.dumps(job))._node is None


def _trial(tid: str, status_: str, last: dict) -> list[str]:
    return [json.dumps({"trial_id": tid, "status": status_}), json.dumps({"last_result": last})]


def test_sweep_progress_and_status_from_files(tmp_path, capsys):
    out = tmp_path / "runs" / "tune-x" / "sweep"
    (out / "tune").mkdir(parents=True)
    ray_sweep.atomic_write(ray_sweep.request_path(out.parent), json.dumps({"sweep": "synth", "tune_argv": []}))
    (out / "sweep.json").write_text(json.dumps({"dataset": "synth", "num_samples": 3, "metrics": ["E_dis_ref_mean", "E_rec_mean"],
                                                "space": {"model.id_dim": "grid:2,4", "loss.recon": "loguniform:1:2"}}))
    rep = lambda e, o: {"epochs_done": e, "objective": o, "E_dis_ref_mean": o / 10, "E_rec_mean": o}  # noqa: E731
    state = {"trial_data": [_trial("t1", "TERMINATED", rep(3, 2.0)), _trial("t2", "RUNNING", rep(1, 1.5)),
                            _trial("t3", "ERROR", {}), _trial("t4", "PENDING", {})]}
    (out / "tune" / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    (out / "tune" / "experiment_state-2025-01-01_00-00-00.json").write_text("{not json")
    for tid, lines in {"t1": [rep(1, 3.0), rep(2, 2.5), rep(3, 2.0)], "t2": [rep(1, 1.5), rep(2, 1.2)]}.items():
        (out / "tune" / tid).mkdir()
        (out / "tune" / tid / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"half')
    p = ray_sweep.sweep_progress(out)
    assert (p["planned"], p["trials"], p["done"], p["running"], p["failed"], p["pending"]) == (6, 4, 1, 1, 1, 3)
    assert p["best"]["trial_id"] == "t2" and p["best"]["objective"] == 1.2 and p["best"]["epochs_done"] == 2
    assert ray_sweep.has_started(out)

    assert status.main([str(out.parent), "--no-scheduler"]) == 0
    text = capsys.readouterr().out
    assert "trials: 1 done, 1 running, 1 failed, 3 pending (of 6)" in text
    assert "best so far: t2  objective=1.2" in text and "finished no" in text
    assert status.main([str(out), "--json", "--no-scheduler"]) == 0  # a tune output directory works as well
    info = json.loads(capsys.readouterr().out)
    assert info["done"] == 1 and info["best"]["trial_id"] == "t2"


def _sleeper(env_extra: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, **env_extra})


def test_kill_marked_stops_only_the_marked_processes():
    mine = [_sleeper({ray_sweep.MARKER: "/tmp/rfdTEST-0-0"}), _sleeper({ray_sweep.MARKER: "/tmp/rfdTEST-0-1"})]
    other = [_sleeper({ray_sweep.MARKER: "/tmp/rfdOTHER-0-0"}), _sleeper({})]
    try:
        time.sleep(0.3)
        assert sorted(ray_sweep.marked_pids("/tmp/rfdTEST-")) == sorted(p.pid for p in mine)
        assert ray_sweep.kill_marked("/tmp/rfdTEST-0-0", grace_s=2) == 0
        assert mine[0].wait(timeout=5) == -signal.SIGTERM
        assert all(p.poll() is None for p in [mine[1], *other])
    finally:
        for p in [*mine, *other]:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------ real Slurm


def ray_processes(job_id: str, restart: int | None = None) -> list[str]:
    """Live processes of this job's Ray (environment marker or command line naming its temp dir)."""
    prefix = f"{ray_sweep.RAY_TMP_ROOT}/rfd{job_id}-" + ("" if restart is None else f"{restart}-")
    found = set(ray_sweep.marked_pids(prefix))
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if prefix.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.add(int(d))
            except OSError:
                pass
    out = []
    for pid in sorted(found):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:150].decode(errors="replace")
                out.append(f"{pid} {cmd}")
        except (OSError, IndexError):
            pass
    return out


def wait_no_ray(job_id: str, restart: int | None = None, within_s: float = 20.0) -> list[str]:
    deadline = time.time() + within_s
    while (left := ray_processes(job_id, restart)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def results(out: Path, trial: str) -> list[dict]:
    f = out / "tune" / trial / "result.json"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def status_json(run_dir: Path, env) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "launch" / "status.py"), str(run_dir), "--json"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(what: str, cond, job, deadline: float, poll_s: float = 0.5):
    """Poll ``cond()`` until it returns something true; fail if the job ends first or the deadline passes."""
    while not (got := cond()):
        assert not job.done(force_check=True), f"job ended while waiting for {what}:\n{job.stdout()}\n{job.stderr()}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n{job.stdout()}"
        time.sleep(poll_s)
    return got


def finished_reports(out: Path) -> dict[str, list[dict]]:
    """Trial id -> its reports, for every trial Ray Tune has recorded as finished."""
    p = ray_sweep.sweep_progress(out)
    return {r["trial_id"]: results(out, r["trial_id"]) for r in p["rows"] if r["status"] == "TERMINATED"}


@pytest.fixture(scope="module")
def requeued_sweep(slurm_env, tmp_path_factory):  # noqa: F811
    """One sweep job on the real Slurm, interrupted twice and resumed to the end:

    run 0 is requeued with ``scontrol requeue`` once a trial has finished (SIGTERM to every process of
    the job); run 1 gets submitit's preemption/timeout signal (USR2) once it has made progress of its
    own (the job stops the sweep and Ray itself and requeues); run 2 completes the sweep.
    """
    need_engine()
    base = tmp_path_factory.mktemp("ray-slurm")
    (base / "tmp").mkdir()
    env = {**slurm_env, "TMPDIR": str(base / "tmp")}  # the smoke test's data: private, not an earlier session's
    runs = base / "runs"
    t0 = time.time()
    submit_cli(["--sweep", "synth", "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "2", "--time", "00:15:00",
                "--partition", "debug", "--runs-root", str(runs), "--grid-name", "rs", "--",
                "--smoke-test", "--scheduler", "fifo"], env, base)
    run_dir, out = runs / "rs", runs / "rs" / "sweep"
    rec = [json.loads(x) for x in (run_dir / ".launch" / "jobs.jsonl").read_text().splitlines()][-1]
    job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
    deadline = time.time() + 600

    # run 0: requeue by Slurm once a trial has finished (Tune recorded it)
    wait_for("a finished trial", lambda: ray_sweep.sweep_progress(out).get("done", 0) >= 1, job, deadline)
    mid = status_json(run_dir, env)
    before_requeue = finished_reports(out)
    trials_before = {r["trial_id"] for r in ray_sweep.sweep_progress(out)["rows"]}
    lines_at_requeue = {t: len(results(out, t)) for t in trials_before}
    subprocess.run(["scontrol", "requeue", job.job_id], env=env, check=True)
    t_requeue = time.time()
    left_after_requeue = wait_no_ray(job.job_id, restart=0, within_s=20)

    # run 1: resumed; once it has reported something new and trials remain, the preemption/timeout signal
    def resumed_and_progressed():
        p = ray_sweep.sweep_progress(out)
        grew = any(len(results(out, r["trial_id"])) > lines_at_requeue.get(r["trial_id"], 0) for r in p["rows"])
        return "resuming the sweep" in job.stdout() and grew and p["running"] + p["pending"] > 0

    wait_for("progress of the resumed sweep", resumed_and_progressed, job, deadline)
    before_preemption = finished_reports(out)
    job._interrupt(timeout=True)  # USR2 only: what Slurm sends --signal-delay-s before the time limit
    left_after_preemption = wait_no_ray(job.job_id, restart=1, within_s=90)

    # run 2: to the end
    result = wait_job(job, deadline)
    left_at_end = wait_no_ray(job.job_id, within_s=20)
    end = status_json(run_dir, env)
    while end["state"] != "COMPLETED" and time.time() < deadline:  # sacct catches up a moment after the result
        time.sleep(2)
        end = status_json(run_dir, env)
    print(f"sweep job {job.job_id}: requeued after {t_requeue - t0:.0f} s, whole job {time.time() - t0:.0f} s")
    return {"job": job, "result": result, "run_dir": run_dir, "out": out, "mid": mid, "end": end,
            "before_requeue": before_requeue, "before_preemption": before_preemption, "trials_before": trials_before,
            "left_after_requeue": left_after_requeue, "left_after_preemption": left_after_preemption,
            "left_at_end": left_at_end, "env": env}


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_job_runs_ray_in_the_allocation_and_cleans_up(requeued_sweep):
    s = requeued_sweep
    job, out, run_dir = s["job"], s["out"], s["run_dir"]
    res = s["result"]
    assert res["done"] == SMOKE_TRIALS and res["failed"] == 0 and res["restart"] == 2
    assert json.loads(ray_sweep.finished_path(run_dir).read_text())["done"] == SMOKE_TRIALS
    # a real Ray cluster inside the allocation, once per run of the job: the head saw the node with the job's CPUs
    ray_runs = sorted((run_dir / ".launch" / "ray").iterdir())
    assert [d.name for d in ray_runs] == [f"{job.job_id}-r{k}" for k in range(3)]
    for d in ray_runs:
        nodes = json.loads((d / "nodes.json").read_text())
        assert len(nodes) == 1 and nodes[0]["resources"]["CPU"] == 2.0 and nodes[0]["resources"]["object_store_memory"] > 0
        head = json.loads((d / "head.json").read_text())
        assert head["address"].rsplit(":", 1)[1].isdigit()
        assert (d / "token").stat().st_mode & 0o077 == 0  # the job's Ray token: the user's only
        assert "Ray runtime started" in next(d.glob("node0-*.log")).read_text()
    stdout = job.stdout()
    assert stdout.count("[facedis.sweep] Ray head at ") == 3 and f"--temp-dir=/tmp/rfd{job.job_id}-2-0" in stdout
    assert f"--address {json.loads((ray_runs[2] / 'head.json').read_text())['address']}" in stdout
    # the sweep's own outputs
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == SMOKE_TRIALS and all(r["status"] == "completed" for r in rows)
    for r in rows:
        assert [x["epoch"] for x in results(out, r["trial_id"])] == list(range(1, SMOKE_EPOCHS + 1)), r["trial_id"]
    best = sorted(out.glob("best1-*.yaml"))
    assert len(best) == 1 and yaml.safe_load(best[0].read_text())["dataset"] == "synth"
    # nothing of the job's Ray is left on the machine, after either interruption or at the end, nor its temp dirs
    assert s["left_after_requeue"] == [], s["left_after_requeue"]
    assert s["left_after_preemption"] == [], s["left_after_preemption"]
    assert s["left_at_end"] == [], s["left_at_end"]
    assert not list(Path(ray_sweep.RAY_TMP_ROOT).glob(f"rfd{job.job_id}-*"))


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_sweep_resumes_without_redoing_finished_trials(requeued_sweep):
    s = requeued_sweep
    job, out = s["job"], s["out"]
    assert s["before_requeue"], "no trial had finished at the requeue"
    assert len(s["before_preemption"]) < SMOKE_TRIALS, "every trial had finished before the preemption signal"
    states = subprocess.run(["sacct", "-j", job.job_id, "-D", "-X", "-n", "-P", "-o", "State"], env=s["env"],
                            capture_output=True, text=True).stdout.split()
    assert states.count("REQUEUED") == 2 and states[-1] == "COMPLETED", states
    stdout = job.stdout()
    assert stdout.count("starting the sweep:") == 1 and stdout.count("resuming the sweep:") == 2, stdout
    assert "preempted/timed out: stopping the sweep and Ray" in stdout and "Requeued job" in stdout
    # finished trials were not run again: same trials, same reports, line for line
    final = {r["trial_id"] for r in ray_sweep.sweep_progress(out)["rows"]}
    assert s["trials_before"] <= final and len(final) == SMOKE_TRIALS
    for finished in (s["before_requeue"], s["before_preemption"]):
        for trial, reports in finished.items():
            assert results(out, trial) == reports, trial
    # and no trial trained an epoch twice (a trial interrupted mid-run continued from its checkpoint)
    for trial in final:
        epochs = [json.loads(x)["epoch"] for x in (out / "runs" / trial / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, SMOKE_EPOCHS + 1)), (trial, epochs)


@pytest.mark.slurm
@pytest.mark.slow
def test_status_shows_sweep_progress(requeued_sweep):
    mid, end = requeued_sweep["mid"], requeued_sweep["end"]
    assert mid["state"] == "RUNNING" and not mid["finished"]
    assert mid["done"] >= 1 and mid["done"] + mid["running"] + mid["failed"] + mid["pending"] == SMOKE_TRIALS
    assert mid["done"] < SMOKE_TRIALS and mid["best"] and mid["best"]["objective"] > 0
    assert end["state"] == "COMPLETED" and end["finished"]
    assert (end["done"], end["running"], end["failed"], end["pending"]) == (SMOKE_TRIALS, 0, 0, 0)
    assert end["winner"]["trial_id"] in {r["trial_id"] for r in end["rows"]}
    text = subprocess.run([sys.executable, str(REPO / "launch" / "status.py"), str(requeued_sweep["run_dir"])],
                          env=requeued_sweep["env"], capture_output=True, text=True, timeout=120).stdout
    assert f"trials: {SMOKE_TRIALS} done, 0 running, 0 failed, 0 pending (of {SMOKE_TRIALS})" in text
    assert "best so far: " in text and "finished yes" in text
