"""Progress bars and log lines on one terminal (issue 12, finding 6), checked on a real terminal: the
program runs inside a private tmux server and the test reads what tmux shows on screen.

A tqdm bar redraws its line in place; a log line printed by a plain ``StreamHandler`` lands in the
middle of it. With :mod:`bnas_nni.console` every log line stands alone on its line and the bars are
gone when they finish.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from harness import kill_tree

from bnas_nni.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which('tmux') is None, reason='tmux is not installed (.ci/setup.sh)')

CHILD = textwrap.dedent('''
    import logging, sys, time
    mode = sys.argv[1]
    fmt = logging.Formatter('LOG %(message)s')
    if mode == 'console':
        from bnas_nni.console import ConsoleHandler, progress
        handler = ConsoleHandler()
        bar = lambda n, desc: progress(range(n), desc=desc, enabled=True)
    else:   # what the trainers did before: stdout handler, tqdm on stderr
        from tqdm import tqdm
        handler = logging.StreamHandler(sys.stdout)
        bar = lambda n, desc: tqdm(range(n), desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    handler.setFormatter(fmt)
    logger = logging.getLogger('demo')
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for epoch in range(2):
        for step in bar(24, f'train {epoch}'):
            time.sleep(0.01)
            if step % 6 == 0:
                logger.info(f'train {epoch} step {step:03d} loss 2.302585')
        logger.info(f'epoch {epoch} done, valid_acc 10.000000')
''')
EXPECTED = [line for e in range(2) for line in [f'LOG train {e} step {s:03d} loss 2.302585' for s in range(0, 24, 6)]
            + [f'LOG epoch {e} done, valid_acc 10.000000']]


def _screen(command: list, tmp_path: Path, width: int = 110, timeout: float = 180) -> list:
    """Run ``command`` in a fresh tmux server of its own and return the lines it left on the screen
    (scrollback included, wrapped lines joined), once it has finished."""
    sock = tmp_path / 'tmux.sock'
    tmux = ['tmux', '-S', str(sock), '-f', os.devnull]
    env = dict(os.environ, TERM='xterm-256color',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
    env.pop('TMUX', None)
    done = tmp_path / 'done'
    shell = ' '.join(f"'{c}'" for c in command) + f'; touch {done}; sleep 600'
    subprocess.run([*tmux, 'new-session', '-d', '-x', str(width), '-y', '50', shell], env=env, check=True)
    server = subprocess.run([*tmux, 'display-message', '-p', '#{pid}'], capture_output=True, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not done.exists():
            assert time.monotonic() < deadline, 'the program in tmux did not finish'
            time.sleep(0.2)
        time.sleep(0.3)
        out = subprocess.run([*tmux, 'capture-pane', '-p', '-J', '-S', '-', '-E', '-'], capture_output=True, text=True,
                             env=env, check=True).stdout
    finally:
        subprocess.run([*tmux, 'kill-server'], env=env, capture_output=True)
        pid = server.stdout.strip()
        if pid.isdigit():
            kill_tree(int(pid))                  # the server and the panes' shells (each in a session of its own)
    return [line.rstrip() for line in out.splitlines()]


def _run_child(mode: str, tmp_path: Path) -> list:
    script = tmp_path / 'child.py'
    script.write_text(CHILD)
    return _screen([sys.executable, str(script), mode], tmp_path)


def test_console_log_lines_stand_alone_above_the_bar(tmp_path):
    lines = _run_child('console', tmp_path)
    logged = [line for line in lines if 'LOG ' in line]
    assert logged == EXPECTED, '\n'.join(lines)
    assert not any('%|' in line for line in lines), '\n'.join(lines)          # finished bars are cleared


def test_plain_stream_handler_is_cut_by_the_bar(tmp_path):
    """The old set-up, for contrast: the same program leaves log lines glued to bar fragments, which is
    what the test above would catch."""
    lines = _run_child('plain', tmp_path)
    logged = [line for line in lines if 'LOG ' in line]
    glued = [line for line in logged if not line.startswith('LOG ')]
    assert glued and all('%|' in line.split('LOG ')[0] for line in glued), '\n'.join(lines)


@pytest.mark.slow
def test_bnas_nni_train_progress_and_log_share_the_terminal(tmp_path, needs_fashion):
    lines = _screen([sys.executable, '-m', 'bnas_nni.cli', 'train', '--config',
                     str(REPO_ROOT / 'experiments' / 'train_quick_fashion.yaml'), '--epochs', '1',
                     '--train-subset', '384', '--val-subset', '128', '--batch-size', '32', '--init-channels', '4',
                     '--layers', '3', '--threads', '1', '--report-freq', '3', '--run-dir', str(tmp_path / 'run'),
                     '--set', 'progress=always', '--set', 'tensorboard=false'], tmp_path)
    stamp = re.compile(r'\d\d/\d\d \d\d:\d\d:\d\d [AP]M ')
    logged = [line for line in lines if stamp.search(line)]
    assert any(' train 003 ' in line for line in logged), '\n'.join(lines)
    assert all(stamp.match(line) for line in logged), '\n'.join(lines)
    assert not any('%|' in line for line in lines), '\n'.join(lines)
