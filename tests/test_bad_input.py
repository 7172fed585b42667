"""Bad input ends in one ``error:`` line, exit status 2, before any work starts and without leaving a run
directory behind; inputs that used to be accepted silently (an empty concat, ``'0'`` as an index, a run
name that climbs out of runs/, ``--resume`` without a checkpoint) are refused the same way."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from bnas_nni.cli import main
from bnas_nni.errors import CheckpointError, ConfigError
from bnas_nni.genotypes import Genotype, load_genotype
from bnas_nni.paths import experiments_dir, genotypes_dir

QUICK_SEARCH = str(experiments_dir() / 'search_quick_fashion.yaml')
QUICK_TRAIN = str(experiments_dir() / 'train_quick_fashion.yaml')
TINY_TRAIN = ['--epochs', '1', '--train-subset', '64', '--val-subset', '32', '--threads', '1',
              '--max-train-batches', '1', '--init-channels', '4', '--layers', '3']
TINY_SEARCH = ['--epochs', '1', '--set', 'train_subset=64', '--set', 'image_size=8', '--set', 'threads=1']


def _genotype_file(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((genotypes_dir() / 'latest_cell_zeroise.yaml').read_text())
    data.pop('meta', None)
    for key, value in changes.items():
        if key == 'first_input':
            data['normal'][0][1] = value
        else:
            data[key] = value
    path = tmp_path / 'cell.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


def _refused(capsys, argv, *needles) -> str:
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith('error: '), (rc, err)
    for needle in needles:
        assert needle in err[0], err[0]
    assert len(err[0]) < 300, err[0]
    return err[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The current folder of the command: nothing may appear in its runs/."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / 'runs').exists(), sorted(os.listdir(tmp_path / 'runs'))


# --------------------------------------------------------------------------- tracebacks before, one line now


def test_a_concat_index_past_the_last_node(workdir, capsys):
    cell = _genotype_file(workdir, normal_concat=[2, 3, 4, 9])
    _refused(capsys, ['train', '--config', QUICK_TRAIN, '--arch', str(cell), *TINY_TRAIN], 'names state 9',
             'states 0..5')


def test_absurdly_nested_and_non_utf8_yaml(workdir, capsys):
    deep = workdir / 'deep.yaml'
    deep.write_text('epochs: ' + '[' * 5_000 + ']' * 5_000 + '\n')      # the recursion stops at ~1000
    _refused(capsys, ['search', '--config', str(deep)], str(deep), 'nested too deeply')
    latin = workdir / 'latin.yaml'
    latin.write_bytes(b'epochs: 1\ndescription: caf\xe9\n')
    _refused(capsys, ['search', '--config', str(latin)], f'{latin}:2:', 'byte 0xe9 is not UTF-8',
             'save the file as UTF-8')


@pytest.mark.parametrize('override, needle', [('init_channels=-8', 'init_channels must be >= 1, got -8'),
                                              ('layers=0', 'layers must be >= 1, got 0'),
                                              ('val_subset=-1', 'val_subset must be >= 1, got -1')])
def test_model_and_data_sizes_out_of_their_domain(workdir, capsys, override, needle):
    _refused(capsys, ['train', '--config', QUICK_TRAIN, *TINY_TRAIN, '--set', override], needle)


def test_a_search_space_with_negative_channels(workdir, capsys):
    _refused(capsys, ['search', '--config', QUICK_SEARCH, *TINY_SEARCH, '--set', 'init_channels=-8'],
             'init_channels must be >= 2, got -8')


def test_names_are_plain_names_of_a_sane_length(workdir, capsys):
    _refused(capsys, ['search', '--config', QUICK_SEARCH, *TINY_SEARCH, '--save', 'a' * 300], 'at most 128 characters')
    _refused(capsys, ['train', '--config', QUICK_TRAIN, *TINY_TRAIN, '--name', '../../../tmp/escaped'],
             "name '../../../tmp/escaped'", 'plain name')
    assert not (workdir.parent.parent / 'tmp' / 'escaped').exists()
    _refused(capsys, ['search', '--config', QUICK_SEARCH, *TINY_SEARCH, '--run-dir', 'x' * 300], 'at most 200')


def test_a_file_where_a_folder_is_wanted_is_refused_before_any_work(workdir, capsys):
    afile = workdir / 'notes.txt'
    afile.write_text('mine\n')
    _refused(capsys, ['search', '--config', QUICK_SEARCH, *TINY_SEARCH, '--run-dir', str(afile)],
             f'run directory {afile} exists and is not a directory', '--run-dir')
    _refused(capsys, ['train', '--config', QUICK_TRAIN, *TINY_TRAIN, '--run-dir', str(afile / 'sub')],
             'which is a file', '--run-dir')
    run = workdir / 'run'
    _refused(capsys, ['search', '--config', QUICK_SEARCH, *TINY_SEARCH, '--save', 'x', '--out', str(afile),
                      '--run-dir', str(run)], f'genotype folder {afile} exists and is not a directory', '--out')
    assert not run.exists() and afile.read_text() == 'mine\n'      # refused before the search started
    # export: --out a folder, or below a file, is refused before the checkpoint is even read
    _refused(capsys, ['export', '--checkpoint', str(workdir / 'no-such-run'), '--out', str(workdir)],
             f'--out {workdir} is a directory', 'net.bnp')
    _refused(capsys, ['export', '--checkpoint', str(workdir / 'no-such-run'), '--out', str(afile / 'net.bnp')],
             f'the folder of --out {afile} exists and is not a directory', '--out')


def test_train_resume_without_a_checkpoint_names_the_path(workdir, capsys):
    run = workdir / 'typo'
    _refused(capsys, ['train', '--config', QUICK_TRAIN, *TINY_TRAIN, '--run-dir', str(run), '--resume'],
             f'nothing to resume: {run / "checkpoint.pt"} does not exist')
    assert not run.exists()


@pytest.mark.usefixtures('needs_fashion')
@pytest.mark.parametrize('damage', ['empty labels', 'swapped'])
def test_damaged_fashion_mnist_files(workdir, capsys, damage):
    from bnas_nni.data import fashion_mnist_root

    source = fashion_mnist_root()
    folder = workdir / 'fashion'
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).symlink_to(f)
    images, labels = folder / 'train-images-idx3-ubyte.gz', folder / 'train-labels-idx1-ubyte.gz'
    images.unlink()
    labels.unlink()
    if damage == 'empty labels':
        shutil.copy(source / images.name, images)
        labels.write_bytes(b'')
        needle = f'{labels} is empty'
    else:
        shutil.copy(source / labels.name, images)
        shutil.copy(source / images.name, labels)
        needle = 'swapped'
    run = workdir / 'run'
    _refused(capsys, ['train', '--config', QUICK_TRAIN, *TINY_TRAIN, '--data', str(folder), '--run-dir', str(run)],
             needle)
    assert not run.exists()


# --------------------------------------------------------------------------- accepted silently before


@pytest.mark.parametrize('changes, needle', [({'normal_concat': []}, 'normal_concat is []'),
                                             ({'reduce_concat': ['2', 3]}, 'reduce_concat'),
                                             ({'first_input': '0'}, "is ['zeroise', '0']"),
                                             ({'first_input': 1.5}, "is ['zeroise', 1.5]"),
                                             ({'first_input': True}, 'integer input')])
def test_genotypes_that_used_to_load(tmp_path, capsys, changes, needle):
    path = _genotype_file(tmp_path, **changes)
    with pytest.raises(ConfigError, match='integer|concatenate'):
        load_genotype(path)
    _refused(capsys, ['summary', str(path)], str(path), needle)


def test_valid_genotypes_still_load_and_an_explicit_concat_is_kept(tmp_path):
    for name in ('latest_cell', 'latest_cell_zeroise'):
        g = load_genotype(name)
        assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
    g = load_genotype(_genotype_file(tmp_path, normal_concat=[4, 5]))
    assert g.normal_concat == (4, 5) and g.reduce_concat == (2, 3, 4, 5)
    with pytest.raises(ConfigError, match='names state 6'):
        Genotype(normal=g.normal, reduce=g.reduce, normal_concat=(2, 6))


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_a_pickle_of_a_foreign_callable_is_refused_naming_it_and_the_fix(tmp_path, monkeypatch):
    from bnas_nni.checkpoints import load_checkpoint_file

    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'ckpt.pt'
    torch.save({'state_dict': {'w': torch.zeros(2)}, 'extra': _Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    msg = str(info.value)
    assert 'it pickles posix.system' in msg and 're-save only its state_dict' in msg, msg
    assert msg.endswith('(and plain types)') and '\n' not in msg and 'Weights only' not in msg
    assert not (tmp_path / 'pwned').exists()


def test_a_config_file_name_that_is_no_plain_name_still_names_the_run(tmp_path):
    from bnas_nni.config import SEARCH, resolve
    from bnas_nni.search.run import resolve_search_config

    odd = tmp_path / 'my search (v2).yaml'
    shutil.copy(QUICK_SEARCH, odd)
    cfg = resolve_search_config(odd)
    assert cfg['name'] == 'my_search__v2_'
    assert resolve(SEARCH, base=cfg)['name'] == cfg['name']        # what --resume re-reads from config.yaml


def test_an_output_file_below_a_file_or_onto_a_directory_is_one_line(tmp_path):
    from bnas_nni.io import atomic_write_text

    afile = tmp_path / 'notes.txt'
    afile.write_text('mine\n')
    with pytest.raises(ConfigError, match=f'below {afile}, which is a file; choose another output path'):
        atomic_write_text(afile / 'sub' / 'model.bnp', 'x')
    with pytest.raises(ConfigError, match=f'^{tmp_path} is a directory; name a file to write$'):
        atomic_write_text(tmp_path, 'x')
    assert afile.read_text() == 'mine\n' and sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
