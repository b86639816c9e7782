"""The training engine end to end on the tiny synthetic data set (in-process, CPU)."""
import json
import math

import pytest
import torch
import yaml

from facedis import engine
from facedis.config import ConfigError, load_config

FINAL_KEYS = ["E_rec_mean", "E_rec_std", "E_rec_median", "AVD_neu_mean", "AVD_neu_std", "AVD_neu_median",
              "E_dis_ref_mean", "E_dis_ref_median", "E_dis_vstd_mean", "E_dis_vstd_median",
              "epoch", "seed", "dataset", "mode"]


def test_train_writes_run_directory_and_reports(tiny_config):
    cfg = tiny_config()
    reports = []
    final = engine.train(cfg, report=lambda m, d: reports.append((dict(m), d, (d / "state.pt").is_file())))
    run = cfg.run.resolved_dir()
    for k in FINAL_KEYS + ["AVD_neu_meanface_mean", "train/total", "train/disc"]:
        assert k in final, k
    assert final["epoch"] == 2 and final["mode"] == "+ne-gt+id-dis" and final["dataset"] == "synth"
    assert all(math.isfinite(final[k]) for k in FINAL_KEYS[:10])
    # report after every evaluation (eval_every=1), on a complete checkpoint directory
    assert [r[0]["epoch"] for r in reports] == [1, 2] and all(r[2] for r in reports)
    for k in ("E_dis_ref_mean", "E_rec_mean", "AVD_neu_mean", "train/recon", "train/total", "epoch"):
        assert k in reports[0][0]
    # files
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(final))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and "lr/vae" in lines[0] and "lr/disc" in lines[0]
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["world_size"] == 1 and len(prov["dataset"]["content_hash"]) == 64 and "torch" in prov["versions"]
    assert prov["pretrained_disc"]["content_hash"] == prov["dataset"]["content_hash"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    from matplotlib.image import imread

    curves = imread(run / "curves.png")
    assert curves.shape[0] > 300 and curves.shape[1] > 3 * curves.shape[0]  # three panels side by side
    assert load_config(run / "config.yaml").train.epochs == 2
    # model.pt: plain data only
    m = torch.load(run / "model.pt", weights_only=True)
    for k in ("vae", "mean_face", "triangles", "num_vertices", "model_config", "mm_per_unit", "config"):
        assert k in m, k
    assert m["num_vertices"] == 300 and m["mm_per_unit"] == 260.0 and m["model_config"]["width"] == 0.125
    # the pretrained D is an artefact keyed by content hash, reused by the next run
    arts = list((run.parent / "artefacts").glob("disc-*/disc.pt"))
    assert len(arts) == 1
    # rerunning a finished run returns its metrics without training
    again = engine.train(cfg)
    assert again == json.loads((run / "metrics.json").read_text())


def test_tensorboard_tags(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(**{"train.epochs": 1})
    engine.train(cfg)
    ea = EventAccumulator(str(cfg.run.resolved_dir() / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    for t in ("train/recon", "epoch/train/total", "lr/vae", "eval/E_rec_mean", "eval/AVD_neu_mean", "pretrain/disc"):
        assert t in tags["scalars"], (t, tags["scalars"])
    assert "eval/error_map" in tags["images"]


def test_eval_only_reproduces_final_metrics(tiny_config, capsys):
    cfg = tiny_config(**{"train.epochs": 1, "method.id_discriminator": False})
    final = engine.train(cfg)
    run = cfg.run.resolved_dir()
    again = engine.evaluate_run(run)
    for k in FINAL_KEYS[:10]:
        assert again[k] == pytest.approx(final[k], rel=1e-9, abs=1e-12), k
    assert (run / "eval.json").is_file()
    from facedis.train import main

    assert main(["--eval-only", str(run)]) == 0
    assert "E_rec_mean" in capsys.readouterr().out


def test_no_id_dis_skips_discriminator(tiny_config):
    cfg = tiny_config(**{"train.epochs": 1, "method.id_discriminator": False, "method.neutral_gt": False})
    final = engine.train(cfg)
    run = cfg.run.resolved_dir()
    assert "train/disc" not in final and "train/laplacian" in final
    assert not (run.parent / "artefacts").exists()
    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["disc"] is None and state["opt_disc"] is None
    assert json.loads((run / "provenance.json").read_text())["pretrained_disc"]["skipped"]


def test_non_finite_loss_stops_with_term_and_step(tiny_config, monkeypatch):
    import facedis.step as step

    real = step.recon_mse
    calls = {"n": 0}

    def bad_recon(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(step, "recon_mse", bad_recon)
    cfg = tiny_config(**{"pretrain.enabled": False, "train.log_every_steps": 3})
    with pytest.raises(engine.NonFiniteLossError, match=r"'recon'.*global step 4 \(epoch 1, batch 4\)"):
        engine.train(cfg)
    # detected at the next log boundary (step 6), not later
    assert calls["n"] == 6
    assert not (cfg.run.resolved_dir() / "metrics.json").exists()


def test_config_errors_before_any_work(tiny_config, tmp_path):
    cfg = tiny_config(**{"data.root": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="not a prepared data set"):
        engine.train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model.kind"):
        engine.train(tiny_config(**{"model.kind": "pca"}))
    with pytest.raises(ConfigError, match="larger than the training split"):
        engine.train(tiny_config(**{"train.batch_size": 4096}))


def test_resume_refuses_a_different_config(tiny_config):
    cfg = tiny_config(**{"train.epochs": 1, "pretrain.enabled": False})
    engine.train(cfg)
    with pytest.raises(ConfigError, match="loss.recon"):
        engine.train(tiny_config(**{"train.epochs": 1, "pretrain.enabled": False, "loss.recon": 1.0}))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_cpu(tiny_config, precision):
    """bf16/fp16 autocast; fp16 keeps one GradScaler per optimiser (saved in the checkpoint)."""
    cfg = tiny_config(**{"train.epochs": 1, "pretrain.enabled": False, "train.precision": precision})
    final = engine.train(cfg)
    assert math.isfinite(final["E_rec_mean"]) and math.isfinite(final["train/total"])
    state = torch.load(cfg.run.resolved_dir() / "checkpoints" / "last" / "state.pt", weights_only=True)
    if precision == "fp16":
        assert state["scaler_vae"]["scale"] > 0 and state["scaler_disc"]["scale"] > 0
    else:
        assert state["scaler_vae"] is None


def test_prepares_missing_data_set(tiny_config, tmp_path):
    root = tmp_path / "auto-synth"
    cfg = tiny_config(**{"data.root": str(root), "train.epochs": 1, "pretrain.enabled": False,
                         "data.prepare": ["synth", "--subjects", "10", "--per-subject", "4", "--vertices", "200"]})
    final = engine.train(cfg)
    assert (root / "meta.json").is_file() and final["num_test_identities"] == 2


def test_global_batch_sampler_shards_the_same_global_batches():
    from facedis.distributed import GlobalBatchSampler

    one = GlobalBatchSampler(50, 8, 1, 0, seed=3)
    two = [GlobalBatchSampler(50, 8, 2, r, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(4)
    a = list(one)
    b = [x + y for x, y in zip(*[list(s) for s in two])]
    assert a == b and len(a) == 6 and all(len(x) == 8 for x in a)
    one.set_epoch(4, start_step=2)
    assert list(one) == a[2:]
    one.set_epoch(5)
    assert list(one) != a


def test_worker_processes_train_like_in_process(tiny_config, tmp_path):
    """data.num_workers=2 (SlotLoader: workers gather into shared slots) gives the same run."""
    a = engine.train(tiny_config(**{"train.epochs": 1, "run.dir": str(tmp_path / "w0")}))
    b = engine.train(tiny_config(**{"train.epochs": 1, "run.dir": str(tmp_path / "w2"), "data.num_workers": 2}))
    for k in ("train/total", "train/recon", "train/disc", "E_rec_mean", "AVD_neu_mean"):
        assert a[k] == b[k], k
