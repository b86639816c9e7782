"""Pretrained models shipped inside the package, usable right after ``pip install``.

    facedis.load("synth-demo")                        # a FaceModel, no training needed
    facedis apps figures --model synth-demo --out figs/

Each model lives in ``facedis/pretrained/<name>/``: ``model.pt`` (the run's inference file),
``MODEL_CARD.md`` (data, command, metrics, licence, intended use and limits) and ``samples/`` (a
few faces of the same topology that the model never saw, as a prepared data set, so the apps have
something to show). Rebuild one (train with its preset, then export; ``facedis.pretrained.build``)
with

    python -m facedis.pretrained synth-demo [--run runs/synth-demo]
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

MODELS = {
    "synth-demo": {
        "preset": "synth",
        "description": "the CPU demo preset (slim network, V=300) on the synthetic ICT-FaceKit faces, "
                       "+ne-gt +id-dis, seed 0",
        "samples": {"subjects": 20, "per_subject": 4, "frames_per_sequence": 4, "vertices": 300, "seed": 12345,
                    "protocol": "unseen-identity"},
        "data_licence": "synthetic faces generated from the ICT-FaceKit morphable model (MIT licence)",
    },
}


def names() -> list[str]:
    return sorted(MODELS)


def is_name(value) -> bool:
    return isinstance(value, str) and value in MODELS


def model_path(name: str) -> Path:
    """``model.pt`` of a shipped model (FileNotFoundError naming the build command if missing)."""
    if name not in MODELS:
        raise KeyError(f"no pretrained model {name!r}; shipped: {', '.join(names())}")
    path = HERE / name / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from this installation; build it with "
                                f"`python -m facedis.pretrained {name}`")
    return path


def samples_root(name: str) -> Path:
    """The shipped sample faces of a model, a prepared data set (split ``test``)."""
    model_path(name)
    return HERE / name / "samples"
