"""Shared test set-up: quiet, single-threaded, deterministic."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# nothing a test sees may come from an earlier session or the caller's shell


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    """Per session: ``accelerate launch`` reads ``$HF_HOME/accelerate/default_config.yaml`` (default
    ``~/.cache/huggingface``), which an earlier ``accelerate config`` may have left: point it at an
    empty directory. ``ACCELERATE_*`` variables override what the tests configure, and
    ``RAY_ADDRESS`` would send the sweep tests' private Ray to someone's cluster: drop them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        for key in [k for k in os.environ if k.startswith("ACCELERATE_") or k == "RAY_ADDRESS"]:
            mp.delenv(key)
        yield


# --------------------------------------------------------------------------------------------
# engine fixtures (tests/test_engine.py, test_resume.py, test_ddp.py, test_config.py)

TINY_SYNTH = dict(subjects=10, per_subject=8, vertices=300, seed=0)
"""Tiny synthetic data set: 8 training / 2 test identities (two, so that D pretraining has
different-identity test pairs), 300 vertices."""


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A prepared tiny synthetic data set, made once per test session."""
    from facedis.prep import synth

    root = tmp_path_factory.mktemp("engine-data") / "tiny"
    synth.write(synth.generate(**synth.default_options(**TINY_SYNTH)), root)
    return root


@pytest.fixture
def tiny_config(tiny_synth, tmp_path):
    """``make(**overrides) -> Config``: a 2-epoch, width-0.125 run on ``tiny_synth`` writing under
    ``tmp_path`` (dotted-key overrides, e.g. ``make(**{"train.epochs": 1})``)."""
    from facedis.config import Config, apply_overrides

    def make(**overrides):
        base = {
            "dataset": "synth", "data.root": str(tiny_synth),
            "model.id_dim": 4, "model.exp_dim": 4, "model.width": 0.125, "model.decoder_hidden": 32,
            "model.disc_width": 0.125, "method.neutral_gt": True, "method.id_discriminator": True,
            "loss.recon": 5000.0, "loss.neutral_recon": 5000.0, "optim.lr_vae": 1e-3,
            "pretrain.epochs": 1, "pretrain.batch_size": 8,
            "train.epochs": 2, "train.batch_size": 8, "train.eval_every": 1, "train.log_every_steps": 2,
            "train.progress": False, "run.dir": str(tmp_path / "run"),
            "run.artefact_dir": str(tmp_path / "artefacts"),
        }
        base.update(overrides)
        return apply_overrides(Config(), base)

    return make


# ---- a small trained synth model, shared by tests/test_inference.py and tests/test_apps.py ----
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    from test_inference import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("facedis_tiny"))


@pytest.fixture(scope="session")
def model(tiny_run):
    from facedis.inference import load

    return load(tiny_run["run"])


@pytest.fixture(scope="session")
def test_split(tiny_run):
    from facedis.apps.common import load_split

    return load_split(tiny_run["data"], "test")
