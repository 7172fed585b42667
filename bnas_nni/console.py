"""Terminal output that shares the screen with progress bars.

A tqdm bar redraws its line in place (carriage return, no newline). A log line written to the same
terminal by an ordinary ``logging.StreamHandler`` lands in the middle of that line and the next
redraw overwrites part of it, leaving ``train 0:  31%|███▏  | 10/32 [..]12/01 10:38 PM train 010 ...``
on screen. Everything here writes through ``tqdm.write`` instead: it clears the active bars, prints
the line, and redraws the bars below it.

* :class:`ConsoleHandler`: a drop-in ``logging.StreamHandler`` that writes that way;
* :func:`log`: the same for a plain message (``print`` replacement);
* :func:`progress`: the one factory for bars (stderr, cleared when done, off when not a terminal).
"""
from __future__ import annotations

import logging
import sys
from typing import IO, Any, Iterable, Optional

from tqdm import tqdm

__all__ = ['ConsoleHandler', 'console_handler', 'log', 'progress']


class ConsoleHandler(logging.StreamHandler):
    """A ``StreamHandler`` (stdout by default) whose lines go above any active tqdm bar."""

    def __init__(self, stream: Optional[IO[str]] = None) -> None:
        super().__init__(stream if stream is not None else sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


def console_handler(fmt: str = '%(asctime)s %(message)s', datefmt: Optional[str] = '%m/%d %I:%M:%S %p',
                    stream: Optional[IO[str]] = None) -> ConsoleHandler:
    """A :class:`ConsoleHandler` with the trainers' log format."""
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
    return handler


def log(message: str, file: Optional[IO[str]] = None) -> None:
    """Print one line (stdout by default) above any active progress bar."""
    stream = file if file is not None else sys.stdout
    tqdm.write(str(message), file=stream)
    stream.flush()


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = '',
             enabled: Optional[bool] = None, file: Optional[IO[str]] = None, **kwargs: Any):
    """A tqdm bar on stderr that disappears when done.

    ``enabled=None`` shows it only when stderr is a terminal (logs and NNI trial output stay clean);
    a disabled bar is still a tqdm object, so ``update``/``set_postfix`` calls need no guard.
    """
    stream = file if file is not None else sys.stderr
    if enabled is None:
        enabled = bool(getattr(stream, 'isatty', lambda: False)())
    options = dict(leave=False, dynamic_ncols=True)
    options.update(kwargs)
    return tqdm(iterable, total=total, desc=desc, file=stream, disable=not enabled, **options)
