"""Cell pictures and alpha heatmaps (``bnas-nni plot``, :mod:`bnas_nni.plot`; issue 12, item 5).

The cell pictures are checked through graphviz's own SVG output (one edge per genotype entry,
labelled with its op, Zeroise dashed), the heatmaps through the matplotlib figure's data, the
TensorBoard images by reading the event file back, and the command on a real (tiny) search run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bnas_nni import plot
from bnas_nni.errors import ConfigError, MissingDependencyError
from bnas_nni.genotypes import derive_genotype, load_genotype
from bnas_nni.ops import PRIMITIVES
from bnas_nni.paths import REPO_ROOT

SVG = '{http://www.w3.org/2000/svg}'
needs_dot = pytest.mark.skipif(shutil.which('dot') is None, reason="graphviz's dot is not installed (.ci/setup.sh)")


def _svg_edges(path: Path):
    """(tail, head, label, dashed) of every edge graphviz drew."""
    edges = []
    for g in ET.parse(path).getroot().iter(f'{SVG}g'):
        if g.get('class') != 'edge':
            continue
        tail, head = g.find(f'{SVG}title').text.split('->')
        labels = [t.text for t in g.findall(f'{SVG}text')]
        dashed = any(p.get('stroke-dasharray') for p in g.findall(f'{SVG}path'))
        edges.append((tail, head, labels[0] if labels else None, dashed))
    return edges


def _state(cell: str, index: int) -> str:
    return f'{cell}_' + (('c_{k-2}', 'c_{k-1}')[index] if index < 2 else str(index - 2))


@needs_dot
@pytest.mark.parametrize('name', ['latest_cell_zeroise', 'latest_cell'])
def test_svg_has_one_labelled_edge_per_entry_and_dashed_zeroise(tmp_path, name):
    genotype = load_genotype(name)
    out = plot.plot_genotype(name, tmp_path / 'cells.svg')
    edges = _svg_edges(out)
    for cell in ('normal', 'reduce'):
        drawn = Counter((t, h, label, dashed) for t, h, label, dashed in edges if label is not None
                        and t.startswith(f'{cell}_'))
        wanted = Counter((_state(cell, j), f'{cell}_{i // 2}', op, op == 'zeroise')
                         for i, (op, j) in enumerate(genotype.cell(cell)))
        assert drawn == wanted
        outputs = {t for t, h, label, _ in edges if label is None and h == f'{cell}_c_{{k}}'}
        assert outputs == {_state(cell, s) for s in getattr(genotype, f'{cell}_concat')}
    text = out.read_text()
    assert 'normal cell' in text and 'reduction cell' in text and name in text


@needs_dot
def test_png_and_bad_suffix(tmp_path):
    from PIL import Image

    out = plot.plot_genotype(load_genotype('latest_cell'), tmp_path / 'cells.png')
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.width > 400 and img.height > 200
        assert len(set(img.convert('L').resize((50, 25)).getdata())) > 5
    with pytest.raises(ConfigError, match='.png, .svg or .pdf'):
        plot.plot_genotype('latest_cell', tmp_path / 'cells.jpg')
    assert not (tmp_path / 'cells.jpg').exists()


def test_missing_dot_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))           # no `dot` anywhere
    with pytest.raises(MissingDependencyError, match='apt-get install graphviz'):
        plot.plot_genotype('latest_cell', tmp_path / 'x.png')
    assert not (tmp_path / 'x.png').exists()
    # the search-run helper still writes the heatmap and says why the cells are missing
    said = []
    rng = np.random.default_rng(0)
    alphas = {c: rng.normal(size=(14, 7)) for c in ('normal', 'reduce')}
    out = plot.write_search_pictures(tmp_path / 'run', alphas=alphas, ops=PRIMITIVES, epoch=0,
                                     genotype=load_genotype('latest_cell'), log=said.append)
    assert set(out) == {'alphas'} and out['alphas'].is_file()
    assert len(said) == 1 and 'graphviz' in said[0]


def test_edge_labels_follow_the_alpha_rows():
    assert plot.edge_labels(2) == ['c_{k-2} → 0', 'c_{k-1} → 0', 'c_{k-2} → 1', 'c_{k-1} → 1', '0 → 1']
    assert len(plot.edge_labels(4)) == 14


def test_heatmap_shows_softmax_per_edge_and_outlines_the_derived_cell():
    rng = np.random.default_rng(1)
    alphas = {'normal': rng.normal(size=(14, 7)) * 2, 'reduce': rng.normal(size=(14, 7)) * 2}
    fig = plot.alpha_heatmap_figure(alphas, PRIMITIVES, title='epoch 3')
    axes = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in axes] == ['normal cell', 'reduction cell']
    derived = derive_genotype(alphas['normal'], alphas['reduce'], PRIMITIVES)
    for ax, cell in zip(axes, ('normal', 'reduce')):
        shown = np.asarray(ax.get_images()[0].get_array())
        e = np.exp(alphas[cell] - alphas[cell].max(1, keepdims=True))
        np.testing.assert_allclose(shown, e / e.sum(1, keepdims=True), rtol=1e-12)
        assert [t.get_text() for t in ax.get_xticklabels()] == list(PRIMITIVES)
        assert len(ax.get_yticklabels()) == 14 and ax.get_yticklabels()[0].get_text() == '$c_{k-2}$ → 0'
        assert len(ax.texts) == 14 * 7
        boxes = sorted((round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches)
        labels = plot.edge_labels(4)
        names = ('c_{k-2}', 'c_{k-1}', '0', '1', '2')
        wanted = sorted((labels.index(f'{names[j]} → {k // 2}'), PRIMITIVES.index(op))
                        for k, (op, j) in enumerate(derived.cell(cell)))
        assert boxes == wanted
    with pytest.raises(ConfigError, match='expected \\[edges, 7 ops\\]'):
        plot.alpha_heatmap_figure({'normal': np.zeros((14, 6))}, PRIMITIVES)


@needs_dot
def test_search_pictures_go_to_files_and_tensorboard(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(2)
    cifar, imagenet = load_genotype('latest_cell_zeroise'), load_genotype('latest_cell')
    writer = SummaryWriter(str(tmp_path / 'tb'))
    for epoch in range(2):
        alphas = {c: rng.normal(size=(14, 7)) for c in ('normal', 'reduce')}
        out = plot.write_search_pictures(tmp_path, alphas=alphas, ops=PRIMITIVES, epoch=epoch, genotype=cifar,
                                         imagenet_genotype=imagenet, writer=writer)
    writer.close()
    assert set(out) == {'alphas', 'cell', 'cell_imagenet'}
    assert sorted(p.name for p in (tmp_path / 'alphas').iterdir()) == ['epoch_001.png', 'epoch_002.png']
    events = EventAccumulator(str(tmp_path / 'tb'), size_guidance={'images': 0}).Reload()
    assert set(events.Tags()['images']) == {'alphas', 'cell', 'cell_imagenet'}
    for tag, path in (('alphas', tmp_path / 'alphas' / 'epoch_002.png'), ('cell', tmp_path / 'cell.png'),
                      ('cell_imagenet', tmp_path / 'cell_imagenet.png')):
        images = events.Images(tag)
        assert [i.step for i in images] == [0, 1]
        with Image.open(path) as img:
            assert (images[-1].width, images[-1].height) == img.size


def _bnas_nni(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
    return subprocess.run([sys.executable, '-m', 'bnas_nni.cli', *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_genotype_and_errors(tmp_path):
    out = _bnas_nni('plot', 'latest_cell', '--out', str(tmp_path / 'a.svg'), cwd=tmp_path)
    if shutil.which('dot'):
        assert out.returncode == 0 and (tmp_path / 'a.svg').is_file(), out.stderr
    bad = _bnas_nni('plot', 'no_such_cell', cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown genotype 'no_such_cell'")
    empty = tmp_path / 'empty'
    empty.mkdir()
    bad = _bnas_nni('plot', str(empty), cwd=tmp_path)
    assert bad.returncode == 2 and 'not a search run directory' in bad.stderr


@needs_dot
@pytest.mark.slow
def test_cli_on_a_real_search_run(tmp_path, tiny_search_copy):
    """``bnas-nni plot`` on the shared tiny search run (2 epochs): the cells and every epoch's heatmap."""
    run = tiny_search_copy.run_dir
    shutil.rmtree(run / 'alphas')
    (run / 'cell.png').unlink(missing_ok=True)          # what the search drew; plot must draw them again
    out = _bnas_nni('plot', str(run), '--all-epochs', cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run / 'cell.png').is_file()
    assert sorted(p.name for p in (run / 'alphas').iterdir()) == ['epoch_001.png', 'epoch_002.png']
    history = json.loads((run / 'alpha_history.json').read_text())
    for record in history:          # numbered from 1, as the search log counts epochs
        assert f'wrote {run / "alphas" / "epoch_{:03d}.png".format(record["epoch"] + 1)}' in out.stdout
    one = _bnas_nni('plot', str(run), '--epoch', '1', '--out', str(tmp_path / 'k.svg'),
                    '--alphas-out', str(tmp_path / 'h.svg'), cwd=tmp_path)
    assert one.returncode == 0 and (tmp_path / 'k.svg').is_file() and (tmp_path / 'h.svg').is_file()
    assert '<svg' in (tmp_path / 'h.svg').read_text()[:2000]
    bad = _bnas_nni('plot', str(run), '--epoch', '7', cwd=tmp_path)
    assert bad.returncode == 2 and 'epochs 1..2' in bad.stderr
