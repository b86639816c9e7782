"""benchmarks/gpu_check.py in its CPU mode, as a subprocess: the CPU checks pass, the GPU checks are
listed as skipped with the reason, and a failing check (a non-finite loss) makes it exit non-zero."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run_check(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    # no GPU: CUDA_VISIBLE_DEVICES="" makes a GPU machine look like this one, so the CPU mode is tested
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--json", str(out), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.is_file(), r.stdout[-4000:] + r.stderr[-4000:]
    return r, json.loads(out.read_text())


def table_rows(stdout: str) -> list[str]:
    """The lines of the printed table (between its rule and the first blank line)."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("check ")) + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


@pytest.mark.slow
def test_cpu_mode_passes_cpu_checks_and_skips_gpu_checks(tmp_path):
    r, res = run_check(tmp_path, "--quick")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert res["ok"] and res["mode"] == "cpu"
    checks = res["checks"]
    by = {(c["check"], c["device"].split(":")[0], c["precision"], c["compile"]): c for c in checks}

    passed = [("data: prepare synth", "cpu", "-", "-"),
              ("train synth", "cpu", "fp32", "no"), ("train synth", "cpu", "bf16", "no"),
              ("train synth", "cpu", "fp16", "no"),
              ("step bench coma B=1 fast-fp32", "cpu", "fp32", "no"),
              ("prefetcher: same batches", "cpu", "-", "-")]
    for key in passed:
        assert key in by, (key, sorted(by))
        assert by[key]["status"] == "pass", by[key]
    # real runs with finite losses and their metrics on disk
    for p in ("fp32", "bf16", "fp16"):
        run = Path(res["work"]) / "runs" / f"{p}-eager"
        final = json.loads((run / "metrics.json").read_text())
        assert final["global_step"] == 2 and final["train/total"] == final["train/total"]  # not NaN
        assert (run / "metrics.jsonl").is_file() and (run / "model.pt").is_file()
    assert "loss scale" in by[("train synth", "cpu", "fp16", "no")]["key"]  # the GradScalers were checkpointed
    assert re.search(r"% of (fp32|bf16) peak", by[("step bench coma B=1 fast-fp32", "cpu", "fp32", "no")]["key"])

    gpu = [c for c in checks if c["device"] == "cuda"]
    names = {c["check"] for c in gpu}
    assert {"train synth", "DDP accelerate launch", "step bench coma B=32 (% of bf16 peak)",
            "prefetcher: copy overlap"} <= names, names
    assert all(c["status"] == "skipped" and c["reason"].startswith("no CUDA device") for c in gpu), gpu
    compiled = by[("train synth", "cpu", "fp32,bf16,fp16", "yes")]
    assert compiled["status"] == "skipped" and "--cpu-compile" in compiled["reason"]
    assert not [c for c in checks if c["status"] == "FAIL"]

    # the printed table says the same, in words
    rows = table_rows(r.stdout)
    assert len(rows) == len(checks)
    assert sum("skipped: no CUDA device" in row for row in rows) == len(gpu)
    for row in rows:
        assert " pass " in row or "skipped: " in row, row
    assert "gpu_check: OK:" in r.stdout


def test_a_non_finite_loss_fails_the_check(tmp_path):
    """--inject-nan: the fp32 run trains at lr 1e30 (a real config value), its loss goes non-finite,
    the row reads FAIL with the entry point's message and the exit status is 1."""
    r, res = run_check(tmp_path, "--quick", "--checks", "train", "--precisions", "fp32", "--inject-nan")
    assert r.returncode == 1, r.stdout[-4000:] + r.stderr[-3000:]
    assert not res["ok"]
    bad = [c for c in res["checks"] if c["status"] == "FAIL"]
    assert len(bad) == 1 and bad[0]["precision"] == "fp32" and bad[0]["compile"] == "no"
    assert "non-finite loss (exit 3)" in bad[0]["reason"] and "NaN/inf" in bad[0]["reason"]
    row = [x for x in table_rows(r.stdout) if " FAIL " in x]
    assert len(row) == 1 and "non-finite loss" in row[0]
    assert "gpu_check: FAILED: " in r.stdout and "1 failed" in r.stdout


def test_bad_command_line_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--precisions", "fp64"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "--precisions: unknown ['fp64']; valid: fp32, bf16, fp16" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--checks", "train,gpus"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "--checks: unknown ['gpus']" in r.stderr
