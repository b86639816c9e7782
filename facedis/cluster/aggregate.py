"""Aggregate a grid's runs into the paper's tables: mean ± std over seeds, paper numbers alongside.

    facedis aggregate runs/ablation --out reports/ablation [--seeds 0 1 2]   # = python launch/aggregate.py ...
    facedis aggregate --sweep sweeps/results/coma-20260101-120000            # a sweep's retrained configs

Reads only what the runs wrote: ``<grid>/<label>/seed<k>/config.yaml`` and ``metrics.json``.
A run directory without a readable, complete ``metrics.json`` is listed as missing/failed and never
averaged over; so is a seed that other configs of the grid have (or ``--seeds`` names) but this
config does not. Writes to ``--out``:

- ``tables.md``: Table IV layout (every config), Table I/II/III layout per data set with the
  paper's rows, the missing/failed runs, and notes;
- ``table4.csv``, ``table1_coma.csv`` / ``table2_bu3dfe.csv`` / ``table3_facescape.csv`` (and
  ``table_<dataset>.csv`` for other data sets): the same rows, numbers in separate columns;
- ``summary.csv`` (one row per config: mean and std over seeds of every metric),
  ``runs.csv`` (one row per finished run), ``missing.csv``;
- ``summary.png``: per-metric bars (mean ± std over seeds) with the paper's values as markers;
- ``curves/<config>.png``: the training curves of each config, mean ± std over its seeds (from the
  runs' ``metrics.jsonl``);
- with ``--sweep <dir>`` (a ``facedis tune`` output whose selected configs were retrained with
  ``facedis submit --grid sweep:<dir>``): ``sweep.csv`` and a "Sweep selection" section in
  ``tables.md``: per selected config its rank, trial, mode and sampled values, its E_dis / E_rec in
  the sweep (one run at the trial budget) and retrained (mean ± std over seeds), and the paper's
  Table IV row of the same data set and mode. The grid directory defaults to
  ``<runs-root>/sweep-<dir name>``, where ``facedis submit --grid sweep:<dir>`` puts the runs.

Every file is written atomically (temporary name, then rename).

"± std" of our rows is the sample standard deviation (ddof=1) over seeds; it is omitted for a
single seed. The paper's "mean ± std" is a spread over test meshes and appears in its own columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from facedis import paper_numbers

METRIC_KEYS = (
    "E_rec_mean", "E_rec_std", "E_rec_median",
    "AVD_neu_mean", "AVD_neu_std", "AVD_neu_median",
    "E_dis_ref_mean", "E_dis_ref_median", "E_dis_vstd_mean", "E_dis_vstd_median",
)
# Columns of the paper-layout tables: (header, our metrics.json key, paper key).
COLS_T4 = [
    ("AVD_neu mean", "AVD_neu_mean", "AVD_neu_mean"), ("AVD_neu std", "AVD_neu_std", "AVD_neu_std"),
    ("AVD_neu med", "AVD_neu_median", "AVD_neu_median"),
    ("E_dis mean", "E_dis_ref_mean", "E_dis_mean"), ("E_dis med", "E_dis_ref_median", "E_dis_median"),
    ("E_dis(vstd) mean", "E_dis_vstd_mean", None), ("E_dis(vstd) med", "E_dis_vstd_median", None),
    ("E_rec mean", "E_rec_mean", "E_rec_mean"), ("E_rec std", "E_rec_std", "E_rec_std"),
    ("E_rec med", "E_rec_median", "E_rec_median"),
]
COLS_T12 = [c for c in COLS_T4 if not c[1].startswith("AVD")]
COLS_T3 = [c for c in COLS_T4 if c[1].startswith(("AVD", "E_dis"))]
TABLE_FILES = {"coma": "table1_coma", "bu3dfe": "table2_bu3dfe", "facescape": "table3_facescape"}


@dataclass
class Run:
    label: str
    seed: str
    path: Path
    config: dict | None = None
    metrics: dict | None = None
    problem: str | None = None


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)
    missing: list[Run] = field(default_factory=list)
    dataset: str | None = None
    neutral_gt: bool | None = None
    id_discriminator: bool | None = None
    mode: str | None = None
    stats: dict[str, tuple[float, float | None, int]] = field(default_factory=dict)
    inconsistent: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]


def _seed_key(name: str):
    s = name[4:]
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _read_run(label: str, seed_dir: Path) -> Run:
    run = Run(label, seed_dir.name[4:], seed_dir)
    cfg_path, met_path = seed_dir / "config.yaml", seed_dir / "metrics.json"
    if cfg_path.is_file():
        try:
            run.config = yaml.safe_load(cfg_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            run.problem = f"config.yaml unreadable: {e}"
            return run
    if not met_path.is_file():
        run.problem = "no metrics.json (not finished, failed or never started)"
        return run
    try:
        metrics = json.loads(met_path.read_text())
    except (OSError, ValueError) as e:
        run.problem = f"metrics.json unreadable: {e}"
        return run
    if not isinstance(metrics, dict):
        run.problem = "metrics.json is not an object"
        return run
    missing = [k for k in METRIC_KEYS if k not in metrics]
    bad = [k for k in METRIC_KEYS if k in metrics and not _finite(metrics[k])]
    if missing:
        run.problem = f"metrics.json lacks {', '.join(missing)}"
    elif bad:
        run.problem = f"non-finite metrics: {', '.join(bad)}"
    elif run.config is None:
        run.problem = "no config.yaml"
    run.metrics = metrics
    return run


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """(mean, sample std with ddof=1 or None for one value, n)."""
    n = len(values)
    if n == 0:
        return (math.nan, None, 0)
    m = math.fsum(values) / n
    if n == 1:
        return (m, None, 1)
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return (m, math.sqrt(var), n)


def _dig(d: dict | None, dotted: str):
    node: Any = d or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


_IGNORE_FOR_CONSISTENCY = {"train.seed", "run.dir", "run.name", "train.progress", "data.num_workers"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def scan(grid_dir: Path, seeds: Sequence[int] | None = None) -> tuple[list[Group], list[Run]]:
    """Read every run of a grid; returns (groups with complete runs, every missing/failed run)."""
    grid_dir = Path(grid_dir)
    labels = sorted(p for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    found: dict[str, dict[str, Run]] = {}
    for lab in labels:
        seed_dirs = [p for p in lab.iterdir() if p.is_dir() and p.name.startswith("seed")]
        if seed_dirs:
            found[lab.name] = {p.name[4:]: _read_run(lab.name, p) for p in seed_dirs}
    expected = {str(s) for s in seeds} if seeds is not None else set()
    for runs in found.values():
        expected |= set(runs)
    groups, problems = [], []
    for label, runs in found.items():
        g = Group(label)
        for seed in sorted(expected, key=lambda s: _seed_key("seed" + s)):
            run = runs.get(seed) or Run(label, seed, grid_dir / label / f"seed{seed}", problem="no run directory")
            if run.problem:
                g.missing.append(run)
                problems.append(run)
            else:
                g.runs.append(run)
        _describe(g)
        groups.append(g)
    return groups, problems


def _describe(g: Group) -> None:
    runs = g.runs or [r for r in g.missing if r.config or r.metrics]
    for r in runs:
        cfg, met = r.config or {}, r.metrics or {}
        g.dataset = g.dataset or met.get("dataset") or cfg.get("dataset")
        if g.neutral_gt is None and _dig(cfg, "method.neutral_gt") is not None:
            g.neutral_gt = bool(_dig(cfg, "method.neutral_gt"))
        if g.id_discriminator is None and _dig(cfg, "method.id_discriminator") is not None:
            g.id_discriminator = bool(_dig(cfg, "method.id_discriminator"))
        g.mode = g.mode or met.get("mode")
    if g.mode is None and g.neutral_gt is not None and g.id_discriminator is not None:
        g.mode = ("+ne-gt" if g.neutral_gt else "-ne-gt") + ("+id-dis" if g.id_discriminator else "-id-dis")
    for k in METRIC_KEYS:
        g.stats[k] = mean_std([float(r.metrics[k]) for r in g.runs])
    if len(g.runs) > 1:
        flat = [_flatten(r.config) for r in g.runs]
        keys = set().union(*flat) - _IGNORE_FOR_CONSISTENCY
        g.inconsistent = sorted(k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1)


# --------------------------------------------------------------------------------------------
# tables


def _paper_t4(g: Group) -> dict | None:
    if g.neutral_gt is None or g.id_discriminator is None:
        return None
    return paper_numbers.ablation_row(g.dataset, g.neutral_gt, g.id_discriminator)


def _our_row(g: Group, cols) -> dict:
    row = {"method": f"ours: {g.label}", "source": "ours", "seeds": len(g.runs), "dataset": g.dataset,
           "neutral_gt": g.neutral_gt, "id_discriminator": g.id_discriminator}
    for head, key, _ in cols:
        m, s, n = g.stats[key]
        row[head] = (m if n else None, s)
    return row


def _paper_row(prow: dict, cols, method: str) -> dict:
    row = {"method": method, "source": "paper", "seeds": None, "dataset": prow.get("dataset"),
           "neutral_gt": prow.get("neutral_gt"), "id_discriminator": prow.get("id_discriminator")}
    for head, _, pkey in cols:
        row[head] = (prow.get(pkey) if pkey else None, None)
    return row


def _sign(v) -> str:
    return "?" if v is None else ("+" if v else "−")


def _ds_order(dataset) -> tuple[int, str]:
    ds = paper_numbers.normalise_dataset(dataset)
    return (paper_numbers.DATASETS.index(ds), "") if ds else (len(paper_numbers.DATASETS), str(dataset))


def build_tables(groups: list[Group]) -> list[tuple[str, str, list[str], list[dict]]]:
    """[(title, csv stem, columns, rows)] in the layouts of Tables IV and I-III."""
    tables = []
    cols4 = [c[0] for c in COLS_T4]
    rows4 = []
    for g in sorted(groups, key=lambda g: (bool(g.neutral_gt), _ds_order(g.dataset), bool(g.id_discriminator), g.label)):
        rows4.append(_our_row(g, COLS_T4))
        p = _paper_t4(g)
        if p:
            rows4.append(_paper_row(p, COLS_T4, f"paper Table IV ({paper_numbers.DATASET_LABELS[p['dataset']]}, "
                                                f"{_sign(p['neutral_gt'])}ne-gt {_sign(p['id_discriminator'])}id-dis)"))
    tables.append(("Table IV layout (ablation): all configs", "table4",
                   ["neutral GT", "id-dis", "dataset", "method", "seeds", *cols4], rows4))
    by_ds: dict[str, list[Group]] = {}
    for g in groups:
        by_ds.setdefault(paper_numbers.normalise_dataset(g.dataset) or str(g.dataset), []).append(g)
    for ds, gs in sorted(by_ds.items(), key=lambda kv: (_ds_order(kv[0]), kv[0])):
        known = paper_numbers.dataset_table(ds)
        cols = COLS_T3 if ds == "facescape" else COLS_T12
        rows = []
        if known:
            title, prows = known
            rows += [_paper_row(r, cols, f"paper: {r['method']}") for r in prows]
            head = f"{title} layout: {paper_numbers.DATASET_LABELS[ds]}"
            stem = TABLE_FILES[ds]
        else:
            head, stem = f"Table I layout: {ds} (no published numbers)", f"table_{ds}"
        rows += [_our_row(g, cols) for g in sorted(gs, key=lambda g: g.label)]
        tables.append((head, stem, ["method", "seeds", *[c[0] for c in cols]], rows))
    return tables


# --------------------------------------------------------------------------------------------
# a sweep's selected configs, retrained


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_sweep(sweep_dir: Path) -> dict:
    """What ``facedis tune`` wrote about its selection: ``selection.json`` (the selected configs),
    ``trials.csv`` (their values in the sweep) and ``sweep.json`` (data set, search, budget).

    Returns ``{"dir", "dataset", "search", "scheduler", "num_trials", "trial_epochs", "metrics",
    "entries": [{"label", "rank", "trial_id", "config", "sweep": {metric: value}}]}``; an entry's
    label is its YAML file's stem, the label ``facedis submit --grid sweep:<dir>`` gives its runs.
    Raises ``FileNotFoundError`` if ``sweep_dir`` holds no finished sweep.
    """
    sweep_dir = Path(sweep_dir)
    sel_path = sweep_dir / "selection.json"
    if not sel_path.is_file():
        raise FileNotFoundError(f"--sweep {sweep_dir}: no selection.json (not a finished facedis tune output)")
    sel = json.loads(sel_path.read_text())
    state = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").is_file() else {}
    trials = {}
    if (sweep_dir / "trials.csv").is_file():
        with open(sweep_dir / "trials.csv", newline="") as f:
            trials = {r["trial_id"]: r for r in csv.DictReader(f)}
    metrics = list(sel.get("metrics") or state.get("metrics") or ["E_dis_ref_mean", "E_rec_mean"])
    keys = list(dict.fromkeys([*metrics, "E_dis_ref_mean", "E_dis_vstd_mean", "E_rec_mean", "AVD_neu_mean"]))
    entries = []
    for b in sel.get("best", []):
        row = trials.get(b["trial_id"], {})
        entries.append({"label": Path(b["yaml"]).stem, "rank": b.get("rank"), "trial_id": b["trial_id"],
                        "config": dict(b.get("config") or {}),
                        "sweep": {k: _float(b.get(k, row.get(k))) for k in keys}})
    base_epochs = _dig(state.get("base"), "train.epochs")
    trial_epochs = (state.get("trial_set") or {}).get("train.epochs", base_epochs)
    return {"dir": str(sweep_dir.resolve()), "dataset": state.get("dataset"), "search": state.get("search", "random"),
            "scheduler": state.get("scheduler"), "num_trials": sel.get("num_trials"), "trial_epochs": trial_epochs,
            "metrics": metrics, "entries": entries}


SWEEP_COLUMNS = ["config", "rank", "trial", "mode", "sampled", "sweep E_dis", "sweep E_rec", "seeds",
                 "E_dis", "E_rec", "AVD_neu", "paper E_dis", "paper E_rec", "paper AVD_neu"]


def _fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def sweep_rows(groups: list[Group], sweep: dict) -> list[dict]:
    """One row per selected config of the sweep (retrained or not), then any other config of the grid."""
    dis_key = sweep["metrics"][0] if sweep["metrics"][0] in METRIC_KEYS else "E_dis_ref_mean"
    rec_key = sweep["metrics"][1] if sweep["metrics"][1] in METRIC_KEYS else "E_rec_mean"
    by_label = {g.label: g for g in groups}
    rows = []
    for e in sweep["entries"]:
        g = by_label.pop(e["label"], None)
        mode = e["config"].get("mode") or (g.mode if g else None)
        ne_gt = g.neutral_gt if g and g.neutral_gt is not None else (mode.startswith("+ne-gt") if mode else None)
        id_dis = g.id_discriminator if g and g.id_discriminator is not None else (mode.endswith("+id-dis") if mode else None)
        dataset = (g.dataset if g else None) or sweep["dataset"]
        p = paper_numbers.ablation_row(dataset, ne_gt, id_dis) if ne_gt is not None and id_dis is not None else None
        sampled = ", ".join(f"{k}={_fmt_value(v)}" for k, v in e["config"].items() if k != "mode")
        row = {"config": e["label"], "rank": e["rank"], "trial": e["trial_id"], "mode": mode, "sampled": sampled,
               "sweep E_dis": (e["sweep"].get(sweep["metrics"][0]), None),
               "sweep E_rec": (e["sweep"].get(sweep["metrics"][1]), None),
               "seeds": len(g.runs) if g else 0,
               "paper E_dis": ((p or {}).get("E_dis_mean"), None), "paper E_rec": ((p or {}).get("E_rec_mean"), None),
               "paper AVD_neu": ((p or {}).get("AVD_neu_mean"), None),
               "dis_key": dis_key, "rec_key": rec_key}
        for head, key in (("E_dis", dis_key), ("E_rec", rec_key), ("AVD_neu", "AVD_neu_mean")):
            m, s_, n = g.stats[key] if g else (math.nan, None, 0)
            row[head] = (m if n else None, s_)
        rows.append(row)
    for g in sorted(by_label.values(), key=lambda g: g.label):  # in the grid, not among the sweep's picks
        row = {c: "" for c in SWEEP_COLUMNS}
        row.update({"config": g.label, "rank": "—", "mode": g.mode, "seeds": len(g.runs)})
        for head, key in (("E_dis", dis_key), ("E_rec", rec_key), ("AVD_neu", "AVD_neu_mean")):
            m, s_, n = g.stats[key]
            row[head] = (m if n else None, s_)
        rows.append(row)
    return rows


def render_sweep_md(sweep: dict, rows: list[dict]) -> list[str]:
    dis, rec = sweep["metrics"]
    budget = f"{sweep['trial_epochs']} epochs" if sweep["trial_epochs"] is not None else "the sweep's budget"
    lines = [f"## Sweep selection: `{sweep['dir']}`", "",
             f"{sweep['dataset']} sweep ({sweep['search']} search, {sweep['scheduler']} early stopping, "
             f"{sweep['num_trials']} trials); \"sweep\" = the trial's last values in the sweep (one run, {budget}, "
             f"{dis} / {rec}); E_dis / E_rec / AVD_neu = the config retrained at its full schedule, mean ± std over "
             f"`seeds` (E_dis = `{rows[0]['dis_key'] if rows and 'dis_key' in rows[0] else 'E_dis_ref_mean'}`); "
             "paper = Table IV, same data set and mode. 0 seeds: not retrained (yet). All errors in mm.", "",
             "| " + " | ".join(SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell_md(row.get(c)) for c in SWEEP_COLUMNS) + " |")
    return lines + [""]


def write_sweep_csv(path: Path, rows: list[dict]) -> None:
    header, out = [], []
    for c in SWEEP_COLUMNS:
        header += [c] if c in ("config", "rank", "trial", "mode", "sampled", "seeds") else [c, f"{c} (seed std)"]
    for row in rows:
        cells = []
        for c in SWEEP_COLUMNS:
            v = row.get(c)
            cells += [v[0], v[1]] if isinstance(v, tuple) else [v]
        out.append(cells)
    _write_csv(path, header, out)


def _cell_md(v) -> str:
    if isinstance(v, tuple):
        m, s = v
        if m is None or (isinstance(m, float) and math.isnan(m)):
            return "—"
        return f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}"
    if v is None:
        return ""
    return str(v)


def _row_cells(row: dict, columns: list[str]) -> list[Any]:
    out = []
    for c in columns:
        if c == "neutral GT":
            out.append(_sign(row["neutral_gt"]))
        elif c == "id-dis":
            out.append(_sign(row["id_discriminator"]))
        elif c == "dataset":
            out.append(row["dataset"])
        else:
            out.append(row.get(c))
    return out


def render_markdown(grid_dir: Path, groups: list[Group], problems: list[Run], tables,
                    sweep_md: list[str] | None = None) -> str:
    lines = [f"# Results: `{grid_dir}`", ""]
    n_ok = sum(len(g.runs) for g in groups)
    lines += [f"{len(groups)} configs, {n_ok} finished runs, {len(problems)} missing or failed.",
              "Our cells: mean ± std over seeds (sample std, ddof=1; no ± for one seed). "
              "Paper cells: published values (their ± std is over test meshes: see the `std` columns). "
              "E_dis = our reference-based E_dis (`E_dis_ref_*`); E_dis(vstd) = vertex-std definition "
              "(`E_dis_vstd_*`). All errors in mm.", ""]
    for title, _, columns, rows in tables:
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            lines.append("| " + " | ".join(_cell_md(c) for c in _row_cells(row, columns)) + " |")
        lines.append("")
    lines += sweep_md or []
    lines += ["## Missing or failed runs", ""]
    if problems:
        lines += ["| config | seed | run directory | problem |", "|---|---|---|---|"]
        lines += [f"| {r.label} | {r.seed} | `{r.path}` | {r.problem} |" for r in problems]
        lines += ["", "These runs are excluded from every mean; configs with missing seeds average fewer seeds (see `seeds`)."]
    else:
        lines.append("None.")
    lines.append("")
    inc = [g for g in groups if g.inconsistent]
    if inc:
        lines += ["## Warnings", ""]
        lines += [f"- `{g.label}`: seeds differ in more than the seed: {', '.join(g.inconsistent)}" for g in inc]
        lines.append("")
    lines += ["## Notes on the paper's numbers", ""] + [f"- {n}" for n in paper_numbers.NOTES] + [""]
    lines += ["![summary](summary.png)", ""]
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    from facedis.rundir import atomic_write_text

    atomic_write_text(Path(path), text)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in r])
    _atomic_text(path, buf.getvalue())


def write_table_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    header = []
    for c in columns:
        header += [c] if c in ("neutral GT", "id-dis", "dataset", "method", "seeds") else [c, f"{c} (seed std)"]
    out = []
    for row in rows:
        cells = []
        for c, v in zip(columns, _row_cells(row, columns)):
            if isinstance(v, tuple):
                cells += [v[0], v[1]]
            else:
                cells.append(v)
        out.append(cells)
    _write_csv(path, header, out)


def write_curves(groups: list[Group], out: Path) -> list[Path]:
    """One ``<label>.png`` per config: losses and metrics against steps, mean ± std over seeds."""
    from facedis.curves import plot_curves, read_records, save_figure

    files = []
    for g in groups:
        runs = [rec for rec in (read_records(r.path / "metrics.jsonl") for r in g.runs) if rec]
        if runs:
            name = g.label.replace("/", "_")
            files.append(save_figure(plot_curves(runs, f"{g.label}: {len(runs)} seed(s)"), out / f"{name}.png"))
    return files


def plot(groups: list[Group], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("E_rec_mean", "E_rec_mean"), ("E_dis_ref_mean", "E_dis_mean"), ("E_dis_vstd_mean", None),
            ("AVD_neu_mean", "AVD_neu_mean")]
    gs = sorted(groups, key=lambda g: g.label)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2 + 0.15 * len(gs)), squeeze=False)
    x = list(range(len(gs)))
    for ax, (key, pkey) in zip(axes[0], keys):
        means = [g.stats[key][0] if g.stats[key][2] else math.nan for g in gs]
        errs = [g.stats[key][1] or 0.0 for g in gs]
        ax.bar(x, means, yerr=errs, capsize=3, color="tab:blue", alpha=0.8, label="ours (mean ± std over seeds)")
        if pkey:
            px, py = [], []
            for i, g in enumerate(gs):
                p = _paper_t4(g)
                if p and p.get(pkey) is not None:
                    px.append(i)
                    py.append(p[pkey])
            if px:
                ax.scatter(px, py, color="tab:red", marker="D", zorder=3, label="paper (Table IV)")
        ax.set_title(f"{key} (mm)")
        ax.set_xticks(x)
        ax.set_xticklabels([g.label for g in gs], rotation=45, ha="right", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.set_dpi(110)
    from facedis.curves import save_figure

    save_figure(fig, path)
    plt.close(fig)


def aggregate(grid_dir: Path, out: Path, seeds: Sequence[int] | None = None, make_plot: bool = True,
              sweep_dir: Path | None = None) -> dict:
    """Write the report; returns ``{"groups", "problems", "files", "sweep_rows"}``.

    ``sweep_dir``: the ``facedis tune`` output whose selected configs ``grid_dir`` retrained (adds
    ``sweep.csv`` and the "Sweep selection" section)."""
    grid_dir, out = Path(grid_dir), Path(out)
    sweep = read_sweep(sweep_dir) if sweep_dir is not None else None
    if not grid_dir.is_dir():
        hint = (f" (retrain the sweep's configs first: facedis submit --grid sweep:{sweep_dir} --seeds 0 1 2 ...)"
                if sweep is not None else "")
        raise FileNotFoundError(f"{grid_dir}: no such directory{hint}")
    groups, problems = scan(grid_dir, seeds)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(groups)
    files = []
    for _, stem, columns, rows in tables:
        write_table_csv(out / f"{stem}.csv", columns, rows)
        files.append(out / f"{stem}.csv")
    header = ["config", "dataset", "mode", "neutral_gt", "id_discriminator", "n_seeds", "seeds", "missing_seeds"]
    for k in METRIC_KEYS:
        header += [f"{k}_mean", f"{k}_std"]
    rows = []
    for g in groups:
        r = [g.label, g.dataset, g.mode, g.neutral_gt, g.id_discriminator, len(g.runs), " ".join(g.seeds),
             " ".join(r.seed for r in g.missing)]
        for k in METRIC_KEYS:
            m, s, n = g.stats[k]
            r += [m if n else None, s]
        rows.append(r)
    _write_csv(out / "summary.csv", header, rows)
    _write_csv(out / "runs.csv", ["config", "seed", "run_dir", *METRIC_KEYS],
               [[r.label, r.seed, str(r.path), *(r.metrics[k] for k in METRIC_KEYS)] for g in groups for r in g.runs])
    _write_csv(out / "missing.csv", ["config", "seed", "run_dir", "problem"],
               [[r.label, r.seed, str(r.path), r.problem] for r in problems])
    files += [out / "summary.csv", out / "runs.csv", out / "missing.csv"]
    if make_plot and groups:
        plot(groups, out / "summary.png")
        files.append(out / "summary.png")
        files += write_curves(groups, out / "curves")
    srows, sweep_md = None, None
    if sweep is not None:
        srows = sweep_rows(groups, sweep)
        write_sweep_csv(out / "sweep.csv", srows)
        files.append(out / "sweep.csv")
        sweep_md = render_sweep_md(sweep, srows)
    _atomic_text(out / "tables.md", render_markdown(grid_dir, groups, problems, tables, sweep_md))
    files.append(out / "tables.md")
    return {"groups": groups, "problems": problems, "files": files, "sweep_rows": srows}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("grid_dir", type=Path, nargs="?",
                   help="runs/<grid> (with --sweep: default <runs-root>/sweep-<sweep dir name>)")
    p.add_argument("--sweep", type=Path, metavar="DIR",
                   help="a facedis tune output whose selected configs were retrained (facedis submit --grid sweep:DIR): "
                        "adds the sweep selection table")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="with --sweep and no grid_dir (default: runs)")
    p.add_argument("--out", type=Path, help="report directory (default: reports/<grid>)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds every config should have (default: union of seeds found)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 if any run is missing or failed")
    args = p.parse_args(argv)
    if args.grid_dir is None:
        if args.sweep is None:
            p.error("give the grid directory (runs/<grid>) or --sweep DIR")
        from facedis.cluster.grids import resolve_grid

        try:
            name, _ = resolve_grid(f"sweep:{args.sweep}")
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        args.grid_dir = args.runs_root / name
    out = args.out or Path("reports") / args.grid_dir.resolve().name
    try:
        res = aggregate(args.grid_dir, out, args.seeds, make_plot=not args.no_plot, sweep_dir=args.sweep)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    print((out / "tables.md").read_text())
    for r in res["problems"]:
        print(f"missing/failed: {r.label}/seed{r.seed}: {r.problem}", file=sys.stderr)
    print(f"wrote {', '.join(str(f) for f in res['files'])}", file=sys.stderr)
    return 1 if (args.strict and res["problems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
