"""``bnas-nni study`` end to end on real Fashion-MNIST images, at toy size: two arms (BinaryDARTS with one
search seed, one random cell), two training seeds, one-epoch trainings of a tiny network.

The study runs locally in a child process that is killed -9 after its first finished training and then
continued: nothing finished is redone. The same trainings then run as the trials of one NNI experiment
(manager on 127.0.0.1, HOME redirected into the study) and give the same rows. Bad configs and unequal
budgets stop in one line with exit status 2 before anything is written.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from harness import Job, child_env

from bnas_nni.cli import main
from bnas_nni.data import fashion_mnist_root
from bnas_nni.errors import DatasetError
from bnas_nni.integrations.nni.processes import pid_alive
from bnas_nni.study.results import TIMING_FIELDS


def _have_fashion() -> bool:
    try:
        fashion_mnist_root(None)
        return True
    except DatasetError:
        return False


pytestmark = pytest.mark.skipif(not _have_fashion(), reason='Debian dataset-fashion-mnist is not installed')

TINY = {
    'name': 'tiny', 'dataset': 'fashion-mnist', 'space': 'bnas-tiny',
    'search_config': 'experiments/search_quick_fashion.yaml',
    'search': {'epochs': 1, 'train_subset': 128, 'batch_size': 32, 'threads': 1},
    'arms': [{'strategy': 'binary-darts', 'seeds': 1}, {'name': 'random', 'cells': 1, 'seed': 0}],
    'protocol': {'config': 'experiments/train_quick_fashion.yaml', 'seeds': 2,
                 'train': {'epochs': 1, 'train_subset': 128, 'val_subset': 64, 'batch_size': 32, 'init_channels': 4,
                           'layers': 3, 'threads': 1, 'report_freq': 1000}},
    'bootstrap_samples': 1000,
}
KEYS = ['binary-darts/binary-darts-s0/seed0', 'binary-darts/binary-darts-s0/seed1', 'random/random-c00/seed0',
        'random/random-c00/seed1']


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(run_dir: Path):
    with open(run_dir / 'results.csv', newline='') as f:
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in csv.DictReader(f)]


def _study(config: Path, run_dir: Path, log: Path, *extra: str, namespace: bool = False) -> Job:
    return Job([sys.executable, '-m', 'bnas_nni', 'study', '--config', str(config), '--run-dir', str(run_dir),
                *extra], child_env(), log, namespace=namespace)


@pytest.fixture(scope='module')
def local_study(tmp_path_factory):
    """The tiny study run with --local, killed -9 after its first finished training, then continued."""
    root = tmp_path_factory.mktemp('study')
    config = _write(root / 'tiny.yaml', TINY)
    run_dir = root / 'local'
    first = _study(config, run_dir, root / 'first.log', '--local')
    try:
        deadline = time.monotonic() + 400
        while not list((run_dir / 'results').glob('*.json')) and first.proc.poll() is None:
            assert time.monotonic() < deadline, first.output()[-3000:]
            time.sleep(0.05)
        first.kill()                                               # SIGKILL, the whole process tree
    finally:
        first.close()
    finished = {p.name: p.read_bytes() for p in (run_dir / 'results').glob('*.json')}
    second = _study(config, run_dir, root / 'second.log', '--local')
    try:
        assert second.wait(400) == 0, second.output()[-3000:]
    finally:
        second.close()
    return SimpleNamespace(root=root, config=config, run_dir=run_dir, finished=finished,
                           events=(run_dir / 'events.log').read_text().splitlines())


def test_killed_study_resumes_without_redoing_finished_work(local_study):
    run_dir = local_study.run_dir
    assert 1 <= len(local_study.finished) < len(KEYS), 'the kill came after every training had finished'
    for name, data in local_study.finished.items():                 # finished results are kept byte for byte
        assert (run_dir / 'results' / name).read_bytes() == data
    finished_keys = {f"{r['arm']}/{r['cell']}/seed{r['seed']}" for r in map(json.loads, local_study.finished.values())}
    starts = [e.split(' ', 2)[2] for e in local_study.events if e.split(' ', 2)[1] == 'start']
    assert all(any(s.startswith(key + ' ') for s in starts) for key in KEYS)
    for key in finished_keys:
        assert sum(s.startswith(key + ' ') for s in starts) == 1, (key, starts)   # never trained again
    assert sum(s.startswith('search binary-darts seed 0') for s in starts) == 1   # the search is kept too
    assert any('study continues' in e for e in local_study.events)

    rows = _rows(run_dir)
    assert [f"{r['arm']}/{r['cell']}/seed{r['seed']}" for r in rows] == KEYS
    assert all(0.0 <= float(r['top1']) <= 100.0 and float(r['ops_m']) > 0 and int(r['params']) > 0 for r in rows)
    summary = json.loads((run_dir / 'summary.json').read_text())
    arms = {a['arm']: a for a in summary['arms']}
    assert arms['binary-darts']['trainings'] == 2 and arms['random']['cells'] == 1
    cell_means = {r['cell']: [] for r in rows}
    for r in rows:
        cell_means[r['cell']].append(float(r['top1']))
    assert arms['random']['top1_mean'] == pytest.approx(sum(cell_means['random-c00']) / 2, abs=1e-6)
    assert arms['binary-darts']['diff_vs_baseline'] == pytest.approx(
        sum(cell_means['binary-darts-s0']) / 2 - sum(cell_means['random-c00']) / 2, abs=1e-6)
    assert arms['binary-darts']['search_cost_image_epochs'] == 128 and arms['random']['search_cost_image_epochs'] == 0
    report = (run_dir / 'report.md').read_text()
    assert '| binary-darts | 128 (1 supernet epochs x 128 images)' in report

    for name in ('accuracy_per_arm.png', 'accuracy_vs_cost.png', 'report.md', 'summary.json'):
        (run_dir / name).unlink()
    assert main(['plot', str(run_dir)]) == 0                       # bnas-nni plot STUDY_DIR redraws them
    for name in ('accuracy_per_arm.png', 'accuracy_vs_cost.png'):
        assert (run_dir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert json.loads((run_dir / 'summary.json').read_text()) == summary


def test_nni_experiment_gives_the_same_rows_as_local(local_study):
    """The trainings of seed 0 as NNI trials, on the cells the local study derived: the same rows."""
    run_dir = local_study.root / 'nni'
    for folder in ('cells', 'searches'):
        shutil.copytree(local_study.run_dir / folder, run_dir / folder)
    job = _study(local_study.config, run_dir, local_study.root / 'nni.log', '--set', 'protocol.seeds=[0]',
                 namespace=True)
    try:
        assert job.wait(500) == 0, job.output()[-3000:]
        assert not job.leftovers(), 'the NNI manager or a trial is still running'
    finally:
        job.close()
    local = [r for r in _rows(local_study.run_dir) if r['seed'] == '0']
    assert _rows(run_dir) == local and len(local) == 2
    exp = yaml.safe_load((run_dir / 'nni' / 'experiment.yml').read_text())
    assert exp['tuner']['name'] == 'BatchTuner' and exp['trialConcurrency'] == 1
    assert exp['searchSpace']['combine_params']['_value'] == [
        {'arm': 'binary-darts', 'cell': 'binary-darts-s0', 'seed': 0},
        {'arm': 'random', 'cell': 'random-c00', 'seed': 0}]
    record = json.loads((run_dir / 'nni' / 'experiment.json').read_text())
    trials = list((run_dir / 'nni' / 'experiments' / record['id'] / 'environments' / 'local-env' / 'trials').iterdir())
    assert len(trials) == 2 and not pid_alive(record['pid'])
    events = (run_dir / 'events.log').read_text()
    assert 'start search' not in events and events.count(' start binary-darts/') == 1


def test_unequal_budgets_are_refused_in_one_line(tmp_path, capsys):
    bad = dict(TINY, arms=[{'strategy': 'binary-darts', 'seeds': 1},
                           {'strategy': 'darts', 'seeds': 1, 'search': {'epochs': 2}}, {'name': 'random', 'cells': 1}])
    config = _write(tmp_path / 'unequal.yaml', bad)
    assert main(['study', '--config', str(config), '--run-dir', str(tmp_path / 'run'), '--local']) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith('error: unequal search budgets: ')
    assert 'binary-darts 128 image-epochs (1 supernet epochs x 128 images)' in err
    assert 'darts 256 image-epochs (2 supernet epochs x 128 images)' in err
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('change, message', [
    ({'arms': [{'name': 'mystery'}]}, "arms[0] (mystery): unknown arm"),
    ({'arms': [{'strategy': 'no-such-search', 'seeds': 1}]}, "unknown strategy 'no-such-search'"),
    ({'dataset': 'no-such-data'}, "unknown dataset 'no-such-data'"),
    ({'baseline': 'nobody'}, "baseline names unknown arm 'nobody'"),
    ({'protocol': {'config': 'experiments/train_quick_fashion.yaml', 'train': {'genotype': 'x'}}},
     'protocol train: the study sets genotype'),
])
def test_bad_study_config_is_one_line_exit_2(tmp_path, capsys, change, message):
    config = _write(tmp_path / 'bad.yaml', {**TINY, **change})
    assert main(['study', '--config', str(config), '--run-dir', str(tmp_path / 'run'), '--local']) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith('error: ') and message in err, err
    assert 'Traceback' not in err and not (tmp_path / 'run').exists()


def test_resume_without_a_study_is_one_line(tmp_path, capsys):
    config = _write(tmp_path / 'tiny.yaml', TINY)
    assert main(['study', '--config', str(config), '--run-dir', str(tmp_path / 'none'), '--resume', '--local']) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith('error: nothing to resume: ')
    assert not (tmp_path / 'none').exists()


def test_random_cells_are_uniform_draws_with_distinct_inputs():
    from bnas_nni.space import load_space_config
    from bnas_nni.study.arms import random_cells

    ops = set(load_space_config('bnas-tiny')['ops'])
    cells = random_cells('bnas-tiny', 8, seed=0)
    assert [c.name for c in cells] == [f'random-c{i:02d}' for i in range(8)]
    assert cells == random_cells('bnas-tiny', 8, seed=0) and cells != random_cells('bnas-tiny', 8, seed=1)
    assert len({(c.normal, c.reduce) for c in cells}) == 8
    for c in cells:
        for entries in (c.normal, c.reduce):
            for node in range(len(entries) // 2):
                (op_a, a), (op_b, b) = entries[2 * node:2 * node + 2]
                assert a != b and {a, b} <= set(range(node + 2)) and {op_a, op_b} <= ops
    # node 1 of the normal cell takes two of its three inputs: over 2,000 cells each pair comes up ~667 times
    pairs = [tuple(j for _, j in c.normal[2:4]) for c in random_cells('bnas-tiny', 2000, seed=2)]
    counts = {p: pairs.count(p) for p in set(pairs)}
    assert set(counts) == {(0, 1), (0, 2), (1, 2)} and all(600 < n < 730 for n in counts.values()), counts


def test_one_hot_alphas_select_exactly_the_cell():
    import torch

    from bnas_nni.genotypes import Genotype
    from bnas_nni.ops import PRIMITIVES
    from bnas_nni.study.ranking import one_hot_alphas

    g = Genotype(normal=(('bin_conv_3x3', 0), ('max_pool_3x3', 1), ('zeroise', 0), ('bin_dil_conv_5x5', 2)),
                 reduce=(('avg_pool_3x3', 1), ('bin_conv_5x5', 0), ('max_pool_3x3', 2), ('bin_conv_3x3', 1)))
    alphas = one_hot_alphas(g, PRIMITIVES, 2)
    rows = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    for t in ('normal', 'reduce'):
        p = torch.softmax(alphas[t], dim=-1)
        assert torch.allclose(p.max(dim=-1).values, torch.ones(5, dtype=p.dtype), atol=1e-20, rtol=0)
        kept = {(k // 2, j): op for k, (op, j) in enumerate(g.cell(t))}
        assert [PRIMITIVES[int(i)] for i in p.argmax(dim=-1)] == [kept.get(r, 'zeroise') for r in rows]
    with pytest.raises(Exception, match='Zeroise'):
        one_hot_alphas(g, [op for op in PRIMITIVES if op != 'zeroise'], 2)


def test_supernet_ranks_the_study_cells_and_keeps_the_supernet_as_it_was(local_study, monkeypatch, capsys):
    import torch

    from bnas_nni.genotypes import load_genotype
    from bnas_nni.study import ranking
    from bnas_nni.study.arms import arm_costs
    from bnas_nni.study.config import parse_study
    from bnas_nni.study.report import write_report
    from bnas_nni.study.results import StudyFiles

    run_dir = local_study.root / 'ranked'
    shutil.copytree(local_study.run_dir, run_dir)
    study = parse_study({**TINY, 'supernet_ranking': {'images': 64, 'bn_batches': 2}})
    assert study.supernet_ranking == {'arm': 'binary-darts', 'seed': 0, 'images': 64, 'bn_batches': 2}
    files = StudyFiles(run_dir)
    cells = ['binary-darts-s0', 'random-c00']

    model, train, val_eval, batch = ranking._load_supernet(study, files, 'binary-darts', 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_batches = ranking._batches(train, 2, batch, seed=0)
    eval_batches = ranking._batches(val_eval, 2, batch, seed=None)
    results = [ranking.supernet_cell_accuracy(model, load_genotype(str(run_dir / 'cells' / f'{c}.yaml')),
                                              train_batches=train_batches, eval_batches=eval_batches) for c in cells]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # alphas and BN statistics restored
    assert results[0][1] != results[1][1]                               # the cells really differ inside it
    again = ranking.supernet_cell_accuracy(model, load_genotype(str(run_dir / 'cells' / f'{cells[0]}.yaml')),
                                           train_batches=train_batches, eval_batches=eval_batches)
    assert again == results[0]

    saved = ranking.rank_cells(study, files, cells, log=lambda line: None)
    assert set(saved['cells']) == set(cells) and saved['key'] == study.supernet_ranking
    assert all(0.0 <= v['top1'] <= 100.0 for v in saved['cells'].values())
    assert saved['cells']['binary-darts-s0']['loss'] == pytest.approx(results[0][1], rel=1e-5)   # 64 images
    monkeypatch.setattr(ranking, '_load_supernet', lambda *a: pytest.fail('the cached ranking must be reused'))
    assert ranking.rank_cells(study, files, cells, log=lambda line: None) == saved
    summary = write_report(study, files, files.read_csv(), arm_costs(study))
    rank = summary['supernet_ranking']
    assert rank['cells'] == 2 and abs(rank['tau']) == pytest.approx(1.0)
    assert 'Supernet ranking: Kendall τ' in (run_dir / 'report.md').read_text()


def test_supernet_ranking_needs_a_binary_darts_arm(tmp_path, capsys):
    config = _write(tmp_path / 'bad.yaml', {**TINY, 'supernet_ranking': {'arm': 'random'}})
    assert main(['study', '--config', str(config), '--run-dir', str(tmp_path / 'run'), '--local']) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "supernet_ranking: arm 'random' is not a binary-darts arm" in err
    assert not (tmp_path / 'run').exists()
