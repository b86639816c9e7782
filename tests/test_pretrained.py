"""The model shipped with facedis works right after install, without training or data."""
import json

import numpy as np
import pytest

from facedis import pretrained


def test_shipped_demo_model_loads_by_name():
    import facedis

    m = facedis.load("synth-demo")
    assert m.num_vertices == 300 and m.raw_units == "m"
    card = (pretrained.model_path("synth-demo").parent / "MODEL_CARD.md").read_text()
    for section in ("**Data.**", "**How it was made.**", "**Metrics**", "**Intended use.**", "**Limits.**",
                    "**Licence.**"):
        assert section in card
    assert pretrained.model_path("synth-demo").stat().st_size < 5 * 2**20  # a few MB at most
    with pytest.raises(KeyError, match="synth-demo"):
        pretrained.model_path("no-such-model")


def test_shipped_samples_are_unseen_faces_the_model_neutralises():
    """The sample faces share the model's topology and its predicted neutrals beat the mean face."""
    import facedis
    from facedis.apps.common import check_same_data, load_split

    m = facedis.load("synth-demo", units="stored")
    split = load_split(pretrained.samples_root("synth-demo"), "test")
    check_same_data(m, split)
    neutral_gt = split.neutral_gt[split.subject]  # each sample's own neutral
    pred = np.asarray(m.neutral(split.vertices))
    assert pred.shape == split.vertices.shape and np.isfinite(pred).all()
    err = np.linalg.norm(pred - neutral_gt, axis=-1).mean()
    base = np.linalg.norm(np.asarray(m.mean_face)[None] - neutral_gt, axis=-1).mean()
    assert err < 0.7 * base, (err, base)


def test_figures_from_the_shipped_model_in_an_empty_directory(tmp_path, monkeypatch):
    from facedis.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["apps", "figures", "--model", "synth-demo", "--max-samples", "8"]) == 0
    out = tmp_path / "figures-synth-demo"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "disentangle_best_median_worst.png" in pngs and len(pngs) >= 5
    assert json.loads((out / "figures.json").read_text())
