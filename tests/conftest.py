"""Shared test fixtures (few threads, deterministic seeds, real CIFAR-10 images, one finished tiny search)
and the test tiers: every test file is ``unit``, ``numerics`` or ``system`` (see ``TIERS``), and the
slowest tests are also ``slow``, so that ``python -m pytest -m "not slow"`` is the fast lane."""
from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import io
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

# On 2 shared cores, OpenMP threads that spin while waiting make torch ops up to ~50x slower when other
# processes compete for the CPU; passive waiting avoids that. libgomp reads this when torch is imported.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- tiers

#: every test file's tier. ``numerics``: fidelity to the official code and exactness (binarizers, the fast
#: cell against the reference cell, derivation and entropy, one-cycle, official-checkpoint logits, the
#: packed engine's bits); ``system``: whole programs (the CLI end to end, subprocesses, nnictl, torchrun,
#: a browser, a terminal); ``unit``: the rest. A new test file must be added here, or collection fails.
TIERS = {
    'unit': ('test_bad_input.py', 'test_config.py', 'test_data.py', 'test_error_messages.py',
             'test_import_graph.py', 'test_networks.py', 'test_ops.py', 'test_packed_fuzz.py',
             'test_packed_validation.py', 'test_plot.py', 'test_quant.py', 'test_datasets.py', 'test_study_stats.py'),
    'numerics': ('test_batch_renorm.py', 'test_binary.py', 'test_binary_darts.py', 'test_checkpoints.py',
                 'test_deploy_kernels.py', 'test_deploy_network.py', 'test_fast_cell.py', 'test_fast_kernels.py',
                 'test_genotypes.py', 'test_react.py', 'test_recipes.py', 'test_schedules.py', 'test_space.py',
                 'test_latency.py', 'test_latency_search.py', 'test_deploy_react.py', 'test_engine_perf.py'),
    'system': ('test_cli.py', 'test_console.py', 'test_ddp_imagenet.py', 'test_ddp_search.py', 'test_faults.py',
               'test_binarizer_plugin.py', 'test_nni_create.py', 'test_nni_strategies.py', 'test_nnictl_search.py',
               'test_nnictl_train.py',
               'test_react_recipe.py', 'test_recipe_plugin.py', 'test_robustness.py', 'test_search_e2e.py',
               'test_strategy_registry.py', 'test_training.py', 'test_webui_browser.py', 'test_dataset_e2e.py',
               'test_study.py', 'test_docs.py'),
}
TIER_OF = {name: tier for tier, names in TIERS.items() for name in names}

#: tests also marked ``slow`` (node ids below tests/, fnmatch patterns): the longest ones, measured with
#: ``--durations=0``, left out of the fast lane ``-m "not slow"`` (CI runs everything). Files may also
#: mark a test ``@pytest.mark.slow`` themselves.
SLOW = (
    'test_binary_darts.py::test_binary_darts_in_nas_experiment',                # NNI's NasExperiment end to end
    'test_binary_darts.py::test_resume_after_interrupt_matches_uninterrupted',  # three searches
    'test_ddp_search.py::test_synced_batch_norm_over_two_processes_is_the_whole_batch',
    'test_faults.py::test_sigterm_stops_a_search_in_one_line_and_it_resumes',
    'test_react_recipe.py::test_resumable_in_either_step*',
    'test_robustness.py::test_one_writer_per_run_directory_and_stale_locks?search?',
    'test_strategy_registry.py::test_user_strategy_runs_as_a_search_trial',   # a search as a trial, end to end
    'test_study.py::test_nni_experiment_gives_the_same_rows_as_local',        # a study's trainings as NNI trials
    'test_training.py::test_resume_after_kill_continues_at_the_right_epoch_with_the_same_state',
)


class _UntieredFile(pytest.File):
    """Stands in for a test file with no tier, so that collecting it is an error that says what to do."""

    def collect(self):
        raise self.CollectError(f'{self.path.name} has no test tier: add it to TIERS in tests/conftest.py '
                                '(unit, numerics or system)')


def pytest_collect_file(file_path: Path, parent):
    if (file_path.suffix == '.py' and file_path.name.startswith('test_') and file_path.parent == HERE
            and file_path.name not in TIER_OF):
        return _UntieredFile.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """Each test gets its file's tier marker, and ``slow`` where ``SLOW`` names it."""
    for item in items:
        tier = TIER_OF.get(item.path.name)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
        nodeid = item.nodeid.split('tests/', 1)[-1]
        if any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in SLOW):
            item.add_marker(pytest.mark.slow)


CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state and torch's two threads, whatever ran before it (a search
    run in-process sets its own thread count; summation orders, hence float32 round-off, depend on it)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if torch.get_num_threads() != 2:
        torch.set_num_threads(2)


def _foolbox_data_dir() -> Path | None:
    # find_spec does not import foolbox (which needs eagerpy); we only want its bundled PNGs
    spec = importlib.util.find_spec('foolbox')
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / 'data'
        if d.is_dir():
            return d
    return None


@pytest.fixture(scope='session')
def foolbox_cifar():
    """The 20 CIFAR-10 test images bundled with foolbox: (images [20,3,32,32] normalised, labels [20])."""
    from PIL import Image

    d = _foolbox_data_dir()
    if d is None:
        pytest.skip('foolbox is not installed; its bundled CIFAR-10 images (foolbox/data/cifar10_*.png) are needed')
    files = sorted(d.glob('cifar10_*.png'))
    if len(files) != 20:
        pytest.skip(f'expected 20 foolbox/data/cifar10_*.png files, found {len(files)} in {d}')
    images, labels = [], []
    for f in files:
        m = re.fullmatch(r'cifar10_(\d+)_(\d+)\.png', f.name)
        assert m, f.name
        arr = np.asarray(Image.open(f).convert('RGB'), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(arr).permute(2, 0, 1))
        labels.append(int(m.group(2)))
    x = torch.stack(images)
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels)


@pytest.fixture
def nni_home(monkeypatch, tmp_path) -> Path:
    """HOME -> a tmp folder for NNI, including the manifest folder nnictl fixes at import time."""
    from nni.tools.nnictl import config_utils, constants

    home = tmp_path / 'home'
    monkeypatch.setenv('HOME', str(home))
    manifest = str(home / 'nni-experiments')
    monkeypatch.setattr(constants, 'NNI_HOME_DIR', manifest)
    monkeypatch.setattr(config_utils, 'NNI_HOME_DIR', manifest, raising=False)
    monkeypatch.setattr(config_utils.Experiments.__init__, '__defaults__', (manifest,))
    return home


@pytest.fixture
def needs_fashion() -> None:
    """Skip where the embedded Fashion-MNIST (Debian ``dataset-fashion-mnist``) is not installed."""
    from bnas_nni.data import fashion_mnist_root
    from bnas_nni.errors import DatasetError

    try:
        fashion_mnist_root()
    except DatasetError as exc:
        pytest.skip(str(exc))


# --------------------------------------------------------------------------- one finished tiny search

#: the search behind ``tiny_search_run``: the quick preset on 256 Fashion-MNIST images for 2 epochs
TINY_SEARCH_ARGS = ('--config', str(HERE.parent / 'experiments' / 'search_quick_fashion.yaml'), '--epochs', '2',
                    '--set', 'train_subset=256', '--save', 'tiny')


@pytest.fixture(scope='session')
def tiny_search_run(tmp_path_factory) -> SimpleNamespace:
    """A finished tiny ``bnas-nni search`` (``TINY_SEARCH_ARGS``), run once per test session (once per
    xdist worker) through the command's entry point, for the tests that read a search run directory
    (genotypes, alpha history, pictures, TensorBoard) rather than test the search itself: ``run_dir``,
    ``out`` (the saved genotypes ``tiny.yaml`` and ``tiny_imagenet.yaml``), ``stdout``, ``argv``. Read
    only: a test that writes into it takes ``tiny_search_copy``."""
    from bnas_nni.data import fashion_mnist_root
    from bnas_nni.errors import DatasetError

    try:
        fashion_mnist_root()
    except DatasetError as exc:
        pytest.skip(str(exc))
    from bnas_nni.cli import main

    root = tmp_path_factory.mktemp('tiny-search')
    run_dir, out = root / 'run', root / 'genotypes'
    argv = [*TINY_SEARCH_ARGS, '--out', str(out), '--run-dir', str(run_dir)]
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        rc = main(['search', *argv])            # in this process: the fast cell's extension is loaded once
    assert rc == 0, (printed.getvalue() + errors.getvalue())[-3000:]
    return SimpleNamespace(run_dir=run_dir, out=out, stdout=printed.getvalue(), argv=argv)


@pytest.fixture
def tiny_search_copy(tiny_search_run, tmp_path) -> SimpleNamespace:
    """A private copy of ``tiny_search_run`` (its run directory and saved genotypes) in ``tmp_path``."""
    run_dir, out = tmp_path / 'run', tmp_path / 'genotypes'
    shutil.copytree(tiny_search_run.run_dir, run_dir)
    shutil.copytree(tiny_search_run.out, out)
    return SimpleNamespace(run_dir=run_dir, out=out, stdout=tiny_search_run.stdout, argv=tiny_search_run.argv)


@pytest.fixture(scope='module')
def fashion_halves():
    """Real Fashion-MNIST: 2 x 64 training images at 16x16 (weight half, architecture half) for the
    search tests (BinaryDARTS with and without the latency term)."""
    import torch.utils.data as tud

    from bnas_nni.data import DatasetView, FashionMNIST32
    from bnas_nni.errors import DatasetError

    try:
        ds = FashionMNIST32(train=True, subset=128, augment=False)
    except DatasetError as exc:
        pytest.skip(str(exc))
    ds = DatasetView(ds, image_size=16)
    return tud.Subset(ds, range(0, 64)), tud.Subset(ds, range(64, 128))
