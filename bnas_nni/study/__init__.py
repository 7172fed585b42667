"""Studies: equal-budget comparisons of search strategies against random cells (``bnas-nni study``).

* :mod:`.config`: the study YAML, validated (arms, protocol, statistics, NNI settings);
* :mod:`.arms`: the declared search cost of each arm, the equal-budget check, random cells;
* :mod:`.cells`: the cells of each arm (searches per seed, random samples), made once;
* :mod:`.results`: the run directory's files, results keyed by (arm, cell, seed);
* :mod:`.jobs`: one training, the same in-process and as an NNI trial;
* :mod:`.nni_trials`: the trainings as one NNI experiment, and the trial command;
* :mod:`.stats`: mean, std, bootstrap interval, Welch and permutation tests, Kendall's tau, Pareto front;
* :mod:`.report`: summary.json, report.md and the plots;
* :mod:`.runner`: the whole study, resumable; :mod:`.cli`: the command.
"""
