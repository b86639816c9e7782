"""Build a shipped pretrained model: train its preset, then export ``model.pt``, the model card
and the sample faces into ``facedis/pretrained/<name>/``.

    python -m facedis.pretrained synth-demo [--run runs/synth-demo] [--export-only]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from facedis.pretrained import HERE, MODELS, names


# ---------------------------------------------------------------------------------------------
def build(name: str, run_dir: Path) -> Path:
    """Train ``name``'s preset into ``run_dir`` (resuming / reusing a finished run), then export."""
    from facedis.config import load_config, resolve_preset
    from facedis.engine import train

    spec = MODELS[name]
    cfg = load_config(resolve_preset(spec["preset"]), [f"run.dir={run_dir}"])
    train(cfg)
    return export(name, run_dir)


def export(name: str, run_dir: Path) -> Path:
    """Copy a finished run's ``model.pt`` into the package with its card and sample faces."""
    import torch

    from facedis.data import load_info
    from facedis.inference import raw_units_of_meta
    from facedis.prep import synth

    spec = MODELS[name]
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    payload = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    data_root = Path(payload["config"]["data"]["root"])
    info = load_info(data_root)
    payload["raw_units"] = payload.get("raw_units") or raw_units_of_meta(info.meta)
    payload["config"]["data"]["root"] = ""  # the training data set is not shipped
    out = HERE / name
    tmp = HERE / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(payload, tmp / "model.pt")
    samples = synth.write(synth.generate(**synth.default_options(**spec["samples"])), tmp / "samples")
    s_info = load_info(samples)
    if not (s_info.num_vertices == payload["num_vertices"]
            and (s_info.triangles == payload["triangles"].numpy()).all()):
        raise RuntimeError("the sample faces do not share the model's topology")
    (tmp / "MODEL_CARD.md").write_text(model_card(name, spec, metrics, payload, info))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / "model.pt"


def model_card(name: str, spec: dict, m: dict, payload: dict, info) -> str:
    def f(k):
        v = m.get(k)
        return "n/a" if not isinstance(v, (int, float)) else f"{v:.3f}"

    size = sum(v.numel() for v in payload["vae"].values())
    return f"""# Model card: `{name}`

**What it is.** The identity/expression disentangling VAE of Gu, Pears & Sun (FG 2023) as
trained by facedis: {spec['description']}. {size:,} tensor values; input and output meshes of
{payload['num_vertices']} vertices in the topology of the synthetic data set (raw units: {payload.get('raw_units')}).

**Data.** {spec['data_licence']}. Data set `{info.meta.get('dataset')}`, protocol
`{info.meta.get('protocol')}`, content hash `{info.content_hash[:16]}…`; {m.get('num_test_samples')}
test samples of {m.get('num_test_identities')} identities the model never saw.

**How it was made.** `python -m facedis.pretrained {name}` (= `facedis train --config {spec['preset']}`
with seed {payload['config']['train']['seed']}, then this export), {m.get('epoch')} epochs,
{m.get('global_step')} steps, built {time.strftime('%Y-%m-%d')} with facedis {payload.get('facedis_version')}.

**Metrics** (test split, mm, one seed; docs/results.md has the 3-seed table of the same preset):

| E_rec | AVD_neu | AVD_neu of the mean face | E_dis (ref) | E_dis (vertex std) |
|---|---|---|---|---|
| {f('E_rec_mean')} | {f('AVD_neu_mean')} | {f('AVD_neu_meanface_mean')} | {f('E_dis_ref_mean')} | {f('E_dis_vstd_mean')} |

**Intended use.** Trying facedis without training: `facedis.load("{name}")`, the applications
(expression transfer, interpolation, neutralisation, recognition) and their figures, tests of
downstream code. `samples/` holds {spec['samples']['subjects']} synthetic identities (seed
{spec['samples']['seed']}) in the same topology, not seen in training.

**Limits.** Trained on synthetic faces only, at 300 vertices and with a slim network for a CPU
budget: it does not transfer to real scans, nor to other topologies, and its numbers are not the
paper's. It predicts neutral faces better than the mean face but far from perfectly (AVD_neu
{f('AVD_neu_mean')} mm against {f('AVD_neu_meanface_mean')} mm). Not for identifying people.

**Licence.** The model weights: MIT (as facedis). The training data derive from ICT-FaceKit (MIT).
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m facedis.pretrained", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=names())
    p.add_argument("--run", type=Path, default=None, help="run directory (default runs/<name>)")
    p.add_argument("--export-only", action="store_true", help="export a finished run without training")
    args = p.parse_args(argv)
    run = args.run or Path("runs") / args.name
    path = export(args.name, run) if args.export_only else build(args.name, run)
    print(f"written {path} ({path.stat().st_size / 2**20:.2f} MiB) and {path.parent / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
