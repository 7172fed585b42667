"""``bnas-nni search``: run a search from a YAML preset in ``experiments/`` (thin; see :mod:`.run`).

Configuration is one flat mapping (:data:`bnas_nni.config.SEARCH`): the defaults (the paper's CIFAR-10
search), then the ``--config`` file, then the flags below, then ``--set KEY=VALUE`` for any key
(``--set KEY=null`` unsets one). Every strategy of the registry runs from here: ``binary-darts``
(default), NNI's one-shot and multi-trial strategies, and strategies registered by a plugin module
named in ``imports``. Launched by NNI (``NNI_PLATFORM`` set, e.g. an nnictl trial command ``python -m bnas_nni search ...``
or ``torchrun --nproc_per_node 2 -m bnas_nni search ...``) the same search reports to NNI through a
:class:`~bnas_nni.search.trial.SearchTrialReporter`: NNI parameters in, per-epoch and final metrics out.
"""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ['register']


def _cmd_search(args: argparse.Namespace) -> int:
    from ..cli import quiet_warnings
    from ..io import parse_set_items
    from ..nni.trial import under_nni
    from .run import resolve_search_config, run_search
    from .trial import SearchTrialReporter

    quiet_warnings()
    # under NNI the trial command channel is captured here, before any NNI engine can swap it
    reporter = SearchTrialReporter() if under_nni() else None
    flags = {'space': args.space, 'epochs': args.epochs, 'batch_size': args.batch_size, 'lamda': args.lamda,
             'tau': args.tau, 'gamma': args.gamma, 'seed': args.seed, 'save': args.save, 'out': args.out,
             'run_dir': args.run_dir, 'strategy': args.strategy, 'data': args.data, 'dataset': args.dataset}
    overrides = {k: v for k, v in flags.items() if v is not None}   # flags not given are not overrides
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
    p.add_argument('--space', default=None, help='search space name in search_spaces/ or a YAML path')
    p.add_argument('--strategy', default=None, help=f'one of {", ".join(STRATEGIES.names())} (default binary-darts)')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--lamda', type=float, default=None, help='diversity weight lambda >= 0 (paper: 1)')
    p.add_argument('--tau', type=float, default=None, help='diversity decay tau > 0 in epochs (paper: 7.7)')
    p.add_argument('--gamma', type=float, default=None, help='Zeroise transfer for the ImageNet genotype (paper: 3)')
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--dataset', default=None, help='cifar10 or fashion-mnist')
    p.add_argument('--data', default=None, help='dataset folder')
    p.add_argument('--save', default=None, metavar='NAME', help='write NAME.yaml and NAME_imagenet.yaml genotypes')
    p.add_argument('--out', default=None, metavar='DIR', help='folder for --save (default search_spaces/genotypes)')
    p.add_argument('--run-dir', default=None, metavar='DIR',
                   help='run directory (default runs/search-NAME with --save, else runs/<config name>; '
                        'numbered -2, -3 ... when taken)')
    p.add_argument('--resume', action='store_true', help='continue the search in the run directory')
    p.add_argument('--set', action='append', metavar='KEY=VALUE',
                   help='override any config key (repeatable; KEY=null unsets it)')
    p.set_defaults(func=_cmd_search)
