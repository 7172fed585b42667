"""One-line errors that name the real problem (issue 12, findings 5 and 7).

``bnas-nni summary FILE.yaml`` used to answer every broken genotype file with "not a model config ...
nor a genotype"; a truncated checkpoint gave a ~400-character line of torch's text and the wrong fix.
"""
from __future__ import annotations

import pytest
import torch

from bnas_nni.checkpoints import load_checkpoint_file
from bnas_nni.cli import main
from bnas_nni.errors import CheckpointError
from bnas_nni.ops import PRIMITIVES

GOOD_REDUCE = 'reduce:\n  - [max_pool_3x3, 0]\n  - [max_pool_3x3, 1]\n'


def _summary_error(capsys, path) -> str:
    assert main(['summary', str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == '' and err.startswith('error: ') and '\n' not in err, err
    assert 'not a model config' not in err
    return err


def test_summary_names_an_unknown_op_and_the_allowed_ones(tmp_path, capsys):
    bad = tmp_path / 'mine.yaml'
    bad.write_text('normal:\n  - [bin_conv_7x7, 0]\n  - [bin_conv_3x3, 1]\n' + GOOD_REDUCE)
    err = _summary_error(capsys, bad)
    assert str(bad) in err and "unknown op 'bin_conv_7x7'" in err and 'normal cell' in err
    assert all(op in err for op in PRIMITIVES)


def test_summary_names_the_line_of_a_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / 'indent.yaml'
    bad.write_text('normal:\n  - [bin_conv_3x3, 0]\n   - [bin_conv_3x3, 1]\n' + GOOD_REDUCE)
    err = _summary_error(capsys, bad)
    assert f'{bad}:3' in err and 'malformed YAML' in err


def test_summary_names_an_entry_without_its_input(tmp_path, capsys):
    bad = tmp_path / 'noinput.yaml'
    bad.write_text('normal:\n  - [bin_conv_3x3, 0]\n  - [bin_conv_3x3]\n' + GOOD_REDUCE)
    err = _summary_error(capsys, bad)
    assert 'normal entry 1' in err and "['bin_conv_3x3']" in err and '[op, input]' in err


def test_summary_names_a_missing_cell_and_a_missing_file(tmp_path, capsys):
    bad = tmp_path / 'noreduce.yaml'
    bad.write_text('normal:\n  - [bin_conv_3x3, 0]\n  - [bin_conv_3x3, 1]\n')
    err = _summary_error(capsys, bad)
    assert '"normal" and "reduce"' in err
    err = _summary_error(capsys, tmp_path / 'nowhere.yaml')
    assert 'genotype file not found' in err and 'nowhere.yaml' in err


def test_summary_of_an_unknown_name_still_lists_what_exists(capsys):
    assert main(['summary', 'bnas-q']) == 2
    err = capsys.readouterr().err
    assert 'not a model config' in err and 'bnas-a' in err and 'latest_cell' in err


def _saved(tmp_path, **kwargs):
    path = tmp_path / 'ckpt.pt'
    torch.save({'state_dict': {'w': torch.randn(64, 64), 'b': torch.randn(64)}, 'epoch': 3}, path, **kwargs)
    return path


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_truncated_checkpoint_is_one_short_line_with_the_right_fix(tmp_path, capsys, legacy):
    path = _saved(tmp_path, **({'_use_new_zipfile_serialization': False} if legacy else {}))
    data = path.read_bytes()
    assert load_checkpoint_file(path)['epoch'] == 3
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    msg = str(info.value)
    assert 'truncated or not a torch checkpoint' in msg and 're-copy it or re-run the job that wrote it' in msg
    assert 're-save' not in msg and 'miniz' not in msg and '\n' not in msg
    assert len(msg.replace(str(path), 'PATH')) < 160          # was ~400 characters of torch's text
    # the command line says the same in one line
    assert main(['eval', '--checkpoint', str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {msg}'


def test_empty_and_foreign_files_are_not_torch_checkpoints(tmp_path):
    for name, content in (('empty.pt', b''), ('notes.pt', b'these are my notes\n' * 20)):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match='truncated or not a torch checkpoint'):
            load_checkpoint_file(path)


class _Custom:
    pass


def test_sound_file_with_foreign_objects_keeps_the_re_save_fix(tmp_path):
    path = tmp_path / 'obj.pt'
    torch.save({'state_dict': {'w': torch.zeros(2)}, 'extra': _Custom()}, path)
    with pytest.raises(CheckpointError, match='re-save only its state_dict') as info:
        load_checkpoint_file(path)
    assert '_Custom' in str(info.value) and 'truncated' not in str(info.value)


def test_summary_takes_class_counts_from_the_dataset_registry(capsys):
    from bnas_nni.data import register_dataset
    from bnas_nni.data.registry import DATASETS
    assert main(['summary', 'bnas-a', '--dataset', 'cifar100']) == 0
    assert '100 classes' in capsys.readouterr().out
    assert main(['summary', 'latest_cell', '--dataset', 'imagenet', '--init-channels', '8', '--layers', '5']) == 0
    assert '1000 classes' in capsys.readouterr().out
    register_dataset('seven-classes', lambda options, split, augment, subset: None, num_classes=7)
    try:
        assert main(['summary', 'bnas-a', '--dataset', 'seven-classes']) == 0
        assert '7 classes' in capsys.readouterr().out
    finally:
        DATASETS._items.pop('seven-classes', None)
    assert main(['summary', 'bnas-a', '--dataset', 'cifar-1000']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and "unknown dataset 'cifar-1000'" in err and 'cifar100' in err
