"""Typed run configuration: dataclasses, YAML presets with composition, dotted overrides.

A preset is a YAML file whose keys mirror :class:`Config`. It may name a parent preset with
``base: other.yaml`` (a path relative to the preset's own folder, or a list of them); the child's
keys are merged recursively over the parent's. Command-line overrides use dotted keys::

    accelerate launch facedis/train.py --config configs/coma.yaml --loss.recon=600 --method.neutral_gt=false

Unknown keys and wrong types raise :class:`ConfigError` naming the key and the valid choices, before
any work starts. A run writes its resolved config to ``<run.dir>/config.yaml``; that file can be fed
back with ``--config`` and gives the same run.

Loss-weight names and the paper / reference-code lambdas (docs/method.md, "Loss weights"):

==========================  =================  =====================  =========================================
``loss.`` field             paper (Eq. 7)      reference code flag    term
==========================  =================  =====================  =========================================
``recon``                   λ1                 ``lambda1``            MSE(x̂, X − M̄) (full-face reconstruction)
``kl_id``                   λ2                 ``lambda2``            KL of the identity latent
``kl_exp``                  λ2                 ``lambda3``            KL of the expression latent
``adv_id``                  λ3                 ``lambda4``            adversarial identity loss −log D(X, M̄+Δ_id)
``latent_consistency``      λ4                 ``lambda7``            L1(z_id, z_id of re-encoded M̄+Δ_id)
``laplacian``               λ5                 ``lambda8``            uniform Laplacian of M̄+Δ_id
``neutral_recon``           (not in paper)     ``lambda1·lambda6``    MSE(Δ_id, X_n − M̄) with neutral GT
``exp_recon``               (not in paper)     ``lambda1·lambda6``    MSE(Δ_exp, X − X_n) (BU-3DFE +ne-gt)
==========================  =================  =====================  =========================================

The reference nests λ6 inside λ1; here every weight multiplies its own term, so
``neutral_recon = lambda1 * lambda6``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts."""


@dataclass
class DataConfig:
    root: str = "data/synth"
    """Prepared data set directory (``facedis prepare`` output)."""
    prepare: list[str] = field(default_factory=list)
    """If ``root`` does not exist, run ``facedis prepare`` with these arguments (``--out root`` is added).
    Empty: a missing ``root`` is an error."""
    train_split: str = "train"
    """Split the model trains on."""
    test_split: str = "test"
    """Split the metrics are measured on."""
    in_memory: Literal["auto", "yes", "no"] = "auto"
    """Load shards into RAM (``auto``: when they fit in a quarter of the available memory)."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""


@dataclass
class ModelConfig:
    kind: Literal["vae", "mean_face", "identity_map", "ridge", "supervised"] = "vae"
    """``vae`` is the paper's method; the others are baselines (docs/results.md)."""
    id_dim: int = 4
    """Size of the identity latent z_id."""
    exp_dim: int = 4
    """Size of the expression latent z_exp."""
    width: float = 1.0
    """Multiplier of the PointNet encoder's widths (1.0 = the paper's 64/64/64/128/1024)."""
    encoder_channels: list[int] = field(default_factory=list)
    """The encoder's five point-wise widths, overriding ``width`` when not empty (e.g. ``[64, 64, 64, 128, 128]``)."""
    decoder_hidden: int = 256
    """Hidden width of the two MLP decoders."""
    disc_width: float = 1.0
    """Multiplier of the discriminator's widths."""
    disc_dropout: float = 0.5
    """Dropout of the discriminator's head (when it uses BatchNorm + dropout)."""
    pointwise: Literal["conv", "linear", "fused"] = "conv"
    """Point-wise layers as ``Conv1d(k=1)`` (reference) or as points-major ``Linear`` (same math, faster)."""
    encoder_input: Literal["absolute", "absolute+offset"] = "absolute"
    """What the PointNet encoder sees per point: the absolute face (reference) or the absolute face plus its
    offset from the training mean face (6 channels; not in the paper; learns identity in far fewer steps)."""
    decoder_init: Literal["default", "zero"] = "default"
    """Decoder output layers: PyTorch default init (reference) or zero (an untrained model predicts the mean face)."""
    ridge_alphas: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    """Ridge baseline: regularisation strengths tried on the validation split."""


@dataclass
class MethodConfig:
    neutral_gt: bool = False
    """+ne-gt: supervise the identity branch with the neutral ground truth."""
    id_discriminator: bool = True
    """+id-dis: train with the adversarial identity discriminator."""
    laplacian: Literal["auto", "on", "off"] = "auto"
    """``auto``: on for −ne-gt, off for +ne-gt (CoMA/FaceScape rule); BU-3DFE presets use ``on``."""
    disc_use_bn: bool = False
    """BatchNorm + dropout in the discriminator during joint training (reference: only CoMA +ne-gt)."""


@dataclass
class LossConfig:
    recon: float = 100.0
    """λ1: weight of the full-face reconstruction MSE."""
    kl_id: float = 5e-7
    """λ2: weight of the identity latent's KL term."""
    kl_exp: float = 5e-7
    """λ2: weight of the expression latent's KL term."""
    adv_id: float = 1e-3
    """λ3: weight of the adversarial identity loss −log D(X, M̄+Δ_id)."""
    latent_consistency: float = 1e-2
    """λ4: weight of the L1 between z_id and the code of the re-encoded predicted neutral."""
    laplacian: float = 1e-2
    """λ5: weight of the uniform Laplacian of the predicted neutral."""
    neutral_recon: float = 1000.0
    """Weight of the MSE to the neutral ground truth (+ne-gt only; reference: λ1·λ6)."""
    exp_recon: float = 0.0
    """Weight of the expression-offset MSE to X − X_n (BU-3DFE +ne-gt; reference: λ1·λ6)."""
    kl_decay_epochs: int = 0
    """If > 0, KL weights are multiplied by (T − epoch)/T (reference CoMA: T = 350)."""


@dataclass
class FidelityConfig:
    """Switches between the reference code's behaviour and fixes (docs/fidelity.md)."""

    analytic_kl: bool = False
    """Closed-form KL instead of the reference's one-sample Monte Carlo estimate (changes results)."""
    disc_bn_match: bool = False
    """The joint discriminator keeps the pretraining's BatchNorm/dropout setting (changes results)."""
    detach_fakes: bool = False
    """Detach the fakes in the discriminator step (same updates, fewer FLOPs; required under DDP)."""
    encoder_only_reencode: bool = False
    """Re-encode the predicted neutral with the encoder only (same updates, less work)."""
    reencode_mu: bool = False
    """Latent consistency between means instead of sampled codes (changes results)."""
    dense_laplacian: bool = False
    """Dense V×V Laplacian as in the reference (same values as the sparse one, ~100× the cost)."""


@dataclass
class OptimConfig:
    lr_vae: float = 1e-4
    """Adam learning rate of the VAE."""
    lr_disc: float = 1e-4
    """Adam learning rate of the discriminator during joint training."""
    weight_decay_vae: float = 1e-4
    """Adam weight decay of the VAE."""
    lr_step_epochs: int = 50
    """Multiply the learning rates by ``lr_gamma`` every N epochs."""
    lr_gamma: float = 0.7
    """Learning-rate decay factor of the step schedule."""


@dataclass
class PretrainConfig:
    epochs: int = 50
    """Epochs of discriminator pretraining on same/different-identity pairs."""
    batch_size: int = 32
    """Batch size of discriminator pretraining."""
    lr: float = 1e-4
    """Adam learning rate of discriminator pretraining."""
    use_bn: bool = True
    """BatchNorm + dropout in the discriminator during pretraining."""
    enabled: bool = True
    """Pretrain the discriminator before joint training (skipped when its artefact already exists)."""
    seed: int = 0
    """Seed of the pretraining (part of the artefact key, so runs with different ``train.seed`` share one D)."""


@dataclass
class TrainConfig:
    epochs: int = 300
    """Epochs of joint training (after discriminator pretraining)."""
    batch_size: int = 32
    """Global batch size: split evenly across processes (must be divisible by the world size)."""
    eval_batch_size: int = 64
    """Batch size of evaluation."""
    eval_every: int = 10
    """Evaluate on the test split every N epochs (and always at the end)."""
    checkpoint_every: int = 1
    """Save a full resumable checkpoint every N epochs (and on SIGTERM/SIGUSR1)."""
    checkpoint_every_steps: int = 0
    """Also save a mid-epoch checkpoint every N steps (0 = off)."""
    seed: int = 0
    """Seed of the run (initialisation, data order, sampling)."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision of the training forward: ``auto`` follows Accelerate's launch configuration
    (``accelerate config``, ``accelerate launch --mixed_precision``, ``ACCELERATE_MIXED_PRECISION``;
    ``no`` outside ``accelerate launch``); ``no``/``bf16``/``fp16`` force it. Evaluation is always fp32."""
    compile: bool = False
    """``torch.compile`` the modules (the dynamo backend of ``accelerate launch`` applies too)."""
    fast: bool = False
    """The fast path, same parameter updates: detached fakes, encoder-only re-encode, sparse Laplacian,
    fused point-wise layers (``facedis.components.step_fidelity`` / ``pointwise_mode``)."""
    cpu_threads: int = 0
    """Torch threads per process on CPU; 0: under ``accelerate launch`` each process gets its share of
    the cores, otherwise torch's default (which honours ``OMP_NUM_THREADS``)."""
    max_steps_per_epoch: int = 0
    """Debug/benchmark: stop an epoch after N steps (0 = full epoch)."""
    progress: bool = True
    """Show a progress bar."""
    log_every_steps: int = 50
    """Log the training losses every N steps."""
    image_every: int = 0
    """Write an error-map image to TensorBoard every N epochs (0 = only at the end)."""
    cpu: bool = False
    """Force CPU even when a GPU is present."""
    sync_bn: bool = True
    """Synchronise BatchNorm statistics across processes when the world size is > 1, so a DDP run
    equals a single-process run with the same global batch (CPU: ``facedis.distributed.GlobalBatchNorm``)."""
    check_sync: bool = True
    """With world size > 1, check at every epoch end that all ranks hold identical parameters."""
    eval_align: Literal["auto", "none", "kabsch"] = "auto"
    """Rigidly align predictions to the ground truth before measuring (``auto``: Kabsch for bu3dfe only;
    docs/method.md, "Evaluation protocol")."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: a relative path inside ``out_dir`` (no ``..``)."""
    out_dir: str = "runs"
    """Parent directory of run directories named by ``name``."""
    dir: str = ""
    """Run directory; empty means ``<out_dir>/<name>``."""
    artefact_dir: str = "runs/_artefacts"
    """Where pretrained discriminators are cached (keyed by content hash)."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``<run dir>/tb`` (through Accelerate's trackers)."""
    log_with: list[str] = field(default_factory=list)
    """More experiment trackers through Accelerate: ``wandb`` and/or ``mlflow`` (install them first)."""

    def resolved_dir(self) -> Path:
        return Path(self.dir) if self.dir else Path(self.out_dir) / self.name


@dataclass
class Config:
    dataset: str = "synth"
    """Data set name (synth, coma, bu3dfe, facescape, custom): selects paper numbers and protocol details."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def mode(self) -> str:
        """Paper-style mode label, e.g. ``+ne-gt+id-dis``."""
        ne = "+ne-gt" if self.method.neutral_gt else "-ne-gt"
        dis = "+id-dis" if self.method.id_discriminator else "-id-dis"
        return ne + dis

    def use_laplacian(self) -> bool:
        if self.method.laplacian == "auto":
            return not self.method.neutral_gt
        return self.method.laplacian == "on"


# --------------------------------------------------------------------------------------------
# conversion


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a section with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as a boolean
            value = next((w for w in (("yes", "on", "true") if value else ("no", "off", "false")) if w in choices),
                         value)
        if value in choices:
            return value
        raise ConfigError(f"{key}: {value!r} is not valid; choose {_describe(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {typing.get_args(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") if item_tp is not Any else v for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return _from_dict(tp, value, key)
    return value


def _from_dict(cls, data: dict, prefix: str = ""):
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in types_:
            raise ConfigError(f"unknown key {full!r}; valid keys here: {', '.join(sorted(types_))}")
        kwargs[k] = _coerce(v, types_[k], full)
    defaults = cls()
    for k, v in kwargs.items():
        setattr(defaults, k, v)
    return defaults


def config_from_dict(data: dict) -> Config:
    return _from_dict(Config, data)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"loss.recon=600"`` or ``"--loss.recon=600"`` -> (``"loss.recon"``, ``600``)."""
    item = item[2:] if item.startswith("--") else item
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return a new Config with dotted-key overrides applied (values are type-checked)."""
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    data = config_to_dict(cfg)
    for k, v in overrides.items():
        check_key(k)
        _set_dotted(data, k, v)
    return config_from_dict(data)


def check_key(key: str) -> None:
    """Raise ConfigError unless ``key`` (dotted) names a config field."""
    cls: Any = Config
    parts = key.split(".")
    for i, p in enumerate(parts):
        types_ = _field_types(cls)
        if p not in types_:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown key {key!r}: {p!r} is not in {where}; valid: {', '.join(sorted(types_))}")
        cls = types_[p]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown key {key!r}: {p!r} is not a section")


MODE_KEYS = ("+ne-gt", "-ne-gt", "+id-dis", "-id-dis")


def _mode_matches(key: str, cfg: Config) -> bool:
    """``per_mode`` key such as ``-ne-gt`` or ``-ne-gt+id-dis``: every named switch must match."""
    parts = re.findall(r"[+-](?:ne-gt|id-dis)", key)
    if not parts or "".join(parts) != key:
        raise ConfigError(f"per_mode key {key!r} is not valid; use a combination of {', '.join(MODE_KEYS)}"
                          " (e.g. '-ne-gt' or '-ne-gt+id-dis')")
    flags = {"ne-gt": cfg.method.neutral_gt, "id-dis": cfg.method.id_discriminator}
    return all(flags[p[1:]] == (p[0] == "+") for p in parts)


def _read_layers(path: Path, seen: tuple = ()) -> list[tuple[dict, dict, str]]:
    """The preset and its ``base:`` chain as layers ``(data, per_mode, file)``, parents first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {[str(s) for s in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    bases = data.pop("base", None)
    per_mode = data.pop("per_mode", None) or {}
    if not isinstance(per_mode, dict) or not all(isinstance(v, dict) for v in per_mode.values()):
        raise ConfigError(f"{path}: per_mode must map mode keys (e.g. '-ne-gt') to config sections")
    layers: list = []
    for b in [bases] if isinstance(bases, str) else (bases or []):
        layers += _read_layers(path.parent / b, seen + (path.resolve(),))
    return layers + [(data, per_mode, str(path))]


def _merge_layers(layers, probe: Config | None) -> dict:
    """Merge the layers in order; with ``probe`` (the final mode), each layer's matching per_mode
    blocks (single-switch keys first, then combinations) are merged right after that layer, so a
    later preset's explicit values still win over an earlier preset's per_mode blocks."""
    merged: dict = {}
    for data, per_mode, _ in layers:
        merged = _deep_merge(merged, data)
        if probe is None:
            continue
        for key, block in sorted(per_mode.items(), key=lambda kv: len(re.findall(r"[+-]", kv[0]))):
            if _mode_matches(key, probe):
                merged = _deep_merge(merged, block)
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: dict | list | None = None) -> Config:
    """Load a YAML preset (with ``base:`` composition) and apply dotted overrides.

    ``path`` is a YAML file or the name of a shipped preset (``synth``, ``rows/coma-negt-iddis``,
    ``configs/coma.yaml``; :func:`resolve_preset`).

    A preset may hold ``per_mode:`` blocks keyed by mode (``+ne-gt``, ``-ne-gt``, ``+id-dis``,
    ``-id-dis`` or a combination such as ``-ne-gt+id-dis``). The blocks whose mode matches the
    final ``method.neutral_gt`` / ``method.id_discriminator`` (after the overrides) are merged into
    the preset; the overrides are then applied on top, so they always win. This keeps the
    per-mode hyper-parameters right when a launcher flips a mode with an override. A layer's
    blocks are merged right after that layer, so presets that build on it still win. The resolved
    config has no ``per_mode`` left.
    """
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    data: dict = {}
    if path:
        layers = _read_layers(resolve_preset(path))
        data = _merge_layers(layers, None)
        if any(pm for _, pm, _ in layers):
            probe = config_from_dict(data)
            if overrides:
                probe = apply_overrides(probe, overrides)
            data = _merge_layers(layers, probe)
    cfg = config_from_dict(data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    positive = {
        "model.id_dim": cfg.model.id_dim,
        "model.exp_dim": cfg.model.exp_dim,
        "model.decoder_hidden": cfg.model.decoder_hidden,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "train.eval_every": cfg.train.eval_every,
        "optim.lr_step_epochs": cfg.optim.lr_step_epochs,
        "pretrain.batch_size": cfg.pretrain.batch_size,
    }
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
    for k in ("model.width", "model.disc_width"):
        v = getattr(cfg.model, k.split(".")[1])
        if not v > 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
    ch = cfg.model.encoder_channels
    if ch and (len(ch) != 5 or min(ch) < 1):
        raise ConfigError(f"model.encoder_channels must be empty or 5 positive widths (the paper's: "
                          f"[64, 64, 64, 128, 1024]), got {ch}")
    name = Path(cfg.run.name)
    if not cfg.run.name or name.is_absolute() or ".." in name.parts:
        raise ConfigError(f"run.name={cfg.run.name!r} must be a relative name inside run.out_dir (no '..', not "
                          "absolute); use run.dir to put a run anywhere")
    unknown = sorted(set(cfg.run.log_with) - {"wandb", "mlflow"})
    if unknown:
        raise ConfigError(f"run.log_with: unknown tracker(s) {unknown}; valid: wandb, mlflow (TensorBoard is "
                          "run.tensorboard)")
    if cfg.train.cpu_threads < 0:
        raise ConfigError(f"train.cpu_threads must be >= 0, got {cfg.train.cpu_threads}")
    if cfg.train.epochs < 0 or cfg.pretrain.epochs < 0:
        raise ConfigError("train.epochs and pretrain.epochs must be >= 0")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 (BatchNorm needs more than one sample)")
    for name in dataclasses.fields(LossConfig):
        v = getattr(cfg.loss, name.name)
        if isinstance(v, float) and (v < 0 or v != v):
            raise ConfigError(f"loss.{name.name} must be a finite number >= 0, got {v}")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def config_hash(section) -> str:
    """Stable short hash of a config section (used to key cached artefacts)."""
    import hashlib

    blob = json.dumps(dataclasses.asdict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# shipped presets


PRESETS_DIR = Path(__file__).resolve().parent / "configs"
"""The presets shipped with the package (package data; ``configs/`` in a source checkout links here)."""


def list_presets() -> list[str]:
    """Names of the shipped presets (``synth``, ``coma``, ``rows/coma-negt-iddis``, ...)."""
    return sorted(p.relative_to(PRESETS_DIR).with_suffix("").as_posix() for p in PRESETS_DIR.rglob("*.yaml"))


def resolve_preset(path: str | os.PathLike) -> Path:
    """The YAML file ``--config path`` means: an existing file, else a shipped preset.

    A name such as ``synth``, ``rows/coma-negt-iddis``, ``coma.yaml`` or ``configs/coma.yaml`` that
    is not a file here names ``facedis/configs/<name>.yaml``, so the presets (and the documented
    ``--config configs/x.yaml``) work from any directory. Raises :class:`ConfigError` listing the
    shipped presets when neither exists.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if not given.is_absolute():
        name = given.as_posix().removeprefix("./").removeprefix("configs/")
        if not name.endswith((".yaml", ".yml")):
            name += ".yaml"
        candidate = PRESETS_DIR / name
        if candidate.is_file() and PRESETS_DIR in candidate.resolve().parents:
            return candidate
    raise ConfigError(f"config file not found: {path} (and no shipped preset of that name; presets: "
                      f"{', '.join(list_presets())})")


# --------------------------------------------------------------------------------------------
# command-line overrides and help


def split_cli_overrides(args: list[str]) -> list[str]:
    """Command-line words -> override strings: ``--a.b=1``, ``--a.b 1`` and ``a.b=1`` are one syntax
    across ``facedis train``, ``tune`` and ``submit``: ``["--a.b=1", "--c.d", "2"]`` -> ``["a.b=1", "c.d=2"]``.

    Raises :class:`ConfigError` for a word that is not an override (keys are checked when applied).
    """
    out, i = [], 0
    while i < len(args):
        a = args[i]
        key = a[2:] if a.startswith("--") else a
        if "=" in key:
            out.append(key)
        elif a.startswith("--") and "." in key and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{key}={args[i + 1]}")
            i += 1
        else:
            raise ConfigError(f"unrecognised argument {a!r}: config overrides look like --section.key=value "
                              "(see --help for every field)")
        i += 1
    return out


def _field_docs() -> dict[str, dict[str, str]]:
    """``{class name: {field: attribute docstring}}`` read from this module's source."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, nxt in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                fields[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(item)}]"
    return getattr(tp, "__name__", str(tp))


def _cli_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v else "''"
    if isinstance(v, list):
        return "[" + ", ".join(_cli_value(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split()).replace("``", "`")
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]


def describe_fields(cls=Config, prefix: str = "") -> list[dict[str, str]]:
    """Every config field as ``{"key", "type", "default", "doc"}`` (dotted key, type name, default as
    typed on the command line, the first sentence of the field's docstring in this module)."""
    docs = _field_docs()
    defaults = cls()
    out = []
    for f, tp in _field_types(cls).items():
        key = f"{prefix}{f}"
        if dataclasses.is_dataclass(tp):
            out += describe_fields(tp, key + ".")
            continue
        out.append({"key": key, "type": _type_name(tp), "default": _cli_value(getattr(defaults, f)),
                    "doc": _first_sentence(docs.get(cls.__name__, {}).get(f, ""))})
    return out


def fields_help(width: int = 100) -> str:
    """The config fields as help text: ``key  type = default`` and the field's meaning below it."""
    import textwrap

    lines = ["config fields (override any with --section.key=value; type = default, then its meaning):"]
    section = None
    for d in describe_fields():
        top = d["key"].split(".")[0] if "." in d["key"] else None
        if top != section:
            section = top
            lines.append("")
        lines.append(f"  {d['key']}  {d['type']} = {d['default']}")
        lines += textwrap.wrap(d["doc"], width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
