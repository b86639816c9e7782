"""Ray Tune sweeps: ``facedis tune`` (:mod:`facedis.sweeps.tune`); needs ``facedis[sweep]``."""
