"""Reading NNI's output and logs for the one-line reason something stopped.

Contract: each function takes text or a path that NNI or a trial wrote and returns one line for an
``error: ...`` or ``warning: ...`` message: what failed, the fix where the cause is a known one, and
the log to read for more. They never raise on a missing or unreadable log; they say so instead.

* :func:`nnictl_refusal_reason`: why ``nnictl create`` refused a config (its traceback's last line);
* :func:`manager_failure_reason`: why the NNI manager stopped, from its ``nnimanager.log`` (NNI's
  own ``nnictl create`` reports success and lets a manager die silently);
* :func:`trial_failure_reason`: the last line a failed trial wrote to stderr.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ['nnictl_refusal_reason', 'manager_failure_reason', 'trial_failure_reason']


def _one_line(text: str, limit: int = 240) -> str:
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors='replace').splitlines() if ln.strip()]
    except OSError:
        return ''
    return _one_line(lines[-1], 160) if lines else ''


def nnictl_refusal_reason(text: str, port: int) -> str:
    """The useful line of a failed ``nnictl create``'s output (its traceback's last line), with a fix where known."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and 'pkg_resources' not in ln]
    last = next((ln for ln in reversed(lines) if re.match(r'^[A-Za-z_.]*(Error|Exception)\b', ln)), None)
    last = last or next((ln for ln in reversed(lines) if 'ERROR' in ln), None) or (lines[-1] if lines else 'no output')
    last = re.sub(r'^[A-Za-z_.]*(Error|Exception):\s*', '', last)
    if re.search(r'Port \d+ is not idle', last):
        return f'port {port} is in use (another experiment or program); pass a free one with --port'
    if 'does not have field' in last:
        return f'{last.strip()}: an unknown key in the experiment YAML (NNI 3.0 config keys are camelCase)'
    return _one_line(last)


_LOG_LINE = re.compile(r'^\[[^\]]+\]\s+(?P<level>[A-Z]+)\s+\((?P<who>[^)]*)\)\s+(?P<msg>.*)$')

#: causes NNI states in its log, and what the user should do about each
_MANAGER_HINTS = (
    (re.compile(r'GPU info|NVML|nvidia-smi', re.I),
     'this machine has no usable NVIDIA GPU: set trialGpuNumber: 0 (the CPU presets in experiments/ do), '
     'or use a *_gpu.yml preset on a GPU machine'),
    (re.compile(r'EADDRINUSE', re.I), 'a port the manager needs is in use; pass another --port'),
    (re.compile(r'Tuner did not connect', re.I),
     'the tuner process could not reach the manager on localhost (a proxy setting without no_proxy=localhost, '
     'or a tuner that failed to import)'),
    (re.compile(r'ENOENT|no such file', re.I), 'a path in the experiment YAML does not exist; paths there are '
                                               'relative to the YAML file'),
)


def manager_failure_reason(log_path: str | os.PathLike) -> str:
    """One line saying why the NNI manager stopped, read from its ``nnimanager.log``.

    The first error (later ones are mostly the shutdown tripping over the first), its inner failure
    list, the last line of the dispatcher's log when the tuner is to blame, and a fix where the
    cause is a known one.
    """
    path = Path(log_path)
    try:
        lines = path.read_text(errors='replace').splitlines()
    except OSError:
        return f'no manager log at {path}'
    shutdown, errors = '', []
    for line in lines:
        m = _LOG_LINE.match(line)
        if not m:
            continue
        msg = m.group('msg').strip()
        if m.group('who') == 'ShutdownManager' and msg.startswith('Initiate shutdown'):
            reason = msg.split(':', 1)[-1].strip()
            if reason not in ('SIGTERM', 'SIGINT', 'REST request'):       # stopped from outside, not a cause
                shutdown = shutdown or reason
        elif m.group('level') in ('ERROR', 'CRITICAL', 'FATAL') and not msg.startswith('Error during shutting down'):
            errors.append(msg)
    if not errors and not shutdown:
        return f'the manager stopped without logging an error (see {path})'
    parts = [shutdown] if shutdown else []
    if errors:
        detail = re.sub(r'^(Error:\s*)+', '', errors[0])
        inner = re.search(r"failures:\s*\[\s*'([^']+)'", detail)
        detail = re.sub(r',?\s*collector output:.*$', '', detail)
        if inner:
            detail += f' ({inner.group(1)})'
        if detail.lower() != shutdown.lower():
            parts.append(detail)
    text = '; '.join(parts)
    if re.search(r'tuner|dispatcher', text, re.I):
        dispatcher = _last_line(path.parent / 'dispatcher.log')
        if dispatcher:
            text += f'; dispatcher.log ends with: {dispatcher}'
    hint = next((h for rx, h in _MANAGER_HINTS if rx.search(text + ' ' + ' '.join(errors))), '')
    return _one_line(text, 300) + (f'; {hint}' if hint else '') + f' (log: {path})'


def trial_failure_reason(trial_dir: str | os.PathLike) -> str:
    """The last line a failed trial wrote to stderr (our trainers print one ``error: ...`` line)."""
    trial_dir = Path(trial_dir)
    for name in ('trial.stderr', 'stderr', 'trial.log'):
        path = trial_dir / name
        if path.is_file():
            lines = [ln.strip() for ln in path.read_text(errors='replace').splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith('error:')]
            if errors or lines:
                return _one_line((errors or lines)[-1], 200) + f' (see {path})'
    return f'no trial output in {trial_dir}'
