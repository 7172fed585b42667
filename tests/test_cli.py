"""The bnas-nni dispatcher: sectioned NNI-strategy presets go through `bnas-nni search` too."""
import pytest

from bnas_nni.cli import main


def test_strategy_preset_through_search(tmp_path, capsys):
    rc = main(['search', '--config', 'experiments/strategy_random_one_shot.yaml', '--run-dir', str(tmp_path / 'run'),
               '--set', 'train.epochs=1', '--set', 'data.train_size=64', '--set', 'data.val_size=64',
               '--set', 'data.image_size=16', '--save', 'rs', '--out', str(tmp_path / 'out')])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'genotype: Genotype(' in out
    from bnas_nni.networks import build_model
    net = build_model({'genotype': str(tmp_path / 'out' / 'rs.yaml'), 'init_channels': 4, 'layers': 3})
    assert net.genotype.num_nodes == 2


@pytest.mark.parametrize('argv, needle', [
    (['search', '--config', 'experiments/strategy_random_one_shot.yaml', '--lamda', '2'], '--lamda: not used by'),
    (['search', '--config', 'experiments/strategy_random_one_shot.yaml', '--resume'], '--resume is not available'),
    (['summary', 'bnas-z'], 'bnas-z'),
])
def test_one_line_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0]
