"""Named experiment grids, as data.

A grid maps a name to a list of entries ``(config path, overrides)`` or
``(config path, overrides, label)``. Config paths ``configs/<name>.yaml`` are the presets shipped in
the package (``facedis/configs``, whatever the current directory); overrides
are dotted keys of :class:`facedis.config.Config`. The label names the run directory
``runs/<grid>/<label>/seed<k>/``; without one it is derived from the config file name and the
override values (see :func:`entry_label`).

``sweep:<dir>`` is a grid too: every ``best*.yaml`` in ``<dir>`` (the best configs written by
``facedis tune``; every ``*.yaml`` if there is no ``best*.yaml``) is one entry, labelled by its
file stem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facedis.config import PRESETS_DIR, ConfigError, resolve_preset

#: Relative config paths of the grids are relative to this folder: ``configs/x.yaml`` is a shipped preset.
CONFIG_ROOT = PRESETS_DIR.parent

# The two switches of the paper's ablation (Table IV). Adjust here if the config keys move.
NEUTRAL_GT_KEY = "method.neutral_gt"
ID_DISCRIMINATOR_KEY = "method.id_discriminator"


def _ablation(datasets=("coma", "bu3dfe", "facescape")) -> list[tuple[str, dict, str]]:
    out = []
    for ds in datasets:
        for ne_gt in (False, True):
            for id_dis in (False, True):
                label = f"{ds}{'+' if ne_gt else '-'}ne-gt{'+' if id_dis else '-'}id-dis"
                out.append((f"configs/{ds}.yaml", {NEUTRAL_GT_KEY: ne_gt, ID_DISCRIMINATOR_KEY: id_dis}, label))
    return out


# docs/results.md: the baselines (facedis/baselines.py) and the four modes of the method on the
# synthetic data set, for both split protocols, within ~1 h on 2 shared CPU cores: the synth preset
# shrunk to 200 subjects x 8 frames at V = 500, 30 epochs of batch 16 (~2400 steps), 2 D-pretraining
# epochs, and the encoder the preset had when the table was made (width 0.125 everywhere, absolute
# input), so the published table stays reproducible.
SYNTH_RESULTS_PROTOCOLS = ("unseen-identity", "seen-identity")
SYNTH_RESULTS_BASELINES = ("mean_face", "identity_map", "ridge", "supervised")
SYNTH_RESULTS_DATA = ["--subjects", "200", "--per-subject", "8", "--frames-per-sequence", "4", "--vertices", "500", "--seed", "0"]
SYNTH_RESULTS_BUDGET: dict[str, Any] = {
    "train.epochs": 30, "train.batch_size": 16, "train.eval_every": 10, "pretrain.epochs": 2,
    "train.progress": False, "model.ridge_alphas": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0],
    "model.encoder_channels": [], "model.encoder_input": "absolute",
}


def _synth_results() -> list[tuple[str, dict, str]]:
    out = []
    for protocol in SYNTH_RESULTS_PROTOCOLS:
        short = protocol.split("-")[0]  # unseen / seen
        common = {"data.root": f"data/synth-results-{protocol}",
                  "data.prepare": ["synth", *SYNTH_RESULTS_DATA, "--protocol", protocol],
                  **SYNTH_RESULTS_BUDGET}
        for kind in SYNTH_RESULTS_BASELINES:
            # The mode switches say what a baseline uses: neutral GT (ridge, supervised), never a discriminator.
            out.append(("configs/synth.yaml", {**common, "model.kind": kind,
                                               NEUTRAL_GT_KEY: kind in ("ridge", "supervised"),
                                               ID_DISCRIMINATOR_KEY: False}, f"{short}-baseline-{kind}"))
        for ne_gt in (False, True):
            for id_dis in (False, True):
                mode = f"{'+' if ne_gt else '-'}ne-gt{'+' if id_dis else '-'}id-dis"
                out.append(("configs/synth.yaml", {**common, NEUTRAL_GT_KEY: ne_gt, ID_DISCRIMINATOR_KEY: id_dis},
                            f"{short}-method{mode}"))
    return out


def _synth_demo() -> list[tuple[str, dict, str]]:
    """The demo acceptance table: configs/synth.yaml unchanged (data, budget, network) in three modes,
    plus the mean-face baseline (also in every run's metrics as ``AVD_neu_meanface_*``)."""
    out = [("configs/synth.yaml", {"model.kind": "mean_face", NEUTRAL_GT_KEY: False, ID_DISCRIMINATOR_KEY: False,
                                   "train.progress": False}, "baseline-mean_face")]
    for ne_gt, id_dis in ((True, True), (False, True), (False, False)):
        mode = f"{'+' if ne_gt else '-'}ne-gt{'+' if id_dis else '-'}id-dis"
        out.append(("configs/synth.yaml", {NEUTRAL_GT_KEY: ne_gt, ID_DISCRIMINATOR_KEY: id_dis,
                                           "train.progress": False}, f"method{mode}"))
    return out


GRIDS: dict[str, list[tuple]] = {
    # Table IV: 3 data sets x (+/- neutral GT) x (+/- identity discriminator) = 12 configs.
    "ablation": _ablation(),
    # Tables I-III "Ours" and "Ours+ne-gt" (with identity discriminator).
    "paper": [
        (f"configs/{ds}.yaml", {NEUTRAL_GT_KEY: ne_gt, ID_DISCRIMINATOR_KEY: True},
         f"{ds}{'+' if ne_gt else '-'}ne-gt+id-dis")
        for ds in ("coma", "bu3dfe", "facescape") for ne_gt in (False, True)
    ],
    # The ablation on the synthetic CPU demo data set (runs on a laptop).
    "synth-ablation": _ablation(("synth",)),
    # docs/results.md: 4 baselines + the 4 modes x 2 split protocols = 16 configs.
    "synth-results": _synth_results(),
    # The CPU demo preset as it is, mean face + 3 modes (run one seed per call on 2 cores).
    "synth-demo": _synth_demo(),
}


@dataclass(frozen=True)
class GridEntry:
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""


_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def entry_label(config: str | Path, overrides: dict[str, Any]) -> str:
    """``configs/coma.yaml`` + ``{"method.neutral_gt": True}`` -> ``coma--neutral_gt=true``."""
    stem = Path(config).stem
    if not overrides:
        return stem
    parts = [f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in overrides.items()]
    return _SAFE.sub("_", stem + "--" + ",".join(parts)).replace(",", "_")


def _check_label(label: str) -> str:
    if not label or label in (".", "..") or "/" in label or label.startswith((".", "_")):
        raise ValueError(f"bad grid entry label {label!r}: must be a plain directory name not starting with '.' or '_'")
    return label


def _entries(raw: list[tuple], root: Path) -> list[GridEntry]:
    out = []
    for item in raw:
        config, overrides, *rest = item
        label = rest[0] if rest else entry_label(config, overrides)
        path = Path(config)
        out.append(GridEntry((path if path.is_absolute() else root / path), dict(overrides), _check_label(label)))
    return out


def resolve_grid(spec: str, root: Path = CONFIG_ROOT) -> tuple[str, list[GridEntry]]:
    """A grid name or ``sweep:<dir>`` -> (grid directory name, entries).

    Raises ``ValueError`` for an unknown name, a missing sweep directory or duplicate labels.
    """
    if spec.startswith("sweep:"):
        d = Path(spec[len("sweep:"):]).expanduser()
        if not d.is_dir():
            raise ValueError(f"--grid {spec}: {d} is not a directory")
        files = sorted(list(d.glob("*.yaml")) + list(d.glob("*.yml")))
        best = [f for f in files if f.name.startswith("best")]
        files = best or files  # facedis tune writes best<k>-<trial>.yaml next to other files
        if not files:
            raise ValueError(f"--grid {spec}: no *.yaml files in {d}")
        entries = [GridEntry(f.resolve(), {}, _check_label(f.stem)) for f in files]
        name = "sweep-" + (d.resolve().name or "best")
    elif spec in GRIDS:
        name, entries = spec, _entries(GRIDS[spec], root)
    else:
        raise ValueError(f"unknown grid {spec!r}; named grids: {', '.join(sorted(GRIDS))}, or sweep:<dir>")
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"grid {spec!r} has duplicate entry labels {dup}; give them explicit labels")
    return name, entries


def apply_grid_modes(configs: list[str | Path], spec: str, root: Path = CONFIG_ROOT) -> list[GridEntry]:
    """``--config my.yaml --grid ablation``: the grid's distinct override sets applied to each given config.

    Labels keep the grid's mode suffix with the config's stem in front (``coma-ne-gt+id-dis`` ->
    ``my-ne-gt+id-dis``).
    """
    if spec.startswith("sweep:"):
        raise ValueError("--grid sweep:<dir> holds complete configs; do not combine it with --config")
    _, entries = resolve_grid(spec, root)
    modes: list[GridEntry] = []
    for e in entries:
        if all(e.overrides != m.overrides for m in modes):
            modes.append(e)
    out = []
    for c in configs:
        stem = Path(c).stem
        for m in modes:
            base = m.config.stem
            label = stem + m.label[len(base):] if m.label.startswith(base) else f"{stem}--{m.label}"
            out.append(GridEntry(config_file(c), dict(m.overrides), _check_label(label)))
    labels = [e.label for e in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate run labels {labels}")
    return out


def config_file(config: str | Path) -> Path:
    """A ``--config`` value (a file, or a shipped preset's name) as an absolute path; a missing one
    stays as given (loading it then names the presets)."""
    try:
        return resolve_preset(config).resolve()
    except ConfigError:
        return Path(config).resolve()


def configs_as_grid(configs: list[str | Path]) -> list[GridEntry]:
    """Plain ``--config a.yaml b.yaml`` -> one entry per file, labelled by its stem."""
    entries = [GridEntry(config_file(c), {}, _check_label(Path(c).stem)) for c in configs]
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config files with the same name {labels}; use a grid with explicit labels")
    return entries
