"""facedis: adversarial 3D face disentanglement of identity and expression (Gu, Pears & Sun, FG 2023).

Public entry points (imported lazily so ``import facedis`` stays light):

- ``facedis.load(run_dir_or_checkpoint)`` -> :class:`facedis.inference.FaceModel`
- ``facedis.train(cfg, report=None)`` -> final metrics (the one training function)
- ``facedis.load_config(path, overrides)`` -> :class:`facedis.config.Config`
- ``facedis.__version__``: the installed distribution's version (package metadata)

The command line is ``facedis <command>`` (:mod:`facedis.cli`).
"""

__all__ = ["load", "FaceModel", "train", "load_config", "Config", "__version__"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facedis")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def __getattr__(name):
    if name == "__version__":
        return _version()
    if name in ("load", "FaceModel"):
        from facedis import inference

        return getattr(inference, name)
    if name == "train":
        from facedis.engine import train

        return train
    if name in ("load_config", "Config"):
        from facedis import config

        return getattr(config, name)
    raise AttributeError(f"module 'facedis' has no attribute {name!r}")
