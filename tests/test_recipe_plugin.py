"""A recipe written by a user in one file, loaded with ``imports:`` and chosen with ``--set recipe=NAME``:
`bnas-nni train` runs its stages and calls its hooks in the documented order, and what its epoch hook
asks for (BN statistics fixed in the second stage) is what the checkpoints hold."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bnas_nni.cli import main
from bnas_nni.data import DEBIAN_FASHION_MNIST
from bnas_nni.paths import experiments_dir

pytestmark = pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, 'train-images-idx3-ubyte.gz').is_file()
                                and not os.environ.get('BNAS_FASHION_MNIST'),
                                reason='Debian dataset-fashion-mnist is not installed')

QUICK = str(experiments_dir() / 'train_quick_fashion.yaml')
TINY = ['--set', 'train_subset=64', '--set', 'val_subset=32', '--set', 'batch_size=32', '--set', 'init_channels=4',
        '--set', 'layers=3', '--set', 'threads=1', '--set', 'progress=never', '--set', 'tensorboard=false',
        '--set', 'epochs=2']

PLUGIN = textwrap.dedent('''
    """A user's recipe: a one-epoch warm-up stage, then a stage that trains with the warm-up's BN statistics
    fixed (an epoch hook asks the loop for it); every hook call is recorded."""
    from bnas_nni.train.recipes import Recipe, Stage, register_recipe

    CALLS = []


    class FrozenBNFinetune(Recipe):
        name = 'frozen-bn-finetune'
        description = 'one warm-up epoch, then epochs with the BN statistics fixed'

        def defaults(self, family):
            return {'drop_path_prob': 0.0}

        def stages(self, cfg):
            return [Stage('warmup', {'epochs': 1}), Stage('finetune', {}, init_from_previous=True)]

        def on_stage_start(self, run):
            CALLS.append(('stage_start', run.stage.name, run.start_epoch, run.epochs))

        def on_epoch_start(self, run, epoch):
            options = super().on_epoch_start(run, epoch)
            CALLS.append(('epoch_start', run.stage.name, epoch))
            if run.stage.name == 'finetune':
                run.log(f'frozen-bn-finetune: epoch {epoch} keeps the BN statistics')
                options = {**options, 'freeze_bn': True}
            return options

        def on_epoch_trained(self, run, epoch, metrics):
            super().on_epoch_trained(run, epoch, metrics)
            CALLS.append(('epoch_trained', run.stage.name, epoch, sorted(metrics)))

        def on_stage_end(self, run, result):
            CALLS.append(('stage_end', run.stage.name, result['epochs_run']))


    register_recipe(FrozenBNFinetune())
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / 'plugins'
    folder.mkdir()
    (folder / 'my_recipe_plugin.py').write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop('my_recipe_plugin', None)
    from bnas_nni.train.recipes import RECIPES

    RECIPES._items.pop('frozen-bn-finetune', None)


def _bn_buffers(state):
    return {k: v for k, v in state.items() if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


def test_user_recipe_runs_from_bnas_nni_train_with_its_hooks(plugin, tmp_path, capsys):
    from bnas_nni.checkpoints import read_checkpoint

    run = tmp_path / 'run'
    args = ['train', '--config', QUICK, *TINY, '--set', 'imports=[my_recipe_plugin]',
            '--set', 'recipe=frozen-bn-finetune', '--run-dir', str(run)]
    assert main(args) == 0, capsys.readouterr().err
    import my_recipe_plugin

    metrics = ['loss', 'n', 'top1', 'top5']
    assert my_recipe_plugin.CALLS == [
        ('stage_start', 'warmup', 0, 1), ('epoch_start', 'warmup', 0), ('epoch_trained', 'warmup', 0, metrics),
        ('stage_end', 'warmup', 1),
        ('stage_start', 'finetune', 0, 2),
        ('epoch_start', 'finetune', 0), ('epoch_trained', 'finetune', 0, metrics),
        ('epoch_start', 'finetune', 1), ('epoch_trained', 'finetune', 1, metrics),
        ('stage_end', 'finetune', 2)]
    warm, fine = read_checkpoint(run / 'warmup'), read_checkpoint(run / 'finetune')
    assert fine['config']['recipe'] == 'frozen-bn-finetune' and fine['config']['imports'] == ['my_recipe_plugin']
    # the hook's effect: the finetune stage kept the warm-up's BN statistics exactly, while its weights trained
    buffers = _bn_buffers(warm['state_dict'])
    assert buffers and all(torch.equal(v, fine['state_dict'][k]) for k, v in buffers.items())
    assert not torch.equal(warm['state_dict']['classifier.weight'], fine['state_dict']['classifier.weight'])
    # ... and the warm-up, which trained without the hook's request, moved its statistics from the initial ones
    assert any(float(v.abs().sum()) > 0 for k, v in buffers.items() if k.endswith('running_mean'))
    log = (run / 'log.txt').read_text()
    assert 'frozen-bn-finetune: epoch 0 keeps the BN statistics' in log and 'epoch 1 keeps' in log
    assert 'recipe frozen-bn-finetune' in log

    # resumed when finished: the stages have nothing left, and the hooks see it
    my_recipe_plugin.CALLS.clear()
    assert main([*args, '--resume']) == 0, capsys.readouterr().err
    assert my_recipe_plugin.CALLS == [('stage_start', 'warmup', 1, 1), ('stage_end', 'warmup', 0),
                                      ('stage_start', 'finetune', 2, 2), ('stage_end', 'finetune', 0)]
