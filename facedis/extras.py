"""Optional dependencies ("extras") and the error a missing one gives.

The core install (``pip install facedis``) prepares data, trains and evaluates. Two tools need more:

- ``facedis[sweep]``: Ray Tune, for ``facedis tune`` (``sweeps/tune.py``);
- ``facedis[optuna]``: Ray Tune and Optuna, for ``facedis tune --search optuna``;
- ``facedis[cluster]``: submitit, for ``facedis submit`` and ``facedis status`` (``launch/``);
- ``facedis[all]``: all of them (``facedis[dev]`` adds pytest).
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> what it brings (for messages)
EXTRAS = {"sweep": "Ray Tune", "optuna": "Optuna", "cluster": "submitit"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module`` or raise :class:`MissingExtraError` naming ``facedis[extra]``.

    ``what`` is the tool that needs it (``"facedis tune"``). Any import failure of ``module``
    (the package itself or one of its own dependencies) counts as the extra being incomplete.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = EXTRAS.get(extra, module)
        name = name if name == module else f"{name} ({module})"
        raise MissingExtraError(
            f"{what} needs {name}, which is not installed ({e}). "
            f"Install the '{extra}' extra: pip install 'facedis[{extra}]' "
            f"(from a source checkout: pip install -e '.[{extra}]'; everything: 'facedis[all]')") from None
