"""facedis/cluster/ (entry scripts launch/*.py): grids, planning, argument safety, and real tiny runs through the local/debug executors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from facedis.cluster import grids, status, submit
from facedis.cluster.job import RunSpec, TrainJob

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Tiny, fast synth runs (CPU): used here and by tests/test_slurm.py.
TINY = ["train.epochs=2", "pretrain.epochs=1", "train.progress=false", "train.eval_every=1",
        "train.batch_size=8", "model.decoder_hidden=32", "model.width=0.25", "model.disc_width=0.25"]


def need_engine():
    """Skip (or fail in CI) until the engine, the synth preset and the data preparation exist."""
    missing = [p for p in ("facedis/engine.py", "configs/synth.yaml", "data_prep/prepare.py") if not (REPO / p).is_file()]
    if missing:
        msg = f"needs {', '.join(missing)} (engine/presets not in this checkout)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def prepare_synth(out: Path) -> Path:
    if not (out / "meta.json").is_file():
        subprocess.run([sys.executable, str(REPO / "data_prep" / "prepare.py"), "synth", "--out", str(out),
                        "--subjects", "6", "--per-subject", "10", "--vertices", "300", "--seed", "0"],
                       check=True, cwd=REPO, capture_output=True, text=True)
    return out


def tiny_overrides(data_root: Path, artefacts: Path) -> list[str]:
    return [f"data.root={data_root}", f"run.artefact_dir={artefacts}", *TINY]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    need_engine()
    return prepare_synth(tmp_path_factory.mktemp("synth") / "data")


def write_sweep_dir(d: Path, variants: dict[str, dict]) -> Path:
    """A directory of YAML configs, as the sweep tool writes its best configs."""
    d.mkdir(parents=True, exist_ok=True)
    for name, body in variants.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump({"base": str(REPO / "configs" / "synth.yaml"), **body}))
    return d


# ------------------------------------------------------------------------------------ pure parts


def test_parse_time():
    assert submit.parse_time("01:30:00") == 90
    assert submit.parse_time("00:00:30") == 1
    assert submit.parse_time("1-00:00:00") == 1440
    assert submit.parse_time("1-02") == 1560
    assert submit.parse_time("45") == 45
    assert submit.parse_time("10:30") == 11  # MM:SS rounds up
    with pytest.raises(Exception):
        submit.parse_time("1h")


@pytest.fixture
def no_slurm(monkeypatch, tmp_path):
    """No Slurm client on PATH and no submitit executor to be had: validation must need neither.

    (A Slurm executor needs ``srun``; on a machine where Slurm was never installed building one
    fails, so a check that only runs inside ``make_executor`` would depend on the machine.)
    """
    empty = tmp_path / "no-slurm-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    def refuse(*args, **kwargs):
        raise AssertionError("validation built a submitit executor")

    monkeypatch.setattr(submit.submitit, "AutoExecutor", refuse)


UNSAFE = ["gpu; rm -rf /", "a b", "x\ny", "$(id)", "`id`", "a'b", ""]


@pytest.mark.parametrize("bad", UNSAFE)
def test_unsafe_values_rejected(bad, no_slurm, tmp_path):
    for cluster in ("slurm", "local"):
        with pytest.raises(ValueError):
            submit.executor_parameters(cluster, partition=bad)
        with pytest.raises(ValueError):
            submit.executor_parameters(cluster, slurm_extra={"account": bad})
        with pytest.raises(ValueError):
            submit.executor_parameters(cluster, slurm_extra={bad: "abc"})
        with pytest.raises(ValueError):
            submit.executor_parameters(cluster, job_name=bad)
    # make_executor rejects before it hands anything to submitit (AutoExecutor would raise AssertionError)
    with pytest.raises(ValueError):
        submit.make_executor(tmp_path / "%j", "slurm", partition=bad)
    with pytest.raises(ValueError):
        submit.make_executor(tmp_path / "%j", "slurm", slurm_extra={"account": bad})


@pytest.mark.parametrize("kwargs, match", [
    (dict(cluster="pbs"), "cluster"),
    (dict(nodes=0), "--nodes"),
    (dict(gpus_per_node=-1), "--gpus-per-node"),
    (dict(gpus_per_node=2, tasks_per_node=1), "one task per GPU"),
    (dict(tasks_per_node=0), "--tasks-per-node"),
    (dict(cpus_per_task=0), "--cpus-per-task"),
    (dict(mem_gb=0), "--mem-gb"),
    (dict(timeout_min=0), "--time"),
    (dict(signal_delay_s=-1), "--signal-delay-s"),
    (dict(array_parallelism=0), "--array-parallelism"),
    (dict(max_timeouts=-1), "--max-timeouts"),
    (dict(nodes=1.5), "--nodes"),
    (dict(slurm_extra={"partition": "gpu"}), "use --partition"),
    (dict(slurm_extra={"time": "10"}), "use --time"),
    (dict(slurm_extra={"no_such_option": "1"}), "unknown Slurm parameter"),
])
def test_bad_resources_rejected(kwargs, match, no_slurm):
    with pytest.raises(ValueError, match=match):
        submit.executor_parameters(**kwargs)


def test_executor_parameters(no_slurm):
    p = submit.executor_parameters("slurm", gpus_per_node=4, partition="gpu", timeout_min=90, job_name="facedis-g",
                                   slurm_extra={"account": "abc", "qos": "high"})
    assert p == {"name": "facedis-g", "timeout_min": 90, "nodes": 1, "tasks_per_node": 4, "cpus_per_task": 8,
                 "gpus_per_node": 4, "slurm_partition": "gpu", "slurm_signal_delay_s": 120,
                 "slurm_array_parallelism": 256, "slurm_account": "abc", "slurm_qos": "high"}
    local = submit.executor_parameters("local", tasks_per_node=2, partition="gpu", mem_gb=2.5)
    assert local == {"name": "facedis", "timeout_min": 60, "nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1,
                     "mem_gb": 2.5}


@pytest.mark.parametrize("seeds", [[], [-1], [0, 2**32], [1, 0, 1], [True], ["0"], [0.5]])
def test_bad_seeds_rejected(seeds):
    with pytest.raises(ValueError, match="--seeds"):
        submit.check_seeds(seeds)


def test_good_seeds():
    assert submit.check_seeds([0, 3, 2**32 - 1]) == [0, 3, 2**32 - 1]
    assert submit.check_seeds((5,)) == [5]


@pytest.mark.parametrize("argv", [
    ["--grid", "nope"],
    ["--grid", "sweep:/nonexistent/facedis-sweep"],
    ["--seeds", "0", "0"],
    ["--seeds", "-1"],
    ["--partition", "gpu; rm -rf /"],
    ["--slurm", "account=$(id)"],
    ["--slurm", "partition=gpu"],
    ["--nodes", "0"],
    ["--gpus-per-node", "2", "--tasks-per-node", "1"],
    ["--gpus-per-node", "-1"],
    ["--grid-name", "a b"],
    ["--set", "train.no_such_key=1"],
], ids=lambda a: " ".join(a))
def test_cli_rejects_bad_arguments_before_anything(argv, no_slurm, tmp_path, capsys):
    """Every bad argument exits with status 2 and a message: no executor built, no directory created."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "synth"}))
    runs = tmp_path / "runs"
    base = [] if "--grid" in argv else ["--config", str(cfg)]
    with pytest.raises(SystemExit) as e:
        submit.main([*base, *argv, "--runs-root", str(runs), "--cluster", "slurm"])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not runs.exists()


def test_cli_dry_run_needs_no_slurm(no_slurm, tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "synth"}))
    runs = tmp_path / "runs"
    assert submit.main(["--config", str(cfg), "--seeds", "0", "1", "--runs-root", str(runs), "--cluster", "slurm",
                        "--partition", "gpu", "--slurm", "account=abc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would   p/seed0" in out and "would   p/seed1" in out
    assert not runs.exists()


def test_named_grids_are_data():
    name, entries = grids.resolve_grid("ablation")
    assert name == "ablation" and len(entries) == 12
    assert {e.config.name for e in entries} == {"coma.yaml", "bu3dfe.yaml", "facescape.yaml"}
    combos = {(e.config.stem, e.overrides[grids.NEUTRAL_GT_KEY], e.overrides[grids.ID_DISCRIMINATOR_KEY]) for e in entries}
    assert len(combos) == 12
    assert len({e.label for e in entries}) == 12
    assert "coma-ne-gt+id-dis" in {e.label for e in entries}
    with pytest.raises(ValueError, match="named grids"):
        grids.resolve_grid("nope")


def test_grid_overrides_are_valid_config_keys():
    """Every named grid's override keys exist in Config, and presets that exist load with them."""
    from facedis.config import Config, apply_overrides, load_config

    for name in grids.GRIDS:
        _, entries = grids.resolve_grid(name)
        for e in entries:
            apply_overrides(Config(), e.overrides)  # raises ConfigError on a wrong key
            if e.config.is_file():
                cfg = load_config(e.config, overrides=e.overrides)
                for k, v in e.overrides.items():
                    sec, key = k.split(".")
                    assert getattr(getattr(cfg, sec), key) == v


def test_sweep_grid_and_modes(tmp_path):
    d = write_sweep_dir(tmp_path / "best", {"lr-a": {"optim": {"lr_vae": 1e-3}}, "lr-b": {"optim": {"lr_vae": 1e-4}}})
    name, entries = grids.resolve_grid(f"sweep:{d}")
    assert name == "sweep-best" and [e.label for e in entries] == ["lr-a", "lr-b"]
    modes = grids.apply_grid_modes([tmp_path / "mine.yaml"], "ablation")
    assert len(modes) == 4 and {e.label for e in modes} == {"mine-ne-gt-id-dis", "mine-ne-gt+id-dis", "mine+ne-gt-id-dis", "mine+ne-gt+id-dis"}
    with pytest.raises(ValueError):
        grids.resolve_grid(f"sweep:{tmp_path / 'missing'}")


def test_plan_runs_layout(tmp_path):
    d = write_sweep_dir(tmp_path / "best", {"a": {}, "b": {"method": {"id_discriminator": False}}}) if (REPO / "configs" / "synth.yaml").is_file() else None
    if d is None:
        cfg = tmp_path / "p.yaml"
        cfg.write_text(yaml.safe_dump({"dataset": "synth", "data": {"root": "data/x"}}))
        entries = grids.configs_as_grid([cfg])
    else:
        _, entries = grids.resolve_grid(f"sweep:{d}")
    specs = submit.plan_runs(entries, "g", [0, 3], tmp_path / "runs", ["train.epochs=1"])
    assert len(specs) == 2 * len(entries)
    for s in specs:
        assert Path(s.run_dir) == (tmp_path / "runs" / "g" / s.label / f"seed{s.seed}").resolve()
        assert s.cfg.train.seed == s.seed and s.cfg.run.dir == s.run_dir and s.cfg.train.epochs == 1
        assert Path(s.cfg.data.root).is_absolute()


def test_cli_dry_run_and_skip_finished(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "synth"}))
    runs = tmp_path / "runs"
    done = runs / "p" / "p" / "seed1"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    r = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--config", str(cfg), "--seeds", "0", "1",
                        "--runs-root", str(runs), "--cluster", "local", "--gpus-per-node", "0", "--dry-run"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skip    p/seed1: finished" in r.stdout and "would   p/seed0" in r.stdout


def test_status_reads_files_only(tmp_path):
    g = tmp_path / "runs" / "g"
    a = g / "cfg" / "seed0"
    a.mkdir(parents=True)
    (a / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "E_rec_mean": 2.0}) + "\n" + json.dumps({"epoch": 2, "E_rec_mean": 1.5}) + "\n{\"epo")
    (g / "cfg" / "seed1").mkdir()
    rows = status.collect(g, query_scheduler=False)
    assert [r["run"] for r in rows] == ["cfg/seed0", "cfg/seed1"]
    assert rows[0]["last"] == {"epoch": 2, "E_rec_mean": 1.5} and not rows[0]["finished"]
    assert "0/2 finished" in status.render(rows)


def test_trainjob_checkpoint_is_fresh_resubmission():
    spec = RunSpec("g", "c", 0, "/nonexistent", "c.yaml", {}, None)
    job = TrainJob(cpu=True, threads=1)
    delayed = job.checkpoint(spec)
    assert isinstance(delayed.function, TrainJob) and delayed.function is not job
    assert delayed.args == (spec,)


# ------------------------------------------------------------------------------------ real runs


def test_debug_cluster_runs_and_resubmission_skips(synth_data, tmp_path):
    """Two seeds through the launcher in-process (debug executor): real training, then a no-op resubmission."""
    runs = tmp_path / "runs"
    args = ["--config", str(REPO / "configs" / "synth.yaml"), "--seeds", "0", "1", "--runs-root", str(runs),
            "--cluster", "debug", "--gpus-per-node", "0", "--grid-name", "dbg"]
    for o in tiny_overrides(synth_data, tmp_path / "artefacts"):
        args += ["--set", o]
    saved = dict(os.environ)  # the debug executor runs the job (and its env exports) in this process
    try:
        assert submit.main(args) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for seed in (0, 1):
        d = runs / "dbg" / "synth" / f"seed{seed}"
        m = json.loads((d / "metrics.json").read_text())
        assert m["seed"] == seed and (d / "config.yaml").is_file()
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["train"]["seed"] == seed and Path(cfg["run"]["dir"]) == d.resolve()
    before = (runs / "dbg" / "synth" / "seed0" / "metrics.json").stat().st_mtime_ns
    r = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("finished (metrics.json exists)") == 2 and "nothing to submit" in r.stdout
    assert (runs / "dbg" / "synth" / "seed0" / "metrics.json").stat().st_mtime_ns == before
    rows = status.collect(runs / "dbg", query_scheduler=False)
    assert len(rows) == 2 and all(r["finished"] and r["last"] for r in rows)
