"""One configuration system: typed defaults <- YAML <- command line <- NNI parameters, explicit null,
unknown keys, a dataset path that follows its dataset, and the same key names for every command."""
from __future__ import annotations

import pytest
import yaml

from bnas_nni.cli import main
from bnas_nni.config import SEARCH, TRAIN, coerce, resolve
from bnas_nni.errors import ConfigError
from bnas_nni.io import parse_set_items
from bnas_nni.paths import experiments_dir

PAPER = experiments_dir() / 'search_cifar10_paper.yaml'
QUICK = experiments_dir() / 'search_quick_fashion.yaml'


def test_layers_in_order_and_types():
    cfg = resolve(SEARCH, QUICK, {'epochs': '3', 'lr': '1e-2'}, {'seed': 7})
    assert (cfg['epochs'], cfg['lr'], cfg['seed'], cfg['space']) == (3, 0.01, 7, 'bnas-tiny')
    assert cfg['train_subset'] == 2048 and cfg['lamda'] == 1.0           # from the YAML file
    assert resolve(SEARCH)['seed'] == 2 and resolve(SEARCH)['mixed_cell'] == 'fast'   # section/command defaults
    assert coerce('true', bool, 'k', 's') is True and coerce(4.0, int, 'k', 's') == 4
    for bad, hint in (('x', int), (2.5, int), ('inf', float), ('maybe', bool)):
        with pytest.raises(ConfigError, match='is not a valid'):
            coerce(bad, hint, 'k', 'src')


def test_explicit_null_unsets_a_key():
    items = parse_set_items(['train_subset=null', 'data=~', 'image_size=None'])
    assert items['train_subset'] is None and items['data'] is None       # YAML null and ~; 'None' is read below
    cfg = resolve(SEARCH, QUICK, items)
    assert cfg['train_subset'] is None and cfg['image_size'] is None      # the preset's 2048 and 16 are gone
    cfg = resolve(SEARCH, QUICK, {'lr': None})
    assert cfg['lr'] == SEARCH.base['lr']                                 # a non-optional key goes back to its default
    # through the command line: the saved config of the run shows it
    assert resolve(TRAIN, experiments_dir() / 'train_quick_fashion.yaml', {'val_subset': None},
                   defaults_hook=None)['val_subset'] is None


def test_dataset_path_follows_the_dataset():
    cfg = resolve(SEARCH, PAPER, {'dataset': 'fashion-mnist'})
    assert cfg['dataset'] == 'fashion-mnist' and cfg['data'] is None
    custom = resolve(SEARCH, PAPER, {'dataset': 'fashion-mnist', 'data': '/my/fashion'})
    assert custom['data'] == '/my/fashion'                                # unless set with it
    same = resolve(SEARCH, None, {'data': 'd/c10'}, {'dataset': 'cifar10'})
    assert same['data'] == 'd/c10'                                        # the same dataset keeps its path


def test_unknown_keys_empty_files_and_lists_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve(SEARCH, None, {'learning_rat': 1})
    assert "unknown config key 'learning_rat'" in str(err.value) and 'lr, lr_min' in str(err.value)
    empty = tmp_path / 'empty.yaml'
    empty.write_text('# nothing yet\n')
    with pytest.raises(ConfigError, match='is empty'):
        resolve(SEARCH, empty)
    listing = tmp_path / 'list.yaml'
    listing.write_text('- epochs: 2\n')
    with pytest.raises(ConfigError, match='must be a mapping of keys to values'):
        resolve(SEARCH, listing)
    with pytest.raises(ConfigError, match='choose one of'):
        resolve(SEARCH, None, {'mixed_cell': 'slow'})
    with pytest.raises(ConfigError, match='is not a mapping'):
        resolve(SEARCH, None, {'lr.x': 1})


def test_dotted_keys_aliases_and_plugins(tmp_path, monkeypatch):
    cfg = resolve(SEARCH, None, {'strategy': 'gumbel-darts', 'strategy_options.temperature': [1.0, 0.5]})
    assert cfg['strategy_options'] == {'temperature': [1.0, 0.5]}
    assert resolve(TRAIN, None, {'learning_rate': 0.1, 'C': 8})['lr'] == 0.1     # official spellings
    assert resolve(SEARCH, None, {'max_eval_batches': 3})['max_val_batches'] == 3
    with pytest.raises(ConfigError, match="cannot import 'no_such_plugin'"):
        resolve(SEARCH, None, {'imports': ['no_such_plugin']})


def test_same_key_names_across_commands():
    shared = {'seed', 'epochs', 'lr', 'lr_min', 'momentum', 'weight_decay', 'batch_size', 'dataset', 'data',
              'train_subset', 'image_size', 'threads', 'channels_last', 'max_train_batches', 'max_val_batches',
              'optimizer', 'progress', 'tensorboard', 'run_dir', 'imports'}
    assert shared <= set(SEARCH.keys()) and shared <= set(TRAIN.keys())


def test_every_preset_resolves_to_what_it_says():
    """Each shipped preset resolves under the schema its command uses, every key it writes reaches the
    resolved config with the file's value (none dropped, renamed or overridden by a default), and what it
    names exists: the strategy and search space of a search preset, the recipe, model and genotype of a
    training preset."""
    from bnas_nni.genotypes import load_genotype
    from bnas_nni.search.run import resolve_search_config
    from bnas_nni.search.strategies import build_strategy
    from bnas_nni.space import load_space_config
    from bnas_nni.study.config import load_study_config
    from bnas_nni.train.model import resolve_model_config
    from bnas_nni.train.recipes import get_recipe
    from bnas_nni.train.runner import resolve_train_config

    presets = sorted(experiments_dir().glob('*.yaml'))
    assert {p.name.split('_')[0] for p in presets} == {'search', 'strategy', 'study', 'train'}
    for path in presets:
        written = yaml.safe_load(path.read_text())
        if path.name.startswith('study_'):
            study = load_study_config(path)
            assert study.to_dict()['dataset'] == written['dataset'] and study.name == written['name'], path.name
            continue
        training = path.name.startswith('train_')
        cfg = (resolve_train_config if training else resolve_search_config)(path)
        for key, value in written.items():
            assert key in cfg and cfg[key] == value, (path.name, key, value, cfg.get(key))
        if training:
            assert get_recipe(cfg['recipe']) is not None
            model = resolve_model_config(cfg)
            assert load_genotype(model['genotype']).num_nodes >= 2, path.name
        else:
            assert cfg['name'] == written.get('name', path.stem)
            assert build_strategy(cfg) is not None
            assert load_space_config(cfg['space'])['num_nodes'] >= 2, path.name


def test_cli_set_null_reaches_the_saved_config(tmp_path):
    run = tmp_path / 'run'
    rc = main(['search', '--config', str(QUICK), '--epochs', '1', '--set', 'train_subset=128',
               '--set', 'image_size=null', '--set', 'image_size=8', '--set', 'max_val_batches=1',
               '--set', 'description=null', '--run-dir', str(run)])
    assert rc == 0
    saved = yaml.safe_load((run / 'config.yaml').read_text())
    assert saved['image_size'] == 8 and saved['description'] is None     # the later --set wins; null unsets


@pytest.mark.slow
def test_paper_preset_runs_on_fashion_mnist_with_only_the_dataset_changed(tmp_path, capsys, needs_fashion):
    """The paper's preset (C=16, 8 cells, 60,000 images) with --set dataset=fashion-mnist: the CIFAR path
    of the preset does not get in the way. Only run-time caps are added so the test takes seconds."""
    rc = main(['search', '--config', str(PAPER), '--set', 'dataset=fashion-mnist', '--epochs', '1',
               '--set', 'max_train_batches=1', '--set', 'max_val_batches=1', '--batch-size', '8',
               '--set', 'workers=0', '--run-dir', str(tmp_path / 'run')])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert 'fashion-mnist (30000 weight / 30000 architecture images), space bnas' in captured.out
    saved = yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())
    assert saved['data'] is None and saved['mixed_cell'] == 'fast' and saved['channels_last'] is True


def test_bn_epoch_options_are_checked():
    from bnas_nni.train.runner import resolve_train_config

    assert resolve_train_config(None, {'bn_renorm_epochs': 2})['bn_renorm_epochs'] == 2
    with pytest.raises(ConfigError, match='bn_renorm_epochs must be >= 0'):
        resolve_train_config(None, {'bn_renorm_epochs': -1})
    with pytest.raises(ConfigError, match='exclude each other: set one of them to 0'):
        resolve_train_config(None, {'bn_renorm_epochs': 1, 'bn_freeze_epochs': 1})
    assert resolve_train_config(None, {})['bn_recalibration_mode'] == 'eval'
    assert resolve_train_config(None, {'bn_recalibration_mode': 'train'})['bn_recalibration_mode'] == 'train'
    with pytest.raises(ConfigError, match="bn_recalibration_mode='batch'; choose one of eval, train"):
        resolve_train_config(None, {'bn_recalibration_mode': 'batch'})


# --------------------------------------------------------------------------- typed configs, declared once

def test_resolved_configs_are_typed_objects_with_a_flat_mapping_view():
    from bnas_nni.config import SearchConfig, TrainConfig

    cfg = resolve(SEARCH, QUICK, {'epochs': '3'})
    assert isinstance(cfg, SearchConfig) and cfg.epochs == 3 and cfg['epochs'] == 3 and cfg.space == 'bnas-tiny'
    assert dict(cfg)['lr'] == cfg.lr and set(cfg) == set(SEARCH.keys()) and len(cfg) == len(SEARCH.keys())
    cfg.lr = '1e-2'                                    # assignment coerces like every other layer
    assert cfg.lr == 0.01 and isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match='is not a valid integer'):
        cfg.epochs = 2.5
    with pytest.raises(AttributeError, match='no key'):
        cfg.learning_rat = 1
    changed = cfg.replace(seed='5')
    assert changed.seed == 5 and cfg.seed == 2 and type(changed) is SearchConfig
    assert isinstance(resolve(TRAIN), TrainConfig) and resolve(TRAIN).workers == 2   # command defaults
    import pickle

    assert pickle.loads(pickle.dumps(cfg)) == cfg and cfg == cfg.as_dict()


def test_every_key_is_declared_once_with_help():
    from bnas_nni.config import SCHEMAS

    for schema in SCHEMAS.values():
        missing = [k for k in schema.keys() if not schema.help[k].strip()]
        assert not missing, f'{schema.name}: keys without help text: {missing}'
        declared = [k for keys in schema.sections.values() for k in keys]
        assert sorted(declared) == schema.keys()                   # each key in exactly one section


def test_a_key_declared_by_two_sections_is_refused():
    from dataclasses import dataclass

    from bnas_nni.config import ConfigBase, Data, knob

    @dataclass
    class Other:
        """A section that declares batch_size again."""
        batch_size: int = knob(8, 'again')

    @dataclass(eq=False)
    class Twice(ConfigBase, Data, Other):
        pass

    from bnas_nni.config import Schema

    with pytest.raises(ValueError, match="key 'batch_size' is declared by Data and Other"):
        Schema('twice', Twice)


def test_reference_and_flag_help_come_from_the_declaration(capsys):
    from bnas_nni.config import SCHEMAS

    for name, schema in SCHEMAS.items():
        assert main(['config', name]) == 0
        text = capsys.readouterr().out
        for key in schema.keys():
            assert f'| `{key}` |' in text, key
        assert schema.help['lr'].replace('|', '\\|') in text
    with pytest.raises(SystemExit):
        main(['train', '--help'])
    help_text = ' '.join(capsys.readouterr().out.split())
    assert ' '.join(TRAIN.help['drop_path_prob'].split()) in help_text
    with pytest.raises(SystemExit):
        main(['search', '--help'])
    assert ' '.join(SEARCH.help['lamda'].split()) in ' '.join(capsys.readouterr().out.split())
