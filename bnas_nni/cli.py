"""bnas-nni: search, train, evaluate and deploy binary networks with BNAS on NNI, one subcommand per task.

Each subcommand lives beside the code it drives and registers itself through a
``register(subparsers)`` function that adds its parser and sets ``func``; heavy imports (NNI,
Lightning) happen inside ``func`` so ``bnas-nni --help`` stays fast. Every way a command stops ends
in one line on stderr, never a traceback (:func:`run_guarded`):

* a user mistake: ``error: ...`` naming the problem and the fix, exit status 2;
* a write the storage refused (disk full, quota, read-only): ``error: ...`` naming the file, exit status 1;
* Ctrl-C (SIGINT) or SIGTERM (``nnictl stop``, schedulers, ``kill``): a resume hint, exit status 130 or
  143 (128 + the signal number, the shell's convention). Both unwind the same way, so temporary files
  are removed and the last checkpoint stays the resume point.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import warnings
from typing import Any, Callable, List, Optional

from . import __version__

# OpenMP's wait policy is left to the user (libgomp's default: spin briefly, then sleep). Forcing PASSIVE
# made every command ~25% slower on a quiet machine (the paper search epoch: 73-77 s against 93-100 s on
# 2 cores), because the supernet's many small parallel regions then wake sleeping threads each time. On
# a machine shared with other CPU work, export OMP_WAIT_POLICY=PASSIVE (the test suite does).
from .errors import BNASError
from .io import StorageError, is_storage_error

# subcommand modules, each with ``register(subparsers)``
COMMAND_MODULES = (
    'bnas_nni.search.cli',            # search
    'bnas_nni.train.cli',             # train, eval
    'bnas_nni.summary',               # summary
    'bnas_nni.data',                  # data
    'bnas_nni.integrations.nni.cli',               # nni create / stop / list
    'bnas_nni.plot',                  # plot
    'bnas_nni.deploy.cli',            # export
    'bnas_nni.config',                # config (the keys of search and train)
    'bnas_nni.study.cli',             # study
    'bnas_nni.latency.cli',           # latency profile / predict
)


def quiet_warnings() -> None:
    """Silence known-harmless warnings of NNI 3.0 on torch 2.14 / Lightning 2.6 (docs: Known limitations)."""
    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
    warnings.filterwarnings('ignore', message='.*LeafSpec.*')
    warnings.filterwarnings('ignore', category=DeprecationWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='bnas-nni', description=__doc__.splitlines()[0])
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds exactly like Ctrl-C (temporary files removed,
    run directory unlocked, the last checkpoint kept)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises :class:`Terminated` (once; a second SIGTERM kills as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def quiet_storage_errors_in_threads():
    """A background writer thread (TensorBoard's) that meets a full disk prints no traceback: the main
    thread meets the same error at its next write and reports it in one line."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if args.exc_value is None or not is_storage_error(args.exc_value):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def run_guarded(call: Callable[[], Optional[int]],
                interrupted: str = 'interrupted; the run directory is resumable with --resume') -> int:
    """Run an entry point so that it ends in one line (see the module docstring): ``error: ...`` with exit
    status 2 for a user mistake (1 for a refused write), ``interrupted`` for Ctrl-C (130) and SIGTERM (143)."""
    try:
        with sigterm_as_interrupt(), quiet_storage_errors_in_threads():
            return int(call() or 0)
    except BNASError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return int(getattr(exc, 'exit_status', 2))
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        error = StorageError.writing(exc.filename or 'an output file', exc.errno)   # a writer we do not wrap
        print(f'error: {error}', file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            head, _, rest = interrupted.partition(';')
            print(f'{head} by SIGTERM;{rest}' if rest else f'{interrupted} (SIGTERM)', file=sys.stderr)
            return 128 + int(signal.SIGTERM)
        print(interrupted, file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
