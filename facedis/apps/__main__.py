"""Command line of the applications.

    python -m facedis.apps transfer    --run RUN --source S --target T --out out.ply
    python -m facedis.apps interpolate --run RUN --a A --b B --steps 5 --part identity --out DIR
    python -m facedis.apps neutralise  --run RUN INPUT [INPUT ...] --out DIR
    python -m facedis.apps recognise   --run RUN [--data ROOT] [--split test] [--out rec.json]
    python -m facedis.apps figures     --run RUN [--data ROOT] [--split test] [--out DIR]

RUN is a run directory (its ``model.pt``) or a checkpoint file. A face (S, T, A, B, INPUT) is a
mesh file (PLY/OBJ registered to the training template), a ``.npy`` array (V, 3), or
``data:SPLIT:INDEX`` for sample INDEX of a split of the run's data set (``--data`` overrides
where that is). Output meshes are PLY or OBJ by suffix; every mesh also gets a PNG rendering.
Units: by default (``--units auto``) input meshes and ``.npy`` arrays are read, and outputs
written, in the units of the raw files the model's data set was prepared from (CoMA: metres,
BU-3DFE and FaceScape: millimetres, ...), so a raw scan goes in and a mesh in the same units
comes out; ``--units stored|mm|cm|m`` chooses explicitly. An input far from the training
faces' size gets a warning naming the units it is probably in. ``--align`` rigidly aligns
inputs to the template first.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np


def _model(args):
    from facedis.inference import load

    return load(args.run, device=args.device, units=args.units, align=args.align)


def _face(spec: str, model, args):
    """A face spec -> array (in the model's call units) or a mesh path (read by the model)."""
    if spec.startswith("data:"):
        from facedis.apps.common import load_split, run_data_root

        try:
            _, split, index = spec.split(":")
            index = int(index)
        except ValueError:
            raise SystemExit(f"bad face spec {spec!r}: expected data:SPLIT:INDEX") from None
        root = Path(args.data) if args.data else run_data_root(args.run, model)
        if root is None:
            raise SystemExit(f"{args.run}: cannot find the run's data set; pass --data ROOT")
        data = load_split(root, split)
        if not 0 <= index < len(data):
            raise SystemExit(f"{spec}: index out of range (split {split} has {len(data)} samples)")
        return model.from_stored(data.vertices[index])
    p = Path(spec)
    if p.suffix.lower() == ".npy":
        return np.load(p)
    return spec


def _write(model, path: Path, vertices) -> list[str]:
    from facedis.apps.figures import save_png
    from facedis.apps.render import render_mesh

    path = Path(path)
    if path.suffix.lower() not in (".ply", ".obj"):
        path = path.with_suffix(".ply")
    model.save_mesh(path, vertices)
    png = save_png(path.with_suffix(".png"), render_mesh(vertices, model.triangles, size=320))
    return [str(path), str(png)]


def cmd_transfer(args) -> dict:
    m = _model(args)
    out = m.transfer(_face(args.source, m, args), _face(args.target, m, args))
    return {"files": _write(m, Path(args.out), out), "units": m.resolve_units()}


def cmd_interpolate(args) -> dict:
    from facedis.apps.grid import face_grid

    m = _model(args)
    a, b = _face(args.a, m, args), _face(args.b, m, args)
    frames = m.interpolate(a, b, steps=args.steps, part=args.part)
    out = Path(args.out)
    files = []
    for k, f in enumerate(frames):
        p = out / f"{args.part}_{k:02d}{args.format}"
        m.save_mesh(p, f)
        files.append(str(p))
    strip = out / f"{args.part}_strip.png"
    face_grid([[{"vertices": f, "title": f"t = {t:.2f}"} for f, t in zip(frames, np.linspace(0, 1, args.steps))]],
              m.triangles, path=strip, suptitle=f"{args.part} interpolation")
    return {"files": files + [str(strip)], "units": m.resolve_units()}


def cmd_neutralise(args) -> dict:
    m = _model(args)
    out = Path(args.out)
    files = []
    for k, spec in enumerate(args.inputs):
        res = m.disentangle(_face(spec, m, args))
        stem = Path(spec).stem if not spec.startswith("data:") else spec.replace(":", "_")
        files += _write(m, out / f"{stem}_neutral{args.format}", res["identity"])
        if args.expression:
            files += _write(m, out / f"{stem}_expression{args.format}", res["expression"])
    return {"files": files, "units": m.resolve_units()}


def cmd_recognise(args) -> dict:
    from facedis.apps.common import check_same_data, load_split, run_data_root
    from facedis.apps.recognition import recognise_split, summary_line

    m = _model(args)
    root = Path(args.data) if args.data else run_data_root(args.run, m)
    if root is None:
        raise SystemExit(f"{args.run}: cannot find the run's data set; pass --data ROOT")
    data = load_split(root, args.split)
    check_same_data(m, data)
    res = recognise_split(m, data, gallery_from=args.gallery_from)
    print(summary_line(res), file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return {k: v for k, v in res.items() if not isinstance(v, (list, dict))} | {
        k: {"auc": res[k]["auc"], "eer": res[k]["eer"]} for k in ("verification_latent_cosine", "verification_vertex")}


def cmd_figures(args) -> dict:
    from facedis.apps.figures import make_figures

    idx = make_figures(args.run, data_root=args.data, split=args.split, out=args.out, max_samples=args.max_samples,
                       steps=args.steps, device=args.device)
    return {"files": idx["files"], "recognition": idx.get("recognition"), "transfer": idx.get("transfer")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facedis.apps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        from facedis.pretrained import names

        src = sp.add_mutually_exclusive_group(required=True)
        src.add_argument("--run", help="run directory or model.pt")
        src.add_argument("--model", choices=names(),
                         help="a model shipped with facedis (its sample faces are the default --data)")
        sp.add_argument("--data", default=None, help="data set root (default: the run's data.root)")
        sp.add_argument("--units", choices=("auto", "stored", "mm", "cm", "m"), default="auto",
                        help="units of input/output meshes (auto: those of the training data's raw files)")
        sp.add_argument("--align", action="store_true", help="Kabsch-align inputs to the template")
        sp.add_argument("--device", default="cpu")
        return sp

    sp = common(sub.add_parser("transfer", help="target identity + source expression"))
    sp.add_argument("--source", required=True, help="expression donor (mesh, .npy or data:SPLIT:INDEX)")
    sp.add_argument("--target", required=True, help="identity donor")
    sp.add_argument("--out", required=True, help="output mesh (.ply/.obj); a .png rendering is written next to it")
    sp.set_defaults(func=cmd_transfer)

    sp = common(sub.add_parser("interpolate", help="interpolate identity or expression codes"))
    sp.add_argument("--a", required=True)
    sp.add_argument("--b", required=True)
    sp.add_argument("--steps", type=int, default=5)
    sp.add_argument("--part", choices=("identity", "expression", "both"), default="identity")
    sp.add_argument("--format", choices=(".ply", ".obj"), default=".ply")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(func=cmd_interpolate)

    sp = common(sub.add_parser("neutralise", help="predicted neutral (identity) of each input"))
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--expression", action="store_true", help="also write the expression on the mean face")
    sp.add_argument("--format", choices=(".ply", ".obj"), default=".ply")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(func=cmd_neutralise)

    sp = common(sub.add_parser("recognise", help="rank-1 identification and verification"))
    sp.add_argument("--split", default="test")
    sp.add_argument("--gallery-from", choices=("neutral", "lowest_level"), default="neutral")
    sp.add_argument("--out", default=None, help="write the full result (ROC included) as JSON")
    sp.set_defaults(func=cmd_recognise)

    sp = common(sub.add_parser("figures", help="the figure set of a run"))
    sp.add_argument("--split", default="test")
    sp.add_argument("--out", default=None, help="output directory (default RUN/figures)")
    sp.add_argument("--max-samples", type=int, default=None)
    sp.add_argument("--steps", type=int, default=5, help="interpolation frames")
    sp.set_defaults(func=cmd_figures)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"facedis: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None, prog: str = "python -m facedis.apps") -> int:
    parser = build_parser()
    parser.prog = prog
    args = parser.parse_args(argv)
    if args.model:  # a shipped model: its file, and its sample faces unless --data says otherwise
        from facedis import pretrained

        args.run = str(pretrained.model_path(args.model))
        if args.data is None:
            args.data = str(pretrained.samples_root(args.model))
        if args.command == "figures" and args.out is None:  # not inside the installed package
            args.out = f"figures-{args.model}"
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one plain line per warning (restored on exit)
        res = args.func(args)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
