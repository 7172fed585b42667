"""Atomic file output and YAML input with precise error messages.

Everything that matters (genotypes, checkpoints, resolved configs, metrics) is written to a
temporary file in the destination folder and renamed into place, so a killed job never leaves a
half-written file behind. The temporary files are hidden (``.NAME.XXXXXXXX.tmp``): one that a kill -9
left behind is removed when its run directory is next locked (:func:`remove_stale_temp_files`).

A write that the storage refuses (disk full, quota, file size limit, read-only file system) becomes
one :class:`StorageError` line naming the file, whichever writer met it: the atomic helpers here,
:func:`append_text` for logs, and :func:`storage_errors` around any other write.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import yaml

from .errors import BNASError, ConfigError

#: errno -> what the storage said; a write failing with one of these is a :class:`StorageError`
STORAGE_ERRNOS = {
    errno.ENOSPC: 'no space left on device',
    errno.EDQUOT: 'disk quota exceeded',
    errno.EFBIG: 'file too large',
    errno.EROFS: 'read-only file system',
}
#: the longest folder name a run may create (file systems allow 255 bytes; outputs add affixes inside)
MAX_NAME_BYTES = 200
#: temporary files of :func:`atomic_path` are ``.NAME.XXXXXXXX.tmp`` beside ``NAME``
TEMP_SUFFIX = '.tmp'


class StorageError(BNASError):
    """The storage refused a write (disk full, quota, size limit, read-only): the run stops with one line
    naming the file; the file it replaces is intact and no temporary file is left. Exit status 1 (an
    environment fault, not a user mistake)."""

    exit_status = 1

    @classmethod
    def writing(cls, path: str | os.PathLike, err: int) -> 'StorageError':
        reason = STORAGE_ERRNOS.get(err, os.strerror(err))
        fix = {errno.EROFS: 'point the output elsewhere (e.g. --run-dir)',
               errno.EFBIG: 'raise the file size limit (ulimit -f) or point the output to another file system'}.get(
            err, 'free space there (or point the output elsewhere, e.g. --run-dir)')
        return cls(f'{reason} writing {path}; {fix}; the previous file is intact and a run continues from its '
                   'last checkpoint with --resume')


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write of ``path`` refused by the storage (ENOSPC ...) into a one-line :class:`StorageError`."""
    try:
        yield
    except OSError as exc:
        if is_storage_error(exc):
            raise StorageError.writing(path, exc.errno) from None
        raise


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise


def check_output_dir(path: str | os.PathLike, what: str, flag: str) -> Path:
    """Refuse, before any work starts, an output folder that cannot be created: an existing file, a path
    below a file, or a new folder name too long for the file system (``what``/``flag`` name it)."""
    path = Path(path)
    existing = path
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = 'exists and is not a directory' if existing == path else f'would lie below {existing}, which is a file'
        raise ConfigError(f'{what} {path} {where}; choose another {flag}')
    for part in path.parts[len(existing.parts):]:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ConfigError(f'{what} {str(path)[:40]}...: a folder name of {len(part)} characters; use at most '
                              f'{MAX_NAME_BYTES} ({flag})')
    return path


def check_output_file(path: str | os.PathLike, flag: Optional[str] = None, example: Optional[str] = None) -> Path:
    """Refuse, before anything is written, an output file path that names a folder or whose folder cannot be
    created (:func:`check_output_dir`); ``flag`` names the option in the message, ``example`` a file name to
    suggest inside a folder given by mistake."""
    path = Path(path)
    named = f'{flag} {path}' if flag else str(path)
    if path.is_dir():
        raise ConfigError(f'{named} is a directory; name a file to write'
                          + (f', e.g. {path / example}' if example else ''))
    check_output_dir(path.parent, f'the folder of {flag}' if flag else 'the folder of', flag or 'output path')
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Whatever stops the block (an error, Ctrl-C, SIGTERM, a full disk) removes the temporary file and
    leaves ``path`` as it was; a full disk is a :class:`StorageError` naming ``path``."""
    path = check_output_file(path)
    tmp: Optional[str] = None
    try:
        with storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=TEMP_SUFFIX, dir=path.parent)
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
            yield Path(tmp)
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def remove_stale_temp_files(folder: str | os.PathLike) -> List[Path]:
    """Remove the temporary files :func:`atomic_path` leaves when its process is killed -9 in the middle of
    a write. Call it only while holding the folder's lock (nobody else is writing there)."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if entry.name.startswith('.') and entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` in one write; a refused write truncates the file back to where it was,
    so a log never ends in half a line."""
    with storage_errors(path):
        with open(path, 'ab') as f:
            start = f.tell()
            try:
                f.write(text.encode())
                f.flush()
            except BaseException:
                with contextlib.suppress(OSError):
                    f.truncate(start)
                raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically. The archive is built in memory and written by Python, so a write the
    storage refuses surfaces as an ``OSError`` with its errno (torch's own file writer only says
    "file write failed")."""
    # torch on use: `bnas-nni --help` and torch-free helpers import this module
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(buf.getbuffer())


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def save_yaml(data: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_yaml(data))


def parse_yaml(text: str, source: str = '<string>') -> Any:
    """Parse YAML safely; a syntax error names the source and the line, absurd nesting is one line too."""
    try:
        return yaml.safe_load(io.StringIO(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f'{source}:{mark.line + 1}' if mark is not None else source
        problem = getattr(exc, 'problem', None) or str(exc).splitlines()[0]
        raise ConfigError(f'malformed YAML at {where}: {problem}; fix the file and retry') from None
    except RecursionError:
        raise ConfigError(f'{source}: the YAML is nested too deeply to read (thousands of levels); '
                          'a config or genotype needs only a few') from None


def load_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'file not found: {path}; check the path')
    data = path.read_bytes()
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as exc:
        line = data.count(b'\n', 0, exc.start) + 1
        raise ConfigError(f'{path}:{line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; save the file as '
                          'UTF-8') from None
    return parse_yaml(text, str(path))


def parse_set_items(items: Optional[list]) -> Dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML scalars (``0.1``, ``true``, ``[1, 2]``)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if '=' not in item:
            raise ConfigError(f'--set {item!r}: expected KEY=VALUE')
        key, value = item.split('=', 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError):
            out[key.strip()] = value
    return out
