"""Identity and expression interpolation strips (docs/method.md#applications; paper supplementary).

``FaceModel.interpolate(a, b, steps, part)`` does the work (linear in μ-code space, both ends
included). This module picks faces from a split and draws the strip:

- ``part="identity"``: a = the strongest expression scan of identity A, b = the neutral of
  identity B. z_id moves from A to B while z_exp stays A's expression, so the strip shows the
  identity changing under a fixed expression (the reference only did neutral → neutral).
- ``part="expression"``: a = the neutral of identity A, b = the strongest expression scan of
  another identity B. z_exp moves while z_id stays A's: A's face goes from neutral into B's
  expression (the reference's expression loop was commented out).

Each strip is [input a | t = 0 … 1 | input b].
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

PICKS = ("identity", "expression")


def _neutral_of_subject(split, s: int) -> int:
    idx = np.flatnonzero(split.subject == s)
    neu = idx[split.is_neutral[idx]]
    return int(neu[0]) if neu.size else int(idx[np.argmin(split.level[idx])])


def _strongest_of_subject(split, s: int) -> int:
    idx = np.flatnonzero(split.subject == s)
    cand = idx[~split.is_neutral[idx]]
    cand = cand if cand.size else idx
    return int(cand[np.argmax(split.level[cand])])


def pick_interpolation_pair(split, part: str = "identity") -> tuple[int, int]:
    """Deterministic (a, b) sample indices for a strip (see the module docstring)."""
    subj = np.unique(split.subject)
    if len(subj) < 2:
        raise ValueError(f"{split.name}: interpolation figures need ≥ 2 identities")
    A, B = int(subj[0]), int(subj[1])
    if part == "identity":
        return _strongest_of_subject(split, A), _neutral_of_subject(split, B)
    if part == "expression":
        return _neutral_of_subject(split, A), _strongest_of_subject(split, B)
    raise ValueError(f"part={part!r}; valid choices: {PICKS}")


def interpolation_figure(model, split, path, part: str = "identity", steps: int = 5, a: Optional[int] = None,
                         b: Optional[int] = None, mesh_dir: Optional[Path] = None) -> dict:
    """Draw [input a | interpolation frames | input b] and optionally write the frames as PLYs
    (in the model's units, e.g. the raw files')."""
    from facedis.apps.grid import face_grid

    if a is None or b is None:
        a, b = pick_interpolation_pair(split, part)
    frames = model.interpolate(split.vertices[a], split.vertices[b], steps=steps, part=part, units="stored", align=False)
    ts = np.linspace(0.0, 1.0, steps)
    desc = lambda i: (f"id {split.subject_name(int(split.subject[i]))}, "  # noqa: E731
                      f"{split.expression_name(int(split.expression[i]))}")
    row = [{"vertices": split.vertices[a], "title": "input a"}]
    row += [{"vertices": f, "title": f"t = {t:.2f}"} for f, t in zip(frames, ts)]
    row += [{"vertices": split.vertices[b], "title": "input b"}]
    kept = "expression" if part == "identity" else "identity"
    face_grid([row], model.triangles, path=path, cell_in=1.6,
              suptitle=f"{part} interpolation (a: {desc(a)} -> b: {desc(b)}; {kept} of a kept)")
    files = {f"interpolation_{part}": str(path)}
    if mesh_dir is not None:
        for k, f in enumerate(frames):
            p = Path(mesh_dir) / f"interpolation_{part}_{k:02d}.ply"
            files[f"interpolation_{part}_{k:02d}"] = str(model.save_mesh(p, model.from_stored(f)))
    return {"a": int(a), "b": int(b), "steps": int(steps), "files": files}
