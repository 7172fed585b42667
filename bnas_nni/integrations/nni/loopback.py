"""Keeping every listener of an NNI experiment on the loopback interface.

Contract: :func:`write_localhost_preload` writes a Node.js preload that makes every TCP server of
the NNI manager (which has no host option) listen on 127.0.0.1; :func:`loopback_namespace_prefix`
returns a command prefix that runs a command in a private network namespace where only loopback
exists (torchrun's rendezvous store listens on every interface), or ``[]`` where the machine does
not allow one. Neither imports NNI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import List

__all__ = ['LOCALHOST_ONLY_JS', 'write_localhost_preload', 'loopback_namespace_prefix']

LOCALHOST_ONLY_JS = """\
// Loaded with NODE_OPTIONS="--require <this file>": every TCP server the NNI manager opens
// listens on 127.0.0.1 (NNI 3.0 has no host option). Unix sockets are left alone.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (first && typeof first === 'object' && !Array.isArray(first)) {
    if (first.path === undefined) args[0] = Object.assign({}, first, { host: '127.0.0.1' });
  } else if (typeof first === 'number' || /^\\d+$/.test(String(first))) {
    if (typeof args[1] === 'string') args[1] = '127.0.0.1';
    else args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
"""


def write_localhost_preload(directory: str | os.PathLike) -> Path:
    """Write ``localhost-only.js`` into ``directory`` and return its path (for ``NODE_OPTIONS``)."""
    path = Path(directory) / 'localhost-only.js'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOCALHOST_ONLY_JS)
    return path


def loopback_namespace_prefix() -> List[str]:
    """``['unshare', '-n', ...]`` that runs a command with only a loopback interface, or ``[]`` where
    unprivileged network namespaces are unavailable. Listeners inside cannot be reached from outside."""
    unshare, ip = shutil.which('unshare'), shutil.which('ip') or '/usr/sbin/ip'
    if not unshare or not Path(ip).exists():
        return []
    probe = [unshare, '-n', 'sh', '-c', f'{ip} link set lo up']
    if os.geteuid() != 0:
        probe.insert(1, '-r')
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        return []
    return probe[:-1] + [f'{ip} link set lo up && exec "$0" "$@"']
