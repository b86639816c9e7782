"""Ray Tune sweeps: ``facedis tune`` (:mod:`facedis.sweeps.tune`); needs ``facedis[sweep]``.

Random search or Optuna's multi-objective samplers over (E_dis, E_rec) (:mod:`.searchers`;
``--search optuna`` needs ``facedis[optuna]``), ASHA or Pareto-aware early stopping
(:mod:`.schedulers`), the front, the scalarised pick and the hypervolume (:mod:`.pareto`), and the
comparison of the two searches on the synthetic set (``python -m facedis.sweeps.compare``).
"""
