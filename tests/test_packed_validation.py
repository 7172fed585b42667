"""Crafted packed files are refused in one line before any kernel runs, and the kernels check their own
arguments.

Every file of ``packed_fuzz.CASES`` is edited and then signed with a valid checksum (what someone who knows
the format can do), so it is the header validation that must refuse it. Each case once crashed or corrupted the engine
(heap writes out of bounds, SIGFPE), so they all run in worker subprocesses (``packed_fuzz.run_corpus``):
a crash is recorded as a signal instead of killing the test process.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from packed_fuzz import CASES, crafted_file, run_corpus, run_entry_points, tiny_packed_files


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('packed')
    return tiny_packed_files(folder), folder


def _crafted(files, name):
    bases, folder = files
    return crafted_file(bases['cifar'], name, folder)


def test_crafted_files_are_refused_in_one_line_naming_the_field(files):
    bases, _ = files
    paths = {name: _crafted(files, name) for name in CASES}
    results = run_corpus([bases['cifar'], bases['imagenet'], *paths.values()])
    by_file = {r['file']: r for r in results}
    for name in ('cifar', 'imagenet'):   # the untouched files run (batch 1 and 2, every instruction set)
        assert by_file[str(bases[name])]['result'] == 'ok', by_file[str(bases[name])]
    for name, path in paths.items():
        r = by_file[str(path)]
        assert r['result'] == 'refused', (name, r)
        assert '\n' not in r['detail'] and CASES[name][2] in r['detail'], (name, r['detail'])
        assert 're-export' in r['detail'], (name, r['detail'])


def test_unsigned_edits_fail_the_checksum(files, tmp_path):
    from bnas_nni import deploy
    from bnas_nni.errors import CheckpointError

    bases, _ = files
    raw = bytearray(bases['cifar'].read_bytes())
    raw[-3] ^= 0x10                                        # one bit of tensor data
    (tmp_path / 'flipped.bnp').write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match='checksum mismatch.*re-export it with bnas-nni export'):
        deploy.load(tmp_path / 'flipped.bnp')
    text = bases['cifar'].read_bytes()
    edited = text.replace(b'\\"padding\\": 0', b'\\"padding\\": 1', 1)   # same length: still a valid file
    assert edited != text
    (tmp_path / 'edited.bnp').write_bytes(edited)
    with pytest.raises(CheckpointError, match='checksum mismatch'):
        deploy.load(tmp_path / 'edited.bnp')


@pytest.mark.parametrize('case', ['pool-stride-0', 'pad-1-batch1'])
def test_export_check_refuses_a_crafted_file_with_one_line(files, case):
    path = _crafted(files, case)
    proc = subprocess.run([sys.executable, '-m', 'bnas_nni', 'export', '--check', str(path)],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: ') and CASES[case][2] in lines[0], lines
    assert 'Traceback' not in proc.stderr and proc.stdout == ''




def test_engine_entry_points_check_their_own_arguments(files):
    """Past the validation (a future Python path): the C++ entry points raise instead of corrupting memory."""
    bases, _ = files
    proc = run_entry_points(bases['cifar'])
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 12 and all(': RuntimeError: ' in line for line in lines), lines


@pytest.mark.parametrize('batch', [1, 2])
def test_images_without_pixels_give_one_line(files, batch):
    """A RuntimeError of an argument check (a torch op's or a kernel's) ends in one ConfigError line."""
    import torch

    from bnas_nni import deploy
    from bnas_nni.errors import ConfigError

    net = deploy.load(files[0]['cifar'])
    with pytest.raises(ConfigError, match=r'^the packed model cannot run on images of shape \(\d, 3, 0, 0\): [^\n]+$'):
        net(torch.randn(batch, 3, 0, 0))
