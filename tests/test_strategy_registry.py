"""One strategy registry: binary-darts and NNI's strategies in one table, and a strategy registered from user
code with one call is usable from `bnas-nni search` and from search trials (what nnictl launches)."""
from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

from bnas_nni.cli import main
from bnas_nni.paths import experiments_dir

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


    register_strategy('scaled-diversity', make, kind='one-shot', runner='driver',
                      description='BinaryDARTS, lamda * scale')
    # the same class declared for NNI's runner: what it can do follows the declaration, not the class
    register_strategy('scaled-diversity-nni', make, kind='one-shot', description='the same, through NasExperiment')
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
    STRATEGIES._items.pop('scaled-diversity-nni', None)


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


def test_user_strategy_resumes_exactly_and_gets_the_gamma_variant(plugin, tmp_path, capsys):
    """A plugin strategy declared with runner='driver' gets --resume and the ImageNet gamma variant."""
    _needs_fashion()
    from bnas_nni.search.run import resolve_search_config, run_search

    run = tmp_path / 'run'
    args = ['--config', QUICK, *TINY, '--epochs', '3', '--set', 'imports=[my_bnas_plugin]',
            '--set', 'strategy=scaled-diversity', '--run-dir', str(run)]
    cfg = resolve_search_config(QUICK, {'epochs': 3, 'train_subset': 128, 'image_size': 8, 'max_val_batches': 1,
                                        'imports': ['my_bnas_plugin'], 'strategy': 'scaled-diversity',
                                        'run_dir': str(run)})

    def stop_in_second_epoch(record, _):          # callbacks run before the epoch's checkpoint is written
        if record['epoch'] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, epoch_callbacks=[stop_in_second_epoch], log=lambda s: None)
    import torch

    assert torch.load(run / 'checkpoint.pt', weights_only=True)['epoch'] == 1
    capsys.readouterr()
    assert main(['search', *args, '--resume']) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert 'resumed from' in out.out + out.err and 'at epoch 1/3' in out.out + out.err   # continued, not restarted
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['epoch'] == 3
    meta = yaml.safe_load((run / 'genotype_imagenet.yaml').read_text())['meta']
    assert meta['gamma'] == 3.0 and meta['gamma_rule'] == 'zeroise'
    # the same class registered for NNI's runner: --resume is refused in one line, before any work
    assert main(['search', '--config', QUICK, '--set', 'imports=[my_bnas_plugin]',
                 '--set', 'strategy=scaled-diversity-nni', '--run-dir', str(tmp_path / 'nni'), '--resume']) == 2
    err = capsys.readouterr().err
    assert "--resume is not available for strategy 'scaled-diversity-nni'" in err and 'Traceback' not in err


def test_driver_runner_is_for_one_shot_strategies_only():
    from bnas_nni.errors import ConfigError
    from bnas_nni.search.strategies import STRATEGIES, get_strategy_spec, register_strategy

    with pytest.raises(ConfigError, match='one-shot strategies only'):
        register_strategy('bad-runner', lambda cfg: None, kind='multi-trial', runner='driver')
    with pytest.raises(ConfigError, match='runner must be one of driver, nni'):
        register_strategy('bad-runner', lambda cfg: None, kind='one-shot', runner='lightning')
    assert 'bad-runner' not in STRATEGIES
    assert get_strategy_spec('binary-darts').resumable and get_strategy_spec('binary-darts').gamma_variant
    assert not get_strategy_spec('darts').resumable and not get_strategy_spec('darts').gamma_variant


def test_user_strategy_runs_as_a_search_trial(plugin, tmp_path):
    """What nnictl launches: the same run_search with the trial reporter (here with a channel that records
    instead of NNI's): parameters as the last config layer, a report per epoch, genotypes in the trial
    folder, the derived cell trained briefly, one final result."""
    _needs_fashion()
    from bnas_nni.search.reporter import SearchTrialReporter
    from bnas_nni.search.run import resolve_search_config, run_search

    class Channel:
        def __init__(self):
            self.intermediates, self.finals = [], []

        def intermediate(self, metric):
            self.intermediates.append(dict(metric))

        def final(self, metric):
            self.finals.append(dict(metric))

    class Reporter(SearchTrialReporter):
        def parameters(self):
            return {'lamda': 0.5, 'final_epochs': 1}

    channel = Channel()
    reporter = Reporter(out_dir=tmp_path / 'trial', channel=channel)
    overrides = {'epochs': 2, 'train_subset': 128, 'image_size': 8, 'max_val_batches': 1,
                 'imports': ['my_bnas_plugin'], 'strategy': 'scaled-diversity', 'final_train_subset': 64,
                 'final_test_subset': 32, **reporter.config_defaults()}
    summary = run_search(resolve_search_config(QUICK, overrides), reporter=reporter, log=lambda s: None)
    import my_bnas_plugin

    assert my_bnas_plugin.BUILT[-1].lamda == pytest.approx(0.25)          # NNI's lamda 0.5, scaled by the plugin
    assert [m['epoch'] for m in channel.intermediates] == [1, 2]
    assert channel.finals == [summary['trial_metric']] and 'derived_acc' in channel.finals[0]
    assert channel.finals[0]['default'] == pytest.approx(max(m['default'] for m in channel.intermediates))
    assert (tmp_path / 'trial' / 'genotype.yaml').is_file() and \
        (tmp_path / 'trial' / 'genotype_imagenet.yaml').is_file()
    saved = yaml.safe_load((tmp_path / 'trial' / 'search' / 'config.yaml').read_text())
    assert saved['strategy'] == 'scaled-diversity' and saved['lamda'] == 0.5
