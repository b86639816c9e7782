"""Config errors, presets (paper hyper-parameters, per-mode blocks, 12 rows), meta-device builds."""
from pathlib import Path

import pytest
import torch

from facedis.config import Config, ConfigError, apply_overrides, config_to_dict, load_config, save_config
from facedis.components import build_models

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ROWS = sorted((CONFIGS / "rows").glob("*.yaml"))
# registered vertex counts of the prepared data sets (docs/method.md#data-protocols; synth: --vertices 2000)
NUM_VERTICES = {"coma": 5023, "bu3dfe": 5996, "facescape": 4547, "synth": 2000}


# ------------------------------------------------------------------------------ errors
def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"'recno'.*valid.*recon"):
        load_config(CONFIGS / "synth.yaml", ["loss.recno=1"])
    with pytest.raises(ConfigError, match="valid"):
        load_config(CONFIGS / "synth.yaml", ["nosuchsection.x=1"])


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match="train.epochs.*integer"):
        load_config(CONFIGS / "synth.yaml", ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"'no', 'bf16', 'fp16'"):
        load_config(CONFIGS / "synth.yaml", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="true/false"):
        load_config(CONFIGS / "synth.yaml", ["method.neutral_gt=maybe"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(CONFIGS / "synth.yaml", ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="encoder_channels must be empty or 5"):
        load_config(CONFIGS / "synth.yaml", ["model.encoder_channels=[64, 64]"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base: " + str(CONFIGS / "synth.yaml") + "\ntrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz.*epochs"):
        load_config(p)
    p.write_text("per_mode:\n  '-ne-gtx': {loss: {recon: 1}}\n")
    with pytest.raises(ConfigError, match="per_mode key"):
        load_config(p)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "rows" / "coma-nonegt-iddis.yaml", ["train.epochs=7", "loss.adv_id=1e-5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert "per_mode" not in (tmp_path / "config.yaml").read_text()


def test_cli_config_error_exit_code(capsys):
    from facedis.train import main

    assert main(["--config", str(CONFIGS / "synth.yaml"), "--loss.recno=3"]) == 2
    assert "valid" in capsys.readouterr().err
    assert main(["--config", str(CONFIGS / "synth.yaml"), "--train.epochs", "3", "--print-config"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
    assert main(["--config", str(CONFIGS / "synth.yaml"), "stray"]) == 2


# ------------------------------------------------------------------------------ presets
def test_twelve_rows_modes_and_names():
    assert len(ROWS) == 12
    for p in ROWS:
        ds, ne, dis = p.stem.split("-")
        cfg = load_config(p)
        assert cfg.dataset == ds
        assert cfg.method.neutral_gt == (ne == "negt")
        assert cfg.method.id_discriminator == (dis == "iddis")
        assert cfg.run.name == p.stem


@pytest.mark.parametrize("ds,lam1,adv,batch,epochs,pre", [
    ("coma", 5000.0, 5e-4, 32, 300, 50), ("bu3dfe", 250.0, 1e-3, 8, 280, 100), ("facescape", 5000.0, 5e-4, 32, 280, 100)])
def test_paper_hyperparameters(ds, lam1, adv, batch, epochs, pre):
    """Paper §IV-B: λ1, λ3 (adv_id), batch, epochs, Adam 1e-4 ×0.7/50, D pretraining epochs."""
    for p in [CONFIGS / f"{ds}.yaml", *[r for r in ROWS if r.stem.startswith(ds + "-")]]:
        cfg = load_config(p)
        assert cfg.loss.recon == lam1, p  # CoMA -ne-gt: paper 5000 (README 600)
        assert cfg.loss.adv_id == adv, p  # CoMA +ne-gt: paper 5e-4 (README 1e-5)
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.pretrain.epochs) == (batch, epochs, pre)
        assert (cfg.optim.lr_vae, cfg.optim.lr_step_epochs, cfg.optim.lr_gamma) == (1e-4, 50, 0.7)
        assert cfg.optim.weight_decay_vae == 1e-4


def test_per_mode_weights_follow_mode_overrides():
    """Flipping a mode with an override (what the launcher grids do) picks that mode's weights."""
    plus = load_config(CONFIGS / "coma.yaml")
    minus = load_config(CONFIGS / "coma.yaml", {"method.neutral_gt": False})
    row = load_config(CONFIGS / "rows" / "coma-nonegt-iddis.yaml")
    assert (plus.loss.kl_id, plus.method.disc_use_bn, plus.use_laplacian()) == (3e-3, True, False)
    assert (minus.loss.kl_id, minus.loss.latent_consistency, minus.method.disc_use_bn) == (5e-7, 5e-3, False)
    assert minus.use_laplacian() and minus.loss.neutral_recon == 0.0
    assert config_to_dict(minus) == config_to_dict(row)
    # an explicit override still wins over the per_mode block
    assert load_config(CONFIGS / "coma.yaml", ["method.neutral_gt=false", "loss.kl_id=0.5"]).loss.kl_id == 0.5
    bu = load_config(CONFIGS / "rows" / "bu3dfe-negt-iddis.yaml")
    assert bu.use_laplacian() and bu.loss.exp_recon == 125.0 and bu.loss.neutral_recon == 125.0
    assert load_config(CONFIGS / "rows" / "bu3dfe-nonegt-iddis.yaml").loss.exp_recon == 0.0


def _all_presets():
    return [CONFIGS / "synth.yaml", CONFIGS / "coma.yaml", CONFIGS / "bu3dfe.yaml", CONFIGS / "facescape.yaml", *ROWS]


@pytest.mark.parametrize("path", _all_presets(), ids=lambda p: p.stem)
def test_preset_builds_on_meta_device(path):
    """Every preset builds its models at full size without allocating memory."""
    cfg = load_config(path)
    with torch.device("meta"):
        vae, disc = build_models(cfg, NUM_VERTICES[cfg.dataset])
    params = list(vae.parameters()) + (list(disc.parameters()) if disc is not None else [])
    assert all(p.device.type == "meta" for p in params)
    assert vae.id_decoder.fc2.out_features == 3 * NUM_VERTICES[cfg.dataset]
    assert (disc is not None) == cfg.method.id_discriminator
    if disc is not None:
        assert disc.use_bn == cfg.method.disc_use_bn


def test_synth_preset_is_cpu_sized():
    cfg = load_config(CONFIGS / "synth.yaml")
    assert cfg.data.prepare and cfg.data.prepare[0] == "synth"
    assert cfg.method.neutral_gt and cfg.method.id_discriminator
    with torch.device("meta"):
        vae, disc = build_models(cfg, NUM_VERTICES["synth"])
    n = sum(p.numel() for p in vae.parameters()) + sum(p.numel() for p in disc.parameters())
    assert n < 5_000_000


def test_apply_overrides_python_api():
    cfg = apply_overrides(Config(), {"loss.recon": 600, "train.precision": "bf16"})
    assert cfg.loss.recon == 600.0 and cfg.train.precision == "bf16"
    with pytest.raises(ConfigError, match="valid"):
        apply_overrides(Config(), {"train.nope": 1})


def test_bare_no_is_a_precision_not_a_boolean(tmp_path):
    """YAML 1.1 reads ``no`` as False; a choice field that has the word takes it back."""
    cfg = load_config("synth", ["train.precision=no"])
    assert cfg.train.precision == "no"
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  precision: no\n")
    assert load_config(p).train.precision == "no"
