"""The training core's contract with Accelerate: precision, threads, dynamo, run names."""
import json

import pytest
import torch
import yaml

from facedis import engine
from facedis.config import ConfigError, TrainConfig
from facedis.runtime import Runtime, cpu_threads, resolve_precision


def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    GradientState._reset_state()


def test_precision_auto_follows_accelerate_and_explicit_wins():
    assert resolve_precision("auto", {}) == ("no", None)
    assert resolve_precision("auto", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == ("bf16", None)
    assert resolve_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"}) == ("fp16", None)
    assert resolve_precision("no", {}) == ("no", None)  # nothing to override outside accelerate launch
    p, note = resolve_precision("no", {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert p == "no" and "overrides Accelerate's mixed_precision=bf16" in note
    assert resolve_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == ("bf16", None)
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION"):
        resolve_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_cpu_threads_share_the_cores_under_accelerate_launch():
    assert cpu_threads(3, {}) == 3
    assert cpu_threads(0, {}) is None  # plain python: torch's default (OMP_NUM_THREADS)
    launched = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}
    import os

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(0, launched) == cores
    assert cpu_threads(0, {**launched, "LOCAL_WORLD_SIZE": str(cores)}) == 1
    assert cpu_threads(0, {**launched, "LOCAL_WORLD_SIZE": str(4 * cores)}) == 1


def test_run_records_the_precision_accelerate_asked_for(tiny_config, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = tiny_config(**{"train.epochs": 1, "pretrain.enabled": False, "train.max_steps_per_epoch": 2})
    assert cfg.train.precision == "auto"
    engine.train(cfg)
    run = cfg.run.resolved_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "bf16"
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["precision"] == "bf16" and prov["sessions"][-1]["precision"] == "bf16"
    out = capsys.readouterr().out
    assert "precision bf16" in out
    from facedis.runtime import cpu_bf16_matmul

    assert ("bf16 is emulated and slower than fp32" in out) == (not cpu_bf16_matmul())
    # an explicit value wins, with one line saying so
    forced = tiny_config(**{"train.epochs": 1, "pretrain.enabled": False, "train.max_steps_per_epoch": 2,
                            "train.precision": "no", "run.dir": str(run) + "-fp32"})
    engine.train(forced)
    out = capsys.readouterr().out
    assert out.count("train.precision=no overrides Accelerate's mixed_precision=bf16") == 1
    assert yaml.safe_load((forced.run.resolved_dir() / "config.yaml").read_text())["train"]["precision"] == "no"


def test_dynamo_backend_of_accelerate_applies_to_one_process(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    _fresh_accelerate_state()
    try:
        rt = Runtime(TrainConfig(cpu_threads=torch.get_num_threads()))
        assert rt.world == 1
        module, call = rt.prepare(torch.nn.Linear(3, 2))
        assert call is not module and getattr(call, "_orig_mod", None) is module
        torch.testing.assert_close(call(torch.ones(1, 3)), module(torch.ones(1, 3)))
    finally:
        _fresh_accelerate_state()


def test_bf16_evaluation_runs_in_full_precision(monkeypatch):
    """``accelerator.prepare`` wraps a module's forward in autocast; evaluation takes it off."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    rt = Runtime(TrainConfig(cpu_threads=torch.get_num_threads()))
    module, _ = rt.prepare(torch.nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert module(x).dtype == torch.float32  # Accelerate converts outputs back to fp32 ...
        with rt.full_precision(module):
            exact = module(x)
        rounded = module(x)
    ref = torch.nn.functional.linear(x, module.weight, module.bias)
    assert torch.equal(exact, ref)  # ... but only full precision gives the fp32 result
    assert not torch.equal(rounded, ref)


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/abs/path", ""])
def test_run_name_cannot_escape_out_dir(tiny_config, name):
    with pytest.raises(ConfigError, match="run.name"):
        engine.train(tiny_config(**{"run.name": name, "run.dir": ""}))
