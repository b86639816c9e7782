"""facedis/cluster/aggregate.py (launch/aggregate.py) on run directories laid out as the engine writes them, and the paper's numbers."""

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from facedis import paper_numbers
from facedis.cluster import aggregate as agg

REPO = Path(__file__).resolve().parent.parent
KEYS = agg.METRIC_KEYS


def _write_run(grid: Path, label: str, seed: int, dataset: str, ne_gt: bool, id_dis: bool, base: float,
               metrics: dict | None = None, finished: bool = True) -> dict:
    d = grid / label / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {"dataset": dataset, "method": {"neutral_gt": ne_gt, "id_discriminator": id_dis},
           "train": {"seed": seed, "epochs": 2}, "run": {"dir": str(d), "name": f"g/{label}/seed{seed}"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = {k: base + 0.01 * i + 0.1 * seed for i, k in enumerate(KEYS)}
    m.update({"epoch": 2, "seed": seed, "dataset": dataset, "mode": ("+" if ne_gt else "-") + "ne-gt" + ("+" if id_dis else "-") + "id-dis"})
    m.update(metrics or {})
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, **m}) + "\n")
    if finished:
        (d / "metrics.json").write_text(json.dumps(m))
    return m


@pytest.fixture
def grid(tmp_path):
    g = tmp_path / "runs" / "ablation"
    runs = {}
    for seed in (0, 1, 2):
        runs[("coma-ne-gt+id-dis", seed)] = _write_run(g, "coma-ne-gt+id-dis", seed, "coma", False, True, 1.0)
    for seed in (0, 1):
        runs[("bu3dfe+ne-gt-id-dis", seed)] = _write_run(g, "bu3dfe+ne-gt-id-dis", seed, "bu3dfe", True, False, 2.0)
    # seed 2 of bu3dfe never finished; a synth config with one NaN run and one good run
    _write_run(g, "bu3dfe+ne-gt-id-dis", 2, "bu3dfe", True, False, 2.0, finished=False)
    runs[("synth-ne-gt+id-dis", 0)] = _write_run(g, "synth-ne-gt+id-dis", 0, "synth", False, True, 3.0)
    _write_run(g, "synth-ne-gt+id-dis", 1, "synth", False, True, 3.0, metrics={"E_rec_mean": float("nan")})
    (g / ".submitit").mkdir()  # launcher folders are not configs
    (g / "_artefacts").mkdir()
    return g, runs


def test_mean_std_over_seeds_and_missing_runs_listed(grid, tmp_path):
    g, runs = grid
    res = agg.aggregate(g, tmp_path / "rep")
    groups = {x.label: x for x in res["groups"]}
    coma = groups["coma-ne-gt+id-dis"]
    assert coma.seeds == ["0", "1", "2"]
    for k in KEYS:
        vals = [runs[("coma-ne-gt+id-dis", s)][k] for s in (0, 1, 2)]
        m, s, n = coma.stats[k]
        assert n == 3 and m == pytest.approx(statistics.mean(vals)) and s == pytest.approx(statistics.stdev(vals))
    bu = groups["bu3dfe+ne-gt-id-dis"]
    assert bu.seeds == ["0", "1"] and [r.seed for r in bu.missing] == ["2"]
    syn = groups["synth-ne-gt+id-dis"]
    assert syn.seeds == ["0"] and syn.stats["E_rec_mean"][1] is None  # one seed: no std
    problems = {(r.label, r.seed): r.problem for r in res["problems"]}
    assert "no metrics.json" in problems[("bu3dfe+ne-gt-id-dis", "2")]
    assert "non-finite" in problems[("synth-ne-gt+id-dis", "1")]
    assert "no run directory" in problems[("synth-ne-gt+id-dis", "2")]  # seed 2 exists for other configs
    assert len(problems) == 3

    md = (tmp_path / "rep" / "tables.md").read_text()
    assert "## Missing or failed runs" in md and "bu3dfe+ne-gt-id-dis | 2 |" in md
    # our cell: mean ± seed std, with the paper's Table IV row right after it
    vals = [runs[("coma-ne-gt+id-dis", s)]["E_rec_mean"] for s in (0, 1, 2)]
    assert f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" in md
    lines = md.splitlines()
    i = next(i for i, l in enumerate(lines) if "ours: coma-ne-gt+id-dis" in l and "| − | + |" in l)
    assert "paper Table IV (CoMA, −ne-gt +id-dis)" in lines[i + 1] and "| 0.783 |" in lines[i + 1]
    assert "Table I layout: CoMA" in md and "paper: DI-MeshEncoder [41]" in md
    assert "Table II layout: BU3DFE" in md and "no published numbers" in md
    for f in ("table4.csv", "table1_coma.csv", "table2_bu3dfe.csv", "table_synth.csv", "summary.csv",
              "runs.csv", "missing.csv", "summary.png", "tables.md"):
        assert (tmp_path / "rep" / f).stat().st_size > 0, f
    assert (tmp_path / "rep" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # training curves per config, mean ± std over its finished seeds
    curves = sorted(p.name for p in (tmp_path / "rep" / "curves").glob("*.png"))
    assert curves == sorted(f"{label}.png" for label in groups)


def test_csv_values_equal_run_metrics(grid, tmp_path):
    g, runs = grid
    agg.aggregate(g, tmp_path / "rep", make_plot=False)
    rows = {r["config"]: r for r in csv.DictReader(open(tmp_path / "rep" / "summary.csv"))}
    coma = rows["coma-ne-gt+id-dis"]
    assert coma["n_seeds"] == "3" and coma["dataset"] == "coma" and coma["mode"] == "-ne-gt+id-dis"
    for k in KEYS:
        vals = [runs[("coma-ne-gt+id-dis", s)][k] for s in (0, 1, 2)]
        assert float(coma[f"{k}_mean"]) == pytest.approx(statistics.mean(vals))
        assert float(coma[f"{k}_std"]) == pytest.approx(statistics.stdev(vals))
    assert rows["bu3dfe+ne-gt-id-dis"]["missing_seeds"] == "2"
    per_run = list(csv.DictReader(open(tmp_path / "rep" / "runs.csv")))
    assert len(per_run) == 3 + 2 + 1
    for r in per_run:
        want = runs[(r["config"], int(r["seed"]))]
        assert all(float(r[k]) == pytest.approx(want[k]) for k in KEYS)
    t4 = list(csv.DictReader(open(tmp_path / "rep" / "table4.csv")))
    paper = [r for r in t4 if r["method"].startswith("paper Table IV (BU3DFE, +ne-gt −id-dis)")]
    assert len(paper) == 1 and float(paper[0]["AVD_neu mean"]) == 1.885 and paper[0]["AVD_neu mean (seed std)"] == ""


def test_seeds_flag_and_cli(grid, tmp_path):
    g, _ = grid
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, str(REPO / "launch" / "aggregate.py"), str(g), "--out", str(out),
                        "--seeds", "0", "1", "2", "3", "--strict", "--no-plot"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # --strict: missing runs
    assert "Table IV layout" in r.stdout
    missing = list(csv.DictReader(open(out / "missing.csv")))
    assert sum(m["seed"] == "3" for m in missing) == 3  # seed 3 asked for, present nowhere


def test_inconsistent_seed_configs_warned(tmp_path):
    g = tmp_path / "g"
    _write_run(g, "a", 0, "synth", False, True, 1.0)
    _write_run(g, "a", 1, "synth", True, True, 1.0)  # same label, different mode: suspicious
    res = agg.aggregate(g, tmp_path / "rep", make_plot=False)
    assert res["groups"][0].inconsistent == ["method.neutral_gt"]
    assert "seeds differ in more than the seed" in (tmp_path / "rep" / "tables.md").read_text()


def test_paper_numbers_consistent():
    # Table III is a rounding of Table IV; Tables I/II "Ours" rows equal Table IV's (except the
    # E_rec medians the paper itself reports differently).
    for ds, (_, rows) in paper_numbers.DATASET_TABLES.items():
        for row in rows:
            if "neutral_gt" not in row:
                continue
            t4 = paper_numbers.ablation_row(ds, row["neutral_gt"], row["id_discriminator"])
            for k, v in row.items():
                if k in ("method", "neutral_gt", "id_discriminator") or k == "E_rec_median":
                    continue
                assert t4[k] == pytest.approx(v, abs=0.006), (ds, row["method"], k)
    assert len(paper_numbers.TABLE_IV_ABLATION) == 12
    assert {(r["dataset"], r["neutral_gt"], r["id_discriminator"]) for r in paper_numbers.TABLE_IV_ABLATION} == {
        (d, a, b) for d in paper_numbers.DATASETS for a in (False, True) for b in (False, True)}
    assert paper_numbers.ablation_row("FaceScape", False, False)["AVD_neu_mean"] == 12.020
    assert paper_numbers.ablation_row("synth", False, True) is None
    assert paper_numbers.normalise_dataset("BU-3DFE") == "bu3dfe"
    assert all(math.isfinite(v) for r in paper_numbers.TABLE_IV_ABLATION for v in r.values() if isinstance(v, float))
