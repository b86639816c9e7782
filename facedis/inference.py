"""Inference API: load a trained run and disentangle, transfer, interpolate.

    import facedis
    m = facedis.load("runs/synth")                 # a run directory or its model.pt
    z_id, z_exp = m.encode("scan.ply")             # deterministic μ codes
    neutral = m.neutral(scan)                      # M̄ + Δ_id (the predicted identity)
    out = m.transfer(source, target)               # target's identity, source's expression
    strip = m.interpolate(a, b, steps=5, part="identity")

Inputs: numpy arrays or torch tensors (V, 3) or (B, V, 3), mesh file paths (PLY/OBJ, read
with trimesh, vertex order kept), or a list of paths. They must have the training template's
vertex count (and, for mesh files with faces, its triangles): the model works on registered
meshes in dense correspondence. Outputs are numpy float32 arrays (V, 3) for one input or
(B, V, 3) for a batch.

Units: ``units="auto"`` (the default) reads inputs and writes outputs in the units of the raw
files the model's data set was prepared from (CoMA and synth: metres; BU-3DFE and FaceScape:
millimetres; custom: its ``--input-units``), found in the data set's ``meta.json``
(:func:`raw_units_of_meta`). ``units="stored"|"mm"|"cm"|"m"`` (at ``load`` or per call) chooses
explicitly (mm = stored × ``mm_per_unit``). An input whose size is far from the training faces'
(factor > :data:`SCALE_WARN_FACTOR`) gets a :class:`UnitsWarning` naming the units it most
likely is in.

Alignment: ``align=True`` rigidly aligns each input to the training template (Kabsch,
rotation + translation, no scale) before encoding; outputs then stay in the template's frame.
Off by default because the training data are already in that frame and an expressive face
does not align exactly onto a neutral template (the open mouth pulls the fit).

Codes are the posterior means μ (docs/method.md#latent-codes), the model runs in eval mode
(BatchNorm running statistics), so every call is deterministic. Loading uses
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from facedis.model import DisentanglingVAE

ArrayLike = Union[np.ndarray, torch.Tensor, str, os.PathLike, Sequence]
UNITS = ("auto", "stored", "mm", "cm", "m")
#: millimetres per unit of each physical unit
UNIT_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
UNIT_NAMES = {"mm": "millimetres", "cm": "centimetres", "m": "metres", "stored": "the data set's stored units"}
#: units of the raw files of each data source (facedis/prep/<source>.py) when meta.json does not say
RAW_UNITS_BY_DATASET = {"coma": "m", "synth": "m", "bu3dfe": "mm", "facescape": "mm"}
#: an input whose RMS radius differs from the mean face's by more than this factor is warned about
SCALE_WARN_FACTOR = 2.5
PARTS = ("identity", "expression", "both")
MESH_SUFFIXES = (".ply", ".obj", ".off", ".stl")


class MeshMismatchError(ValueError):
    """An input does not match the training template (vertex count, topology or shape)."""


class UnitsWarning(UserWarning):
    """An input's size is far from the training faces': it is probably in other units."""


def raw_units_of_meta(meta: dict) -> Optional[str]:
    """Units (``mm``, ``cm`` or ``m``) of the raw mesh files a data set was prepared from, read
    off its ``meta.json``: ``units.raw_units`` if recorded, else the custom importer's
    ``options.input_units``, else by ``dataset`` (CoMA and synth: metres; BU-3DFE, FaceScape:
    millimetres). None when unknown."""
    if not isinstance(meta, dict):
        return None
    u = meta.get("units") if isinstance(meta.get("units"), dict) else {}
    opts = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    for cand in (u.get("raw_units"), u.get("raw"), opts.get("input_units")):
        if cand in UNIT_MM:
            return str(cand)
    return RAW_UNITS_BY_DATASET.get(str(meta.get("dataset", "")).lower())


def find_data_root(run_or_checkpoint, ckpt_meta: Optional[dict] = None) -> Optional[Path]:
    """The data set a run was trained on: the checkpoint's ``data_root``, else ``data.root`` of its
    ``config``, else of the run's ``config.yaml`` (each tried as given, i.e. relative to the
    working directory, then relative to the run's parent folders). None if none has a meta.json."""
    cands = []
    ckpt_meta = ckpt_meta or {}
    for k in ("data_root", "dataset_root"):
        if ckpt_meta.get(k):
            cands.append(str(ckpt_meta[k]))
    cfg_meta = ckpt_meta.get("config")
    if isinstance(cfg_meta, dict) and isinstance(cfg_meta.get("data"), dict) and cfg_meta["data"].get("root"):
        cands.append(str(cfg_meta["data"]["root"]))
    run_dir = Path(run_or_checkpoint)
    if run_dir.is_file():
        run_dir = run_dir.parent
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            data = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        r = (data.get("data") or {}).get("root") if isinstance(data, dict) else None
        if r:
            cands.append(str(r))
    for c in cands:
        p = Path(c)
        tries = [p] if p.is_absolute() else [p, *[(q / p) for q in run_dir.resolve().parents]]
        for t in tries:
            if (t / "meta.json").is_file():
                return t
    return None


def _resolve_vertex_map(ckpt: dict, ckpt_path: Path, num_vertices: int) -> tuple[Optional[np.ndarray], Optional[int]]:
    """(vertex_index_map (V,) int64, source vertex count) of a model trained on a decimated data set:
    from model.pt (``vertex_index_map``, ``source_vertices``), else from the data set's meta.h5 /
    meta.json ``decimation``. (None, None) when the model's data was not decimated or it is unknown."""
    vmap, src = ckpt.get("vertex_index_map"), ckpt.get("source_vertices")
    if vmap is None or src is None:
        root = find_data_root(ckpt_path, ckpt)
        if root is not None:
            import json

            try:
                meta = json.loads((root / "meta.json").read_text())
                src = src if src is not None else (meta.get("decimation") or {}).get("source_vertices")
                if vmap is None and src is not None:
                    from facedis.shards import read_arrays

                    vmap = read_arrays(root).get("vertex_index_map")
            except (OSError, ValueError, KeyError):
                pass
    if vmap is None or src is None:
        return None, None
    vmap = _to_np(vmap, np.int64).reshape(-1)
    src = int(src)
    if len(vmap) != num_vertices or src <= num_vertices or vmap.min() < 0 or vmap.max() >= src:
        return None, None
    return vmap, src


def _resolve_raw_units(ckpt: dict, ckpt_path: Path) -> tuple[Optional[str], str]:
    """(raw units or None, where they came from) for a checkpoint."""
    import json

    if ckpt.get("raw_units") in UNIT_MM:
        return str(ckpt["raw_units"]), "model.pt raw_units"
    root = find_data_root(ckpt_path, ckpt)
    if root is not None:
        try:
            meta = json.loads((root / "meta.json").read_text())
        except (OSError, ValueError):
            meta = None
        raw = raw_units_of_meta(meta)
        if raw is not None:
            return raw, f"{root / 'meta.json'}"
    name = ckpt.get("dataset")
    if name is None and isinstance(ckpt.get("config"), dict):
        name = ckpt["config"].get("dataset")
    raw = RAW_UNITS_BY_DATASET.get(str(name).lower()) if name else None
    if raw is not None:
        return raw, f"dataset {name!r}"
    return None, "unknown"


# ---------------------------------------------------------------------------------------------
# checkpoint reading
# ---------------------------------------------------------------------------------------------
def _first(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def infer_model_args(state: dict) -> dict:
    """Constructor arguments of ``DisentanglingVAE`` read off the weights' shapes."""
    c5 = state["encoder.conv5.weight"].shape[0]  # round(1024 * width)
    return {
        "encoder_channels": [state[f"encoder.conv{i}.weight"].shape[0] for i in range(1, 6)],
        "num_vertices": state["id_decoder.fc2.weight"].shape[0] // 3,
        "id_dim": state["fc_id_mu.weight"].shape[0],
        "exp_dim": state["fc_exp_mu.weight"].shape[0],
        "width": c5 / 1024.0,
        "decoder_hidden": state["id_decoder.fc1.weight"].shape[0],
        "encoder_input": "absolute+offset" if "input_reference" in state else "absolute",
    }


def _resolve_checkpoint(path) -> Path:
    from facedis import pretrained

    p = Path(path)
    if pretrained.is_name(path) and not p.exists():  # a model shipped with facedis, e.g. "synth-demo"
        return pretrained.model_path(path)
    if p.is_dir():
        for name in ("model.pt", "final.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no model.pt in this run directory (is the run finished?)")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such run directory or checkpoint")
    return p


def _to_np(a, dtype=np.float64) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# mesh files
# ---------------------------------------------------------------------------------------------
def read_mesh(path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read a mesh file with trimesh, keeping the vertex order -> (vertices (V,3), faces (F,3) or None)."""
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mesh file")
    m = trimesh.load(str(path), process=False, maintain_order=True, force="mesh")
    v = np.asarray(m.vertices, dtype=np.float64)
    f = np.asarray(m.faces, dtype=np.int64) if getattr(m, "faces", None) is not None and len(m.faces) else None
    return v, f


def write_mesh(path, vertices, triangles, vertex_colors=None) -> Path:
    """Write a PLY or OBJ (by suffix) with trimesh, vertex order kept; optional per-vertex RGB(A)
    colours in [0, 1] or uint8 (PLY keeps them)."""
    import trimesh

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = None
    if vertex_colors is not None:
        c = np.asarray(vertex_colors)
        if c.dtype.kind == "f":
            c = np.clip(np.round(c * 255.0), 0, 255).astype(np.uint8)
        if c.shape[1] == 3:
            c = np.concatenate([c, np.full((len(c), 1), 255, np.uint8)], axis=1)
        colors = c
    m = trimesh.Trimesh(vertices=np.asarray(_to_np(vertices), dtype=np.float64),
                        faces=np.asarray(triangles, dtype=np.int64), vertex_colors=colors, process=False)
    m.export(str(path))
    return path


def _canonical(faces: np.ndarray) -> np.ndarray:
    """Triangles as a sorted set of sorted index triples (winding and order ignored)."""
    f = np.sort(np.asarray(faces, dtype=np.int64), axis=1)
    return f[np.lexsort(f.T[::-1])]


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


# ---------------------------------------------------------------------------------------------
# the model object
# ---------------------------------------------------------------------------------------------
class FaceModel:
    """A trained disentangling VAE with what inference needs (mean face, triangles, units).

    Attributes: ``vae`` (``DisentanglingVAE`` in eval mode), ``mean_face`` (V,3) and
    ``template`` (V,3) in stored units, ``triangles`` (F,3), ``mm_per_unit``,
    ``num_vertices``, ``id_dim``, ``exp_dim``, ``units`` (default for calls), ``raw_units``
    (units of the training data's raw files, what ``auto`` means; None if unknown, then ``auto``
    is ``stored``), ``align`` (default for calls), ``meta`` (everything else the checkpoint carried),
    ``vertex_index_map`` (V,) and ``source_vertices`` for a model trained on a decimated data set
    (else None): inputs with ``source_vertices`` vertices (the full-resolution source topology) are
    reduced to the model's vertices with the map; outputs stay at the model's resolution.
    """

    def __init__(self, vae: DisentanglingVAE, mean_face, triangles, mm_per_unit: float = 1.0, template=None,
                 units: str = "auto", align: bool = False, device="cpu", meta: Optional[dict] = None,
                 batch_size: int = 256, raw_units: Optional[str] = None, vertex_index_map=None,
                 source_vertices: Optional[int] = None):
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.mean_face = _to_np(mean_face, np.float32)
        self.template = _to_np(template, np.float32) if template is not None else self.mean_face
        self.triangles = _to_np(triangles, np.int64)
        self.mm_per_unit = float(mm_per_unit)
        self.num_vertices = int(self.mean_face.shape[0])
        self.id_dim, self.exp_dim = int(vae.id_dim), int(vae.exp_dim)
        self.units = self._check_units(units)
        if raw_units is not None and raw_units not in UNIT_MM:
            raise ValueError(f"raw_units={raw_units!r}; valid choices: {tuple(UNIT_MM)} or None")
        self.raw_units = raw_units
        self.vertex_index_map = None if vertex_index_map is None else _to_np(vertex_index_map, np.int64).reshape(-1)
        self.source_vertices = None if source_vertices is None else int(source_vertices)
        if (self.vertex_index_map is None) != (self.source_vertices is None):
            raise ValueError("give both vertex_index_map and source_vertices, or neither")
        if self.vertex_index_map is not None and (
                len(self.vertex_index_map) != self.num_vertices or self.source_vertices <= self.num_vertices
                or self.vertex_index_map.min() < 0 or self.vertex_index_map.max() >= self.source_vertices):
            raise MeshMismatchError(f"vertex_index_map ({len(self.vertex_index_map)} entries) does not map a "
                                    f"{self.source_vertices}-vertex source onto the {self.num_vertices} vertices")
        self.align = bool(align)
        self.meta = dict(meta or {})
        self.batch_size = int(batch_size)
        self._mean_t = torch.as_tensor(self.mean_face, device=self.device)
        self._mean_rms = _rms_radius(self.mean_face[None].astype(np.float64))[0]
        if vae.num_vertices != self.num_vertices:
            raise MeshMismatchError(f"model decodes {vae.num_vertices} vertices but the mean face has {self.num_vertices}")
        if self.triangles.size and (self.triangles.min() < 0 or self.triangles.max() >= self.num_vertices):
            raise MeshMismatchError("triangles index vertices outside the template")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path, device="cpu", units: str = "auto", align: bool = False) -> "FaceModel":
        ckpt_path = _resolve_checkpoint(path)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{ckpt_path}: expected a dict checkpoint, got {type(ckpt).__name__}")
        state = _first(ckpt, "vae", "model", "state_dict", "vae_state_dict")
        if state is None and "encoder.conv1.weight" in ckpt:
            state = ckpt
        if state is None:
            raise KeyError(f"{ckpt_path}: no VAE weights (looked for 'vae', 'model', 'state_dict'); keys: {sorted(ckpt)}")
        state = _strip_prefixes(dict(state))
        mcfg = dict(_first(ckpt, "model_config", "model_cfg", "model_args", default={}) or {})
        kind = mcfg.get("kind", "vae")
        if kind != "vae":
            raise ValueError(f"{ckpt_path}: model.kind={kind!r}; the inference API needs a trained VAE")
        args = infer_model_args(state)
        for k in ("id_dim", "exp_dim", "decoder_hidden"):
            if k in mcfg and int(mcfg[k]) != args[k]:
                raise ValueError(f"{ckpt_path}: model config says {k}={mcfg[k]} but the weights have {args[k]}")
        nv = _first(ckpt, "num_vertices")
        if nv is not None and int(nv) != args["num_vertices"]:
            raise ValueError(f"{ckpt_path}: num_vertices={int(nv)} but the decoders output {args['num_vertices']}")
        if "width" in mcfg and not mcfg.get("encoder_channels"):
            args["width"] = float(mcfg["width"])
        vae = DisentanglingVAE(pointwise=str(mcfg.get("pointwise", "conv")), **args)
        vae.load_state_dict(state, strict=True)
        mean_face = _first(ckpt, "mean_face")
        triangles = _first(ckpt, "triangles", "faces")
        if mean_face is None or triangles is None:
            raise KeyError(f"{ckpt_path}: the checkpoint lacks 'mean_face' or 'triangles' (keys: {sorted(ckpt)})")
        mm = _first(ckpt, "mm_per_unit")
        if mm is None:
            units_meta = _first(ckpt, "units", default={})
            mm = units_meta.get("mm_per_unit") if isinstance(units_meta, dict) else None
        skip = {"vae", "model", "state_dict", "vae_state_dict", "mean_face", "triangles", "faces", "template",
                "vertex_index_map"}
        meta = {k: v for k, v in ckpt.items() if k not in skip}
        meta["checkpoint"] = str(ckpt_path)
        raw_units, meta["raw_units_from"] = _resolve_raw_units(ckpt, ckpt_path)
        vmap, src = _resolve_vertex_map(ckpt, ckpt_path, args["num_vertices"])
        return cls(vae, mean_face, triangles, mm_per_unit=1.0 if mm is None else float(mm),
                   template=_first(ckpt, "template"), units=units, align=align, device=device, meta=meta,
                   raw_units=raw_units, vertex_index_map=vmap, source_vertices=src)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_units(units: str) -> str:
        if units not in UNITS:
            raise ValueError(f"units={units!r}; valid choices: {UNITS}")
        return units

    def resolve_units(self, units: Optional[str] = None) -> str:
        """The concrete units (``stored``, ``mm``, ``cm`` or ``m``) a call with ``units`` uses:
        None -> the model's default; ``auto`` -> the raw files' units (``stored`` if unknown)."""
        u = self._check_units(units or self.units)
        if u == "auto":
            u = self.raw_units or "stored"
        return u

    def _factor(self, unit: str) -> float:
        """Factor from concrete ``unit`` to stored units."""
        return 1.0 if unit == "stored" else UNIT_MM[unit] / self.mm_per_unit

    def _scale(self, units: Optional[str]) -> float:
        """Factor from the caller's units to stored units."""
        return self._factor(self.resolve_units(units))

    def to_stored(self, vertices, units: Optional[str] = None) -> np.ndarray:
        """Vertices in ``units`` (default: the model's) -> stored units (float32)."""
        return (_to_np(vertices) * self._scale(units)).astype(np.float32)

    def from_stored(self, vertices, units: Optional[str] = None) -> np.ndarray:
        """Stored-unit vertices -> ``units`` (default: the model's, e.g. the raw files' units) (float32)."""
        return (_to_np(vertices) / self._scale(units)).astype(np.float32)

    def likely_units(self, vertices) -> tuple[str, float]:
        """(units among mm, cm, m, stored that bring the faces' RMS radius closest to the mean
        face's, the size ratio to the mean face if read in those units); vertices (V,3)/(B,V,3)."""
        rms = float(np.median(_rms_radius(_to_np(vertices).reshape(-1, self.num_vertices, 3))))
        best, best_err, best_ratio = "stored", math.inf, 1.0
        for u in ("mm", "cm", "m", "stored"):  # a physical unit wins a tie with "stored"
            ratio = rms * self._factor(u) / self._mean_rms
            err = abs(math.log(max(ratio, 1e-30)))
            if err < best_err - 1e-2:
                best, best_err, best_ratio = u, err, ratio
        return best, best_ratio

    def check_scale(self, stored: np.ndarray, unit: str, source: str = "input") -> Optional[str]:
        """Warn (:class:`UnitsWarning`) when faces (B,V,3) already converted from ``unit`` to stored
        units are far from the training faces' size (RMS radius about the centroid; factor >
        :data:`SCALE_WARN_FACTOR`), naming the units they are most likely in. Returns the message."""
        ratios = _rms_radius(np.asarray(stored, np.float64)) / self._mean_rms
        bad = np.flatnonzero((ratios > SCALE_WARN_FACTOR) | (ratios < 1.0 / SCALE_WARN_FACTOR))
        if not bad.size:
            return None
        k = int(bad[0])
        ratio = float(ratios[k])
        raw = np.asarray(stored[k], np.float64) / self._factor(unit)
        likely, likely_ratio = self.likely_units(raw)
        where = source if len(ratios) == 1 else f"{source} (face {k}; {bad.size} of {len(ratios)} faces)"
        msg = (f"{where}: read as {UNIT_NAMES[unit]} ({unit}), the face is {_fmt_ratio(ratio)}× the size of the training "
               f"faces (RMS radius {ratio * self._mean_rms / self._factor(unit):.4g} {unit}, expected about "
               f"{self._mean_rms / self._factor(unit):.4g} {unit}); ")
        if likely != unit and abs(math.log(likely_ratio)) < math.log(SCALE_WARN_FACTOR):
            msg += (f"it looks like it is in {UNIT_NAMES[likely]}: pass units={likely!r} "
                    f"(--units {likely}) if so")
        else:
            msg += "no unit (mm, cm, m, stored) brings it to the training scale; check the mesh"
        if self.raw_units is None and unit == "stored":
            msg += " (the units of this model's training files are unknown, so inputs default to stored units)"
        warnings.warn(msg, UnitsWarning, stacklevel=4)
        return msg

    def _check_topology(self, faces: Optional[np.ndarray], source: str) -> None:
        if faces is None:
            return
        if faces.shape != self.triangles.shape or not np.array_equal(_canonical(faces), _canonical(self.triangles)):
            raise MeshMismatchError(
                f"{source}: its {len(faces)} triangles are not the training template's {len(self.triangles)} "
                "triangles; the model needs meshes registered to the training topology (same vertices, same order)")

    def _vertex_count_error(self, src: str, n: int) -> MeshMismatchError:
        full = (f" or the {self.source_vertices}-vertex full-resolution source topology it was decimated from"
                if self.source_vertices is not None else "")
        return MeshMismatchError(f"{src}: {n} vertices, but the model was trained on a {self.num_vertices}-vertex "
                                 f"template (inputs must be registered to it{full})")

    def _read_checked(self, path) -> np.ndarray:
        v, f = read_mesh(path)
        if self.source_vertices is not None and v.shape[0] == self.source_vertices:
            return v[self.vertex_index_map]  # full resolution: keep the model's vertices
        if v.shape[0] != self.num_vertices:
            raise self._vertex_count_error(str(path), v.shape[0])
        self._check_topology(f, str(path))
        return v

    def as_vertices(self, x: ArrayLike, units: Optional[str] = None, align: Optional[bool] = None) -> tuple[np.ndarray, bool]:
        """Any accepted input -> ((B, V, 3) float32 in stored units, was_single), checked (and aligned)."""
        if _is_path(x):
            batch, single, src = self._read_checked(x)[None], True, str(x)
        elif isinstance(x, (list, tuple)) and x and all(_is_path(p) for p in x):
            batch, single, src = np.stack([self._read_checked(p) for p in x]), False, "mesh list"
        else:
            a = _to_np(x)
            if a.ndim == 2:
                batch, single = a[None], True
            elif a.ndim == 3:
                batch, single = a, False
            else:
                raise MeshMismatchError(f"vertices must be (V, 3) or (B, V, 3); got shape {a.shape}")
            src = "input"
        if batch.shape[-1] != 3:
            raise MeshMismatchError(f"{src}: vertices must have 3 coordinates; got shape {batch.shape}")
        if self.source_vertices is not None and batch.shape[1] == self.source_vertices:
            batch = batch[:, self.vertex_index_map]  # full resolution: keep the model's vertices
        if batch.shape[1] != self.num_vertices:
            raise self._vertex_count_error(src, batch.shape[1])
        if not np.isfinite(batch).all():
            raise ValueError(f"{src}: vertices contain NaN or inf")
        unit = self.resolve_units(units)
        batch = batch * self._factor(unit)
        self.check_scale(batch, unit, src)
        if self.align if align is None else align:
            batch = self.align_to_template(batch)
        return batch.astype(np.float32), single

    def align_to_template(self, vertices) -> np.ndarray:
        """Rigidly align (B, V, 3) or (V, 3) stored-unit faces to the template (Kabsch)."""
        from facedis.metrics import kabsch_align

        v = _to_np(vertices)
        return kabsch_align(v, np.broadcast_to(self.template.astype(np.float64), v.shape))

    def _out(self, a: torch.Tensor | np.ndarray, single: bool, units: Optional[str]) -> np.ndarray:
        a = _to_np(a, np.float32) / np.float32(self._scale(units))
        return a[0] if single else a

    # ------------------------------------------------------------------ core
    @torch.no_grad()
    def _encode_stored(self, v: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        zi, ze = [], []
        for s in range(0, len(v), self.batch_size):
            x = torch.as_tensor(v[s:s + self.batch_size], device=self.device)
            enc = self.vae(x, mode="encode")  # the encoder sees the absolute face (as in training)
            zi.append(enc.mu_id)
            ze.append(enc.mu_exp)
        return torch.cat(zi), torch.cat(ze)

    @torch.no_grad()
    def _decode_stored(self, z_id, z_exp) -> tuple[torch.Tensor, torch.Tensor]:
        zi = torch.as_tensor(_to_np(z_id, np.float32), device=self.device)
        ze = torch.as_tensor(_to_np(z_exp, np.float32), device=self.device)
        zi, ze = zi.reshape(-1, self.id_dim), ze.reshape(-1, self.exp_dim)
        if len(zi) != len(ze):
            if len(zi) == 1:
                zi = zi.expand(len(ze), -1)
            elif len(ze) == 1:
                ze = ze.expand(len(zi), -1)
            else:
                raise ValueError(f"{len(zi)} identity codes but {len(ze)} expression codes")
        return self.vae.decode(zi, ze)

    # ------------------------------------------------------------------ public API
    def encode(self, vertices: ArrayLike, units: Optional[str] = None, align: Optional[bool] = None):
        """Deterministic codes (μ_id, μ_exp): (d_id,), (d_exp,) for one face, (B, d) for a batch."""
        v, single = self.as_vertices(vertices, units, align)
        zi, ze = self._encode_stored(v)
        zi, ze = zi.cpu().numpy(), ze.cpu().numpy()
        return (zi[0], ze[0]) if single else (zi, ze)

    def decode(self, z_id, z_exp, part: str = "full", units: Optional[str] = None) -> np.ndarray:
        """Codes -> faces. part: ``full`` M̄+Δ_id+Δ_exp, ``identity`` M̄+Δ_id (the neutral),
        ``expression`` M̄+Δ_exp (the expression shown on the mean face), ``expression_offset`` Δ_exp.
        A single code (d,) gives (V, 3); (B, d) gives (B, V, 3); a single code broadcasts."""
        single = np.ndim(_to_np(z_id)) == 1 and np.ndim(_to_np(z_exp)) == 1
        d_id, d_exp = self._decode_stored(z_id, z_exp)
        if part == "full":
            out = self._mean_t + d_id + d_exp
        elif part == "identity":
            out = self._mean_t + d_id
        elif part == "expression":
            out = self._mean_t + d_exp
        elif part == "expression_offset":
            out = d_exp
        else:
            raise ValueError(f"part={part!r}; valid choices: ('full', 'identity', 'expression', 'expression_offset')")
        return self._out(out, single, units)

    def reconstruct(self, vertices: ArrayLike, units: Optional[str] = None, align: Optional[bool] = None) -> np.ndarray:
        """The full reconstruction M̄ + Δ_id + Δ_exp."""
        return self._apply(vertices, "full", units, align)

    def neutral(self, vertices: ArrayLike, units: Optional[str] = None, align: Optional[bool] = None) -> np.ndarray:
        """The predicted identity (neutral face) M̄ + Δ_id."""
        return self._apply(vertices, "identity", units, align)

    def expression(self, vertices: ArrayLike, offset: bool = False, units: Optional[str] = None,
                   align: Optional[bool] = None) -> np.ndarray:
        """The predicted expression: M̄ + Δ_exp (on the mean face), or Δ_exp with ``offset=True``."""
        return self._apply(vertices, "expression_offset" if offset else "expression", units, align)

    def disentangle(self, vertices: ArrayLike, units: Optional[str] = None, align: Optional[bool] = None) -> dict:
        """Everything at once: {full, identity, expression, expression_offset, z_id, z_exp}."""
        v, single = self.as_vertices(vertices, units, align)
        zi, ze = self._encode_stored(v)
        d_id, d_exp = self._decode_stored(zi, ze)
        m = self._mean_t
        out = {"full": m + d_id + d_exp, "identity": m + d_id, "expression": m + d_exp, "expression_offset": d_exp}
        res = {k: self._out(t, single, units) for k, t in out.items()}
        res["z_id"], res["z_exp"] = (zi[0].cpu().numpy(), ze[0].cpu().numpy()) if single else (zi.cpu().numpy(), ze.cpu().numpy())
        return res

    def _apply(self, vertices, part, units, align):
        v, single = self.as_vertices(vertices, units, align)
        zi, ze = self._encode_stored(v)
        out = self.decode(zi, ze, part=part, units=units)
        return out[0] if single else out

    def transfer(self, source: ArrayLike, target: ArrayLike, units: Optional[str] = None,
                 align: Optional[bool] = None) -> np.ndarray:
        """Expression transfer: the **target's identity** with the **source's expression**,
        decode(z_id(target), z_exp(source)) = M̄ + Δ_id(target) + Δ_exp(source).
        Batches pair up element-wise; a single face broadcasts against a batch."""
        vs, s1 = self.as_vertices(source, units, align)
        vt, s2 = self.as_vertices(target, units, align)
        _, ze = self._encode_stored(vs)
        zi, _ = self._encode_stored(vt)
        out = self.decode(zi, ze, part="full", units=units)
        return out[0] if (s1 and s2) else out

    def interpolate(self, a: ArrayLike, b: ArrayLike, steps: int = 5, part: str = "identity",
                    units: Optional[str] = None, align: Optional[bool] = None, return_codes: bool = False):
        """Linear interpolation in code space from face ``a`` (t=0) to face ``b`` (t=1), ``steps`` ≥ 2
        frames including both ends.

        part: ``identity`` moves z_id from a's to b's and keeps a's z_exp; ``expression`` moves
        z_exp and keeps a's z_id; ``both`` moves both (t=1 reconstructs b). Returns full faces
        (steps, V, 3); with ``return_codes`` also (z_id (steps, d_id), z_exp (steps, d_exp)).
        """
        if part not in PARTS:
            raise ValueError(f"part={part!r}; valid choices: {PARTS}")
        if int(steps) < 2:
            raise ValueError(f"steps={steps}: need at least 2 (the two ends)")
        va, sa = self.as_vertices(a, units, align)
        vb, sb = self.as_vertices(b, units, align)
        if not (sa and sb):
            raise ValueError("interpolate takes one face for a and one for b")
        zi, ze = self._encode_stored(np.concatenate([va, vb]))
        t = torch.linspace(0.0, 1.0, int(steps), device=self.device)[:, None]
        lerp = lambda z: z[0:1] + t * (z[1:2] - z[0:1])  # noqa: E731
        z_id = lerp(zi) if part in ("identity", "both") else zi[0:1].expand(len(t), -1)
        z_exp = lerp(ze) if part in ("expression", "both") else ze[0:1].expand(len(t), -1)
        z_id, z_exp = z_id.clone(), z_exp.clone()
        z_id[0], z_exp[0] = zi[0], ze[0]  # exact ends (no round-off from the lerp)
        if part in ("identity", "both"):
            z_id[-1] = zi[1]
        if part in ("expression", "both"):
            z_exp[-1] = ze[1]
        faces = self.decode(z_id, z_exp, part="full", units=units)
        if return_codes:
            return faces, (z_id.cpu().numpy(), z_exp.cpu().numpy())
        return faces

    def to_mm(self, stored) -> np.ndarray:
        return _to_np(stored, np.float32) * np.float32(self.mm_per_unit)

    def save_mesh(self, path, vertices, vertex_colors=None) -> Path:
        """Write a face with the training triangles (PLY/OBJ by suffix)."""
        return write_mesh(path, vertices, self.triangles, vertex_colors=vertex_colors)

    def __repr__(self) -> str:
        return (f"FaceModel(V={self.num_vertices}, F={len(self.triangles)}, d_id={self.id_dim}, d_exp={self.exp_dim}, "
                f"mm_per_unit={self.mm_per_unit:g}, units={self.units!r}, raw_units={self.raw_units!r}, "
                f"align={self.align})")


def _fmt_ratio(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _rms_radius(v: np.ndarray) -> np.ndarray:
    """RMS distance of the vertices to their centroid, per face of (B, V, 3) -> (B,)."""
    v = np.asarray(v, np.float64)
    return np.sqrt(((v - v.mean(axis=1, keepdims=True)) ** 2).sum(-1).mean(-1))


def load(run_dir_or_checkpoint, device="cpu", units: str = "auto", align: bool = False) -> FaceModel:
    """Load a trained model: a run directory (its ``model.pt``), a checkpoint file, or the name of
    a model shipped with facedis (``facedis.pretrained``, e.g. ``"synth-demo"``).

    device: where the VAE runs; units: default units of inputs/outputs: ``auto`` (the units of
    the raw files of the model's data set, e.g. metres for CoMA; ``model.raw_units``),
    ``stored``, ``mm``, ``cm`` or ``m``; align: default for Kabsch-aligning inputs to the
    template. Uses ``torch.load(weights_only=True)``.
    """
    return FaceModel.from_checkpoint(run_dir_or_checkpoint, device=device, units=units, align=align)
