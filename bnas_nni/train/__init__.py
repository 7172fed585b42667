"""Training derived BNAS networks: one loop, recipes, and the drivers of ``bnas-nni train`` / ``eval``.

* :mod:`.recipes` -- the recipe seam (optimizer, parameter groups, schedule, loss/teacher, stages, and
  per-stage / per-epoch hooks such as the BN-statistics handling) and the ``paper`` and ``react`` presets;
* :mod:`.model` -- the network a training config describes;
* :mod:`.loop` -- the one train loop and the one evaluation loop (also used by search trials and the
  multi-trial evaluator);
* :mod:`.optim`, :mod:`.schedules`, :mod:`.losses`, :mod:`.teacher` -- the pieces recipes are made of;
* :mod:`.runner` -- :func:`run_training` (stages, resume, NNI reporting, run directory) and
  :func:`run_evaluation`;
* :mod:`.cli` -- the command line, thin.
"""
