"""The search: BinaryDARTS (once), its drivers, the strategy registry, NNI experiments and trials.

* :mod:`.objective` -- the diversity objective and the weight schedule of ``search.py``;
* :mod:`.mixed_cell`, :mod:`.fast_cell` -- the BNAS mixed cell (straightforward and fast, same function);
* :mod:`.binary_darts` -- :class:`BinaryDARTS` and its one-shot module, the whole algorithm;
* :mod:`.driver` -- the resumable driver of ``bnas-nni search``; :mod:`.record` -- the run directory;
* :mod:`.strategies` -- the strategy registry (BinaryDARTS and NNI's own strategies);
* :mod:`.experiment` -- NNI strategies through ``NasExperiment``; :mod:`.evaluators` -- their evaluators;
* :mod:`.run` -- :func:`run_search`, the one entry; :mod:`.trial` -- a search as an ``nnictl`` trial;
* :mod:`.cli` -- ``bnas-nni search``, thin.
"""
