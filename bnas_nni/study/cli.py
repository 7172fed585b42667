"""bnas-nni study: compare search strategies with random cells at equal search budget.

The study's trainings run as the trials of one NNI experiment (the web UI URL is printed; ``--local``
runs the same trials in this process). Rerunning the same command continues a stopped study: finished
searches and trainings are kept. The work is done by :func:`bnas_nni.study.runner.run_study`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List

from ..errors import ConfigError
from ..io import parse_set_items
from ..plot import DIRECTORY_PLOTTERS


def _cmd_study(args: argparse.Namespace) -> int:
    # the study pulls in search and training (torch, NNI): imported when the command runs, not for --help
    from .arms import arm_costs, check_equal_budgets
    from .config import load_study_config
    from .report import budget_table
    from .runner import default_study_dir, run_study

    study = load_study_config(args.config, parse_set_items(args.set))
    if args.check:
        costs = arm_costs(study)
        print(budget_table(costs, study))
        check_equal_budgets(costs, study.budget_tolerance)
        print(f'study {study.name}: config and budgets are valid')
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else default_study_dir(study)
    if args.resume and not (run_dir / 'study.yaml').is_file():
        raise ConfigError(f'nothing to resume: {run_dir / "study.yaml"} does not exist (start without --resume, '
                          'or pass the --run-dir of the study)')
    run_study(study, run_dir, local=args.local)
    return 0


def _redraw(run_dir: Path) -> List[Path]:
    from .report import redraw  # the report loads search and training: only when a study is drawn

    return redraw(run_dir)


def register(subparsers: Any) -> None:
    """Add ``bnas-nni study``, and ``bnas-nni plot STUDY_DIR`` (redraws the report and plots)."""
    if ('study.yaml', _redraw) not in DIRECTORY_PLOTTERS:
        DIRECTORY_PLOTTERS.append(('study.yaml', _redraw))
    p = subparsers.add_parser('study', help='compare search strategies with random cells at equal budget',
                              description=__doc__.split('\n\n')[0])
    p.add_argument('--config', required=True, metavar='YAML',
                   help='study YAML, e.g. experiments/study_quick_fashion.yaml')
    p.add_argument('--run-dir', help='study directory (default runs/study-<name>); rerun to continue it')
    p.add_argument('--local', action='store_true', help='run the trainings in this process instead of NNI trials')
    p.add_argument('--set', action='append', metavar='KEY=VALUE',
                   help='override a study key (dotted for nested keys: protocol.train.epochs=1)')
    p.add_argument('--resume', action='store_true',
                   help='continue the study in --run-dir, refusing if there is none (rerunning continues anyway)')
    p.add_argument('--check', action='store_true', help='validate the config and print the budgets, run nothing')
    p.set_defaults(func=_cmd_study)
