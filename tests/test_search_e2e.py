"""``bnas-nni search`` end to end on real Fashion-MNIST: a genotype file that builds and trains."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from bnas_nni.cli import main  # noqa: E402
from bnas_nni.genotypes import load_genotype  # noqa: E402
from bnas_nni.networks import build_model  # noqa: E402
from bnas_nni.quant import attach_latent_constraint, binary_convs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / 'experiments' / 'search_quick_fashion.yaml'


pytestmark = pytest.mark.usefixtures('needs_fashion')


def _train_a_few_steps(genotype_path: Path) -> None:
    from bnas_nni.data import FashionMNIST32

    model = build_model({'genotype': str(genotype_path), 'init_channels': 8, 'layers': 3, 'num_classes': 10})
    ds = FashionMNIST32(train=True, subset=96, augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    attach_latent_constraint(opt, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    model.train()
    for x, y in loader:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(m.weight.abs().max() <= 1.0 for m in binary_convs(model))


def test_quick_search_cli_writes_genotypes_that_build_and_train(tiny_search_copy, tmp_path, capsys):
    """The shared tiny search (``bnas-nni search`` on the quick preset, 2 epochs, 256 images; conftest's
    ``tiny_search_run``): its genotypes, run directory and pictures; a second run refuses to overwrite a
    file it did not write; the finished run resumes as a no-op; the genotype builds and trains."""
    run_dir, out, printed = tiny_search_copy.run_dir, tiny_search_copy.out, tiny_search_copy.stdout
    assert 'genotype (CIFAR):' in printed and 'Genotype(tiny:' in printed
    cifar, imagenet = load_genotype(out / 'tiny.yaml'), load_genotype(out / 'tiny_imagenet.yaml')
    assert cifar.name == 'tiny' and imagenet.name == 'tiny_imagenet' and cifar.num_nodes == 2
    meta = yaml.safe_load((out / 'tiny.yaml').read_text())['meta']
    assert meta['source'] == 'bnas-nni search' and meta['epoch'] in (1, 2)
    # run directory: resolved config, alpha history per epoch, TensorBoard, checkpoint, genotypes
    saved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert saved['epochs'] == 2 and saved['train_subset'] == 256 and saved['space'] == 'bnas-tiny'
    import json

    history = json.loads((run_dir / 'alpha_history.json').read_text())
    assert [h['epoch'] for h in history] == [0, 1]
    assert len(history[0]['alphas']['normal']) == 5 and len(history[0]['alphas']['normal'][0]) == 7
    assert any(p.name.startswith('events.out.tfevents') for p in (run_dir / 'tb').iterdir())
    assert (run_dir / 'checkpoint.pt').is_file()
    assert load_genotype(run_dir / 'genotype.yaml') == cifar
    # metrics.csv like training, and pictures: the kept cells and a per-epoch alpha heatmap, as PNG and in TensorBoard
    rows = (run_dir / 'metrics.csv').read_text().splitlines()
    assert rows[0].startswith('epoch,lr,train_loss,train_acc') and [r.split(',')[0] for r in rows[1:]] == ['0', '1']
    assert (run_dir / 'alphas' / 'epoch_001.png').is_file() and (run_dir / 'alphas' / 'epoch_002.png').is_file()
    import shutil

    if shutil.which('dot'):
        assert (run_dir / 'cell.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / 'tb'), size_guidance={'images': 0})
    events.Reload()
    assert 'alphas' in events.Tags()['images'] and len(events.Images('alphas')) == 2
    # never into Python sources, and a second run may replace its own files but not others'
    assert not list(out.glob('*.py'))
    (out / 'handmade.yaml').write_text((out / 'tiny.yaml').read_text().split('meta:')[0])
    rc = main(['search', '--config', str(PRESET), '--epochs', '1', '--set', 'train_subset=64', '--save', 'handmade',
               '--out', str(out), '--run-dir', str(tmp_path / 'run2')])
    assert rc == 2 and 'not written by bnas-nni search' in capsys.readouterr().err
    # a finished run resumes as a no-op with the same genotype
    assert main(['search', '--config', str(PRESET), '--epochs', '2', '--set', 'train_subset=256',
                 '--run-dir', str(run_dir), '--resume']) == 0
    assert load_genotype(run_dir / 'genotype.yaml') == cifar
    _train_a_few_steps(out / 'tiny.yaml')


@pytest.mark.slow
def test_quick_preset_as_shipped(tmp_path, capsys):
    """The README's first half exactly: the shipped quick preset, timed."""
    t0 = time.time()
    rc = main(['search', '--config', str(PRESET), '--save', 'quick', '--out', str(tmp_path / 'g'),
               '--run-dir', str(tmp_path / 'run')])
    seconds = time.time() - t0
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert 'kept epoch' in printed
    assert seconds < 300, f'quick preset took {seconds:.0f}s'
    _train_a_few_steps(tmp_path / 'g' / 'quick.yaml')


def test_cli_runs_nni_darts_on_the_same_space(tmp_path, nni_home, capsys):
    """``--strategy darts``: NNI's own DARTS through NasExperiment on the BNAS space, genotype written."""
    rc = main(['search', '--config', str(PRESET), '--strategy', 'darts', '--epochs', '1', '--set', 'train_subset=96',
               '--set', 'batch_size=32', '--run-dir', str(tmp_path / 'run')])
    assert rc == 0, capsys.readouterr().err
    genotype = load_genotype(tmp_path / 'run' / 'genotype.yaml')
    assert genotype.num_nodes == 2
    assert (tmp_path / 'run' / 'nni-experiments').is_dir()
    # NNI's manifest: HOME in the run dir
    assert (tmp_path / 'run' / 'home' / 'nni-experiments' / '.experiment').is_file()
