"""``bnas-nni search``: run a search from a YAML preset in ``experiments/`` (thin; see :mod:`.run`).

Configuration is one flat mapping (:data:`bnas_nni.config.SEARCH`): the defaults (the paper's CIFAR-10
search), then the ``--config`` file, then the flags below, then ``--set KEY=VALUE`` for any key
(``--set KEY=null`` unsets one). Every strategy of the registry runs from here: ``binary-darts``
(default), NNI's one-shot and multi-trial strategies, and strategies registered by a plugin module
named in ``imports``. Launched by NNI (``NNI_PLATFORM`` set, e.g. an nnictl trial command
``python -m bnas_nni search ...``
or ``torchrun --nproc_per_node 2 -m bnas_nni search ...``) the same search reports to NNI through a
:class:`~bnas_nni.search.reporter.SearchTrialReporter`: NNI parameters in, per-epoch and final metrics out.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..cli import quiet_warnings
from ..config import SEARCH, add_config_flags, flag_overrides
from ..io import parse_set_items

__all__ = ['register']

# config keys with a flag of their own (help from their declaration in bnas_nni.config); --set reaches the rest
_FLAG_KEYS = ('space', 'strategy', 'epochs', 'batch_size', 'lamda', 'tau', 'gamma', 'seed', 'dataset', 'data', 'save',
              'out', 'run_dir')


def _cmd_search(args: argparse.Namespace) -> int:
    # the search machinery (and NNI through it) is imported on use: keeps `bnas-nni --help` fast
    from ..integrations.nni.trial import under_nni
    from .reporter import SearchTrialReporter
    from .run import resolve_search_config, run_search

    quiet_warnings()
    # under NNI the trial command channel is captured here, before any NNI engine can swap it
    reporter = SearchTrialReporter() if under_nni() else None
    overrides = flag_overrides(args, _FLAG_KEYS)
    overrides.update(parse_set_items(args.set))                     # --set KEY=null is an explicit unset
    for key, value in (reporter.config_defaults() if reporter else {}).items():
        overrides.setdefault(key, value)
    cfg = resolve_search_config(args.config, overrides)
    run_search(cfg, resume=args.resume, reporter=reporter)
    return 0


def register(subparsers: Any) -> None:
    """Add ``bnas-nni search``."""
    from .strategies import STRATEGIES

    p = subparsers.add_parser('search', help='search BNAS cells (BinaryDARTS or any registered strategy)',
                              description='Search BNAS cells from a YAML preset in experiments/ (default: the '
                                          "paper's CIFAR-10 search). Strategies: " + ', '.join(STRATEGIES.names()),
                              epilog='example: bnas-nni search --config experiments/search_quick_fashion.yaml '
                                     '--save quick_fashion')
    p.add_argument('--config', default=None,
                   help='YAML preset (experiments/search_*.yaml or strategy_*.yaml); default: the paper search')
    add_config_flags(p, SEARCH, _FLAG_KEYS)
    p.add_argument('--resume', action='store_true', help='continue the search in the run directory')
    p.add_argument('--set', action='append', metavar='KEY=VALUE',
                   help='override any config key (repeatable; KEY=null unsets it)')
    p.set_defaults(func=_cmd_search)
