"""The ``bnas-nni`` command line: ``search``, ``train``, ``eval``, ``summary``, ``data``, ``nni``, ``plot``, ``export``, ``config``.

Each subcommand lives beside the code it drives and registers itself through a
``register(subparsers)`` function that adds its parser and sets ``func``; heavy imports (NNI,
Lightning) happen inside ``func`` so ``bnas-nni --help`` stays fast. User mistakes surface as one
line (``error: ...``) and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Callable, List, Optional

# OpenMP's wait policy is left to the user (libgomp's default: spin briefly, then sleep). Forcing PASSIVE
# made every command ~25% slower on a quiet machine (the paper search epoch: 73-77 s against 93-100 s on
# 2 cores), because the supernet's many small parallel regions then wake sleeping threads each time. On
# a machine shared with other CPU work, export OMP_WAIT_POLICY=PASSIVE (the test suite does).
from .errors import BNASError

# subcommand modules, each with ``register(subparsers)``
COMMAND_MODULES = (
    'bnas_nni.search.cli',            # search
    'bnas_nni.train.cli',             # train, eval
    'bnas_nni.summary',               # summary
    'bnas_nni.data',                  # data
    'bnas_nni.nni.cli',               # nni create / stop / list
    'bnas_nni.plot',                  # plot
    'bnas_nni.deploy.cli',            # export
    'bnas_nni.config',                # config (the keys of search and train)
)


def quiet_warnings() -> None:
    """Silence known-harmless warnings of NNI 3.0 on torch 2.14 / Lightning 2.6 (see the README)."""
    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
    warnings.filterwarnings('ignore', message='.*LeafSpec.*')
    warnings.filterwarnings('ignore', category=DeprecationWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='bnas-nni', description=__doc__.splitlines()[0])
    from . import __version__
    parser.add_argument('--version', action='version', version=f'bnas-nni {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    quiet_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return run_guarded(lambda: args.func(args))


def run_guarded(call: Callable[[], Optional[int]],
                interrupted: str = 'interrupted; the run directory is resumable with --resume') -> int:
    """Run an entry point: a user mistake prints one ``error:`` line (exit 2), Ctrl-C a resume hint (130)."""
    try:
        return int(call() or 0)
    except BNASError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
