"""Search spaces of the loss-weight / latent-size sweeps, one per data set, as data.

A space maps a dotted :class:`facedis.config.Config` key to a *spec string*:

================================  ==================================================================
spec                              meaning (Ray Tune domain)
================================  ==================================================================
``loguniform:LO:HI``              ``tune.loguniform(LO, HI)``
``uniform:LO:HI``                 ``tune.uniform(LO, HI)``
``randint:LO:HI``                 ``tune.randint(LO, HI)`` (HI excluded)
``choice:A,B,C``                  ``tune.choice([A, B, C])`` (values parsed as YAML: ``4``, ``true``, ``+ne-gt-id-dis``)
``grid:A,B,C``                    ``tune.grid_search([A, B, C])`` (every value, times ``--num-samples``)
``fixed:V`` or a plain value      the constant ``V``
================================  ==================================================================

Two *virtual keys* expand into several config keys after sampling (:func:`expand_sample`):

- ``loss.kl`` -> ``loss.kl_id`` and ``loss.kl_exp`` (the paper has one λ2 for both KL terms);
- ``mode`` (``+ne-gt+id-dis``, ``-ne-gt+id-dis``, ``+ne-gt-id-dis``, ``-ne-gt-id-dis``) ->
  ``method.neutral_gt`` and ``method.id_discriminator``.

Paper symbols (Eq. 7) and their keys: λ1 ``loss.recon``, λ2 ``loss.kl`` (tied ``kl_id``/``kl_exp``),
λ3 ``loss.adv_id``, λ4 ``loss.latent_consistency``, λ5 ``loss.laplacian``. The ranges below span
about a decade either side of the paper / reference-README values of *both* modes
(:data:`PAPER_VALUES`, docs/method.md#hyper-parameters), log-uniformly; the latent sizes are
choices around the paper's size. λ5 has no effect in ``+ne-gt`` runs on CoMA/FaceScape (the
Laplacian is off there, ``method.laplacian: auto``). Ranges are starting points: narrow them with
``--space`` once a first sweep shows where the front lies.
"""

from __future__ import annotations

from typing import Any

import yaml

MODES = ("+ne-gt+id-dis", "-ne-gt+id-dis", "+ne-gt-id-dis", "-ne-gt-id-dis")

# Paper / reference-README values (docs/method.md#hyper-parameters), per data set and neutral-GT mode.
PAPER_VALUES: dict[str, dict[str, dict[str, float]]] = {
    "coma": {
        "-ne-gt": {"loss.recon": 600, "loss.kl": 5e-7, "loss.adv_id": 5e-4, "loss.latent_consistency": 5e-3,
                   "loss.laplacian": 1e-2, "model.id_dim": 4, "model.exp_dim": 4},
        "+ne-gt": {"loss.recon": 5000, "loss.kl": 3e-3, "loss.adv_id": 1e-5, "loss.latent_consistency": 7e-3,
                   "loss.laplacian": 7e-3, "model.id_dim": 4, "model.exp_dim": 4},
    },
    "bu3dfe": {
        m: {"loss.recon": 250, "loss.kl": 3e-5, "loss.adv_id": 1e-3, "loss.latent_consistency": 5e-2,
            "loss.laplacian": 10, "model.id_dim": 40, "model.exp_dim": 40}
        for m in ("-ne-gt", "+ne-gt")
    },
    "facescape": {
        m: {"loss.recon": 5000, "loss.kl": 3e-5, "loss.adv_id": 5e-4, "loss.latent_consistency": 1e-2,
            "loss.laplacian": 1e-2, "model.id_dim": 64, "model.exp_dim": 64}
        for m in ("-ne-gt", "+ne-gt")
    },
    # The synthetic CPU demo set has no paper values; the centre is facedis' LossConfig defaults.
    "synth": {
        m: {"loss.recon": 100, "loss.kl": 5e-7, "loss.adv_id": 1e-3, "loss.latent_consistency": 1e-2,
            "loss.laplacian": 1e-2, "model.id_dim": 4, "model.exp_dim": 4}
        for m in ("-ne-gt", "+ne-gt")
    },
}

#: The default search space of each data set (``sweeps/tune.py --dataset NAME``).
SPACES: dict[str, dict[str, str]] = {
    "coma": {
        "loss.recon": "loguniform:100:20000",                 # λ1 (600 −ne-gt, 5000 +ne-gt)
        "loss.kl": "loguniform:1e-7:1e-2",                    # λ2 (5e-7 −ne-gt, 3e-3 +ne-gt)
        "loss.adv_id": "loguniform:1e-6:5e-3",                # λ3 (5e-4 −ne-gt, 1e-5 +ne-gt)
        "loss.latent_consistency": "loguniform:5e-4:5e-2",    # λ4 (5e-3 / 7e-3)
        "loss.laplacian": "loguniform:1e-3:1e-1",             # λ5 (1e-2)
        "model.id_dim": "choice:2,4,8,16",
        "model.exp_dim": "choice:2,4,8,16",
    },
    "bu3dfe": {
        "loss.recon": "loguniform:25:2500",                   # λ1 250
        "loss.kl": "loguniform:3e-7:3e-3",                    # λ2 3e-5
        "loss.adv_id": "loguniform:1e-5:1e-2",                # λ3 1e-3
        "loss.latent_consistency": "loguniform:5e-3:5e-1",    # λ4 5e-2
        "loss.laplacian": "loguniform:1:100",                 # λ5 10
        "model.id_dim": "choice:16,32,40,64",
        "model.exp_dim": "choice:16,32,40,64",
    },
    "facescape": {
        "loss.recon": "loguniform:500:50000",                 # λ1 5000
        "loss.kl": "loguniform:3e-7:3e-3",                    # λ2 3e-5
        "loss.adv_id": "loguniform:5e-6:5e-3",                # λ3 5e-4
        "loss.latent_consistency": "loguniform:1e-3:1e-1",    # λ4 1e-2
        "loss.laplacian": "loguniform:1e-3:1e-1",             # λ5 1e-2
        "model.id_dim": "choice:32,64,128",
        "model.exp_dim": "choice:32,64,128",
    },
    "synth": {
        "loss.recon": "loguniform:10:1000",                   # λ1 100
        "loss.kl": "loguniform:5e-8:5e-6",                    # λ2 5e-7
        "loss.adv_id": "loguniform:1e-4:1e-2",                # λ3 1e-3
        "loss.latent_consistency": "loguniform:1e-3:1e-1",    # λ4 1e-2
        "loss.laplacian": "loguniform:1e-3:1e-1",             # λ5 1e-2
        "model.id_dim": "choice:2,4,8",
        "model.exp_dim": "choice:2,4,8",
    },
}

#: Virtual keys: one sampled value written to several config keys.
TIED: dict[str, tuple[str, ...]] = {"loss.kl": ("loss.kl_id", "loss.kl_exp")}


class SpaceError(ValueError):
    """A malformed spec string, space file or mode."""


def mode_overrides(mode: str) -> dict[str, bool]:
    """``"+ne-gt-id-dis"`` -> ``{"method.neutral_gt": True, "method.id_discriminator": False}``."""
    if mode not in MODES:
        raise SpaceError(f"mode {mode!r} is not valid; choose one of {', '.join(MODES)} or 'search'")
    return {"method.neutral_gt": mode.startswith("+ne-gt"), "method.id_discriminator": mode.endswith("+id-dis")}


def _num(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpaceError(f"space spec {spec!r}: {text!r} is not a number") from None


def _values(text: str) -> list[Any]:
    return [yaml.safe_load(v) if v.strip() else v for v in text.split(",")]


def parse_spec(spec: Any):
    """A spec string (table above) or a plain value -> a Ray Tune domain or a constant."""
    from ray import tune

    if isinstance(spec, list):
        return tune.choice(spec)
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    kind, _, rest = spec.partition(":")
    if kind in ("loguniform", "uniform", "randint"):
        parts = rest.split(":")
        if len(parts) != 2:
            raise SpaceError(f"space spec {spec!r}: expected {kind}:LO:HI")
        lo, hi = (_num(p, spec) for p in parts)
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise SpaceError(f"space spec {spec!r}: need {'0 < ' if kind == 'loguniform' else ''}LO < HI")
        if kind == "randint":
            return tune.randint(int(lo), int(hi))
        return tune.loguniform(lo, hi) if kind == "loguniform" else tune.uniform(lo, hi)
    if kind == "choice":
        return tune.choice(_values(rest))
    if kind == "grid":
        return tune.grid_search(_values(rest))
    if kind == "fixed":
        return yaml.safe_load(rest)
    return spec  # a plain string value that happens to contain ':'


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["loss.recon=loguniform:1:10", "model.id_dim=8"]`` -> ``{"loss.recon": "loguniform:1:10", "model.id_dim": 8}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SpaceError(f"{item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out[key] = raw if isinstance(value, str) else value
    return out


def load_space_file(path) -> dict[str, Any]:
    """A YAML mapping ``dotted.key: spec`` (a list means a choice, a non-spec value a constant)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping of dotted config keys to spec strings")
    return {str(k): v for k, v in data.items()}


def check_keys(space: dict[str, Any]) -> None:
    """Every key must be a Config key, a tied key or ``mode``; raises ConfigError/SpaceError otherwise."""
    from facedis.config import check_key

    for key in space:
        if key == "mode":
            continue
        for k in TIED.get(key, (key,)):
            check_key(k)


def build_space(dataset: str, mode: str = "+ne-gt+id-dis", space: dict[str, Any] | None = None,
                space_file=None, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec-string space of a sweep: the data set's default, then ``space_file``, then ``space``
    (``--space``), then the constants ``fixed`` (``--set``), then ``mode`` (a fixed mode or
    ``"search"``) unless a layer already set ``mode``. Explicit ``method.neutral_gt`` /
    ``method.id_discriminator`` keys win over the mode (:func:`expand_sample` applies ``mode`` first).

    Returned values are still spec strings / constants; :func:`to_param_space` turns them into
    Ray Tune domains. Keys that collide with a tied key (``loss.kl_id`` given while ``loss.kl``
    is searched) replace the tied key.
    """
    if dataset not in SPACES:
        raise SpaceError(f"no search space for data set {dataset!r}; known: {', '.join(sorted(SPACES))}")
    out: dict[str, Any] = dict(SPACES[dataset])
    for layer in (load_space_file(space_file) if space_file else {}, space or {}, fixed or {}):
        for key, value in layer.items():
            for tied, members in TIED.items():
                if key in members:
                    out.pop(tied, None)
                if key == tied:
                    for m in members:
                        out.pop(m, None)
            out[key] = value
    if "mode" not in out:
        if mode == "search":
            out["mode"] = "choice:" + ",".join(MODES)
        else:
            mode_overrides(mode)  # validates
            out["mode"] = mode
    check_keys(out)
    return out


def to_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """Spec strings -> Ray Tune domains (a flat dict with dotted keys)."""
    return {k: parse_spec(v) for k, v in space.items()}


def expand_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A sampled trial config (dotted keys, virtual keys) -> plain Config overrides."""
    out: dict[str, Any] = mode_overrides(sample["mode"]) if "mode" in sample else {}
    for key, value in sample.items():
        if key == "mode":
            continue
        if key in TIED:
            for k in TIED[key]:
                out[k] = value
        else:
            out[key] = value
    return out


def describe(space: dict[str, Any]) -> str:
    """A readable one-key-per-line listing of a spec-string space."""
    width = max((len(k) for k in space), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in space.items())
