"""One strategy registry: binary-darts and NNI's strategies in one table, and a strategy registered from user
code with one call is usable from `bnas-nni search` and from search trials (what nnictl launches)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml

from bnas_nni.cli import main
from bnas_nni.paths import REPO_ROOT, experiments_dir

QUICK = str(experiments_dir() / 'search_quick_fashion.yaml')
TINY = ['--epochs', '1', '--set', 'train_subset=128', '--set', 'image_size=8', '--set', 'max_val_batches=1']

PLUGIN = textwrap.dedent('''
    """A user's strategy: BinaryDARTS with a scaled diversity weight, registered with one call."""
    from bnas_nni.search.binary_darts import BinaryDARTS
    from bnas_nni.search.strategies import register_strategy

    BUILT = []


    class ScaledDiversity(BinaryDARTS):
        pass


    def make(cfg, *, scale: float = 0.5):
        strategy = ScaledDiversity(lamda=cfg['lamda'] * scale, tau=cfg['tau'], arc_learning_rate=cfg['arc_lr'],
                                   mixed_cell=cfg['mixed_cell'])
        BUILT.append(strategy)
        return strategy


    register_strategy('scaled-diversity', make, kind='one-shot', description='BinaryDARTS, lamda * scale')
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / 'plugins'
    folder.mkdir()
    (folder / 'my_bnas_plugin.py').write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop('my_bnas_plugin', None)
    from bnas_nni.search.strategies import STRATEGIES

    STRATEGIES._items.pop('scaled-diversity', None)


def _needs_fashion():
    from bnas_nni.data import fashion_mnist_root
    from bnas_nni.errors import DatasetError

    try:
        fashion_mnist_root()
    except DatasetError as exc:
        pytest.skip(str(exc))


def test_user_strategy_runs_from_bnas_nni_search(plugin, tmp_path, capsys):
    _needs_fashion()
    run = tmp_path / 'run'
    rc = main(['search', '--config', QUICK, *TINY, '--set', 'imports=[my_bnas_plugin]',
               '--set', 'strategy=scaled-diversity', '--set', 'strategy_options.scale=0.25', '--run-dir', str(run)])
    assert rc == 0, capsys.readouterr().err
    import my_bnas_plugin

    (strategy,) = my_bnas_plugin.BUILT
    assert type(strategy).__name__ == 'ScaledDiversity' and strategy.lamda == pytest.approx(0.25)
    saved = yaml.safe_load((run / 'config.yaml').read_text())
    assert saved['strategy'] == 'scaled-diversity' and saved['imports'] == ['my_bnas_plugin']
    assert (run / 'checkpoint.pt').is_file() and (run / 'genotype_imagenet.yaml').is_file()   # the driver ran it
    # the registry lists it next to the built-ins; an unknown option is one line
    from bnas_nni.search.strategies import STRATEGIES

    assert {'binary-darts', 'darts', 'tpe', 'scaled-diversity'} <= set(STRATEGIES)
    assert main(['search', '--config', QUICK, '--set', 'imports=[my_bnas_plugin]',
                 '--set', 'strategy=scaled-diversity', '--set', 'strategy_options.bogus=1',
                 '--run-dir', str(tmp_path / 'bad')]) == 2
    assert 'allowed: scale' in capsys.readouterr().err


def test_user_strategy_runs_as_a_search_trial(plugin, tmp_path):
    """The trial entry point nnictl launches (run standalone: it reports to stdout instead of NNI)."""
    _needs_fashion()
    env = {'PYTHONPATH': f'{plugin}:{REPO_ROOT}', 'NNI_OUTPUT_DIR': str(tmp_path / 'trial'), 'OMP_NUM_THREADS': '1',
           'PATH': '/usr/bin:/bin'}
    import os

    env = {**os.environ, **env}
    env.pop('NNI_PLATFORM', None)
    out = subprocess.run([sys.executable, str(REPO_ROOT / 'trainers' / 'search_trial.py'), '--config', QUICK,
                          *TINY[2:], '--set', 'epochs=1', '--set', 'imports=[my_bnas_plugin]',
                          '--set', 'strategy=scaled-diversity', '--final', 'epochs=1', '--final', 'train_subset=64',
                          '--final', 'test_subset=32'], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final result: {'default':" in out.stdout and 'derived_acc' in out.stdout
    assert (tmp_path / 'trial' / 'genotype.yaml').is_file()
    saved = yaml.safe_load((tmp_path / 'trial' / 'search' / 'config.yaml').read_text())
    assert saved['strategy'] == 'scaled-diversity'
