"""The bnas-nni dispatcher: every strategy preset goes through `bnas-nni search`, with the same flat keys."""
import pytest

from bnas_nni.cli import main


def test_strategy_preset_through_search(tmp_path, capsys):
    rc = main(['search', '--config', 'experiments/strategy_random_one_shot.yaml', '--run-dir', str(tmp_path / 'run'),
               '--set', 'epochs=1', '--set', 'train_subset=128', '--set', 'image_size=16',
               '--set', 'derived_epochs=0', '--save', 'rs', '--out', str(tmp_path / 'out')])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'genotype (CIFAR):    Genotype(rs:' in out
    from bnas_nni.networks import build_model
    net = build_model({'genotype': str(tmp_path / 'out' / 'rs.yaml'), 'init_channels': 4, 'layers': 3})
    assert net.genotype.num_nodes == 2


@pytest.mark.parametrize('argv, needle', [
    (['search', '--config', 'experiments/strategy_random_one_shot.yaml', '--set', 'strategy_options.temperature=1'],
     'does not take strategy_options temperature'),
    (['search', '--config', 'experiments/strategy_random_one_shot.yaml', '--resume'], '--resume is not available'),
    (['summary', 'bnas-z'], 'bnas-z'),
])
def test_one_line_errors(argv, needle, capsys, tmp_path):
    if argv[0] == 'search':
        argv = argv + ['--run-dir', str(tmp_path / 'run')]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0]
