"""BinaryDARTS: the objective, binarized search steps, derivation, selection, resume, CLI errors, NNI use."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.utils.data as tud

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from bnas_nni.cli import main  # noqa: E402
from bnas_nni.data import DatasetView  # noqa: E402
from bnas_nni.genotypes import Genotype  # noqa: E402
from bnas_nni.quant import binary_convs  # noqa: E402
from bnas_nni.search.binary_darts import BinaryDARTS, alpha_matrices, binary_cells, derive_from_model  # noqa: E402
from bnas_nni.search.driver import SearchDriver  # noqa: E402
from bnas_nni.search.mixed_cell import BinaryMixedCell  # noqa: E402
from bnas_nni.search.objective import diversity_weight, mean_edge_entropy, search_lr  # noqa: E402
from bnas_nni.space import BNASSpace  # noqa: E402

OPS = ('zeroise', 'max_pool_3x3', 'avg_pool_3x3', 'bin_dil_conv_3x3', 'bin_dil_conv_5x5', 'bin_conv_3x3',
       'bin_conv_5x5')


def _supernet(seed: int = 0, **space_kw):
    torch.manual_seed(seed)
    space = BNASSpace.from_config('bnas-tiny', **space_kw)
    return BinaryDARTS().mutate_model(space)


def _runner(tmp_path, halves, *, epochs=2, seed=0, cls=SearchDriver, select='best', mixed_cell='reference', **kw):
    torch.manual_seed(seed)
    space = BNASSpace.from_config('bnas-tiny')
    strategy = BinaryDARTS(arc_learning_rate=3e-2, select=select, mixed_cell=mixed_cell)
    train, val = halves
    return cls(space, strategy, train_data=train, val_data=val, run_dir=tmp_path, epochs=epochs, batch_size=32,
               seed=seed, tensorboard=False, log=lambda s: None, **kw)


# --------------------------------------------------------------------------- objective


def test_entropy_term_is_the_mean_over_all_edges_of_both_cells():
    model = _supernet(num_nodes=4)          # 14 edges per cell, as in the paper
    alphas = alpha_matrices(model)
    assert {k: tuple(v.shape) for k, v in alphas.items()} == {'normal': (14, 7), 'reduce': (14, 7)}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for cell in binary_cells(model).values():
            for e in cell.edge_labels():
                cell._arch_alpha[e].copy_(torch.randn(7, generator=gen) * 2)
    alphas = {k: v.detach().double().numpy() for k, v in alpha_matrices(model).items()}

    def H(row):
        p = np.exp(row - row.max())
        p /= p.sum()
        return -(p * np.log(p)).sum()

    intended = np.mean([H(r) for r in alphas['normal']] + [H(r) for r in alphas['reduce']])
    official_slip = (sum(H(r) for r in alphas['normal']) + 14 * H(alphas['reduce'][13])) / 28
    got = float(mean_edge_entropy(alpha_matrices(model).values()).detach())
    assert got == pytest.approx(intended, rel=1e-6)
    assert abs(got - official_slip) > 1e-3          # the released reduce-index slip is not reproduced
    assert diversity_weight(0) == 1.0
    assert diversity_weight(7.7) == pytest.approx(math.exp(-1))
    assert diversity_weight(49, lamda=2.0, tau=7.7) == pytest.approx(2 * math.exp(-49 / 7.7))
    # uniform alphas: the entropy of 7 ops is log 7
    assert float(mean_edge_entropy([torch.zeros(3, 7)])) == pytest.approx(math.log(7))
    # official schedule: stepped before each epoch
    assert search_lr(0, 50) == pytest.approx(0.024976, abs=1e-6)
    assert search_lr(49, 50) == pytest.approx(0.001)


def test_diversity_term_raises_entropy_in_the_arch_step(tmp_path, fashion_halves):
    """With lambda large the architecture step increases the mean entropy; with lambda=0 it does not
    push it up (the CE gradient alone sharpens)."""
    deltas = {}
    for lamda in (0.0, 50.0):
        runner = _runner(tmp_path / str(lamda), fashion_halves)
        runner.module.lamda = lamda
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():           # start away from the uniform maximum
            for a in runner.alphas:
                a.copy_(torch.randn(a.shape, generator=gen))
        x, y = next(iter(tud.DataLoader(fashion_halves[1], batch_size=32)))
        before = runner._entropy_now()
        for _ in range(3):
            runner.arch_step(x, y, epoch=0)
        deltas[lamda] = runner._entropy_now() - before
    assert deltas[50.0] > 0
    assert deltas[50.0] > deltas[0.0]


# --------------------------------------------------------------------------- binarized search steps


def test_alphas_move_and_weights_stay_binarized_in_forward(tmp_path, fashion_halves):
    runner = _runner(tmp_path, fashion_halves, epochs=1, max_train_batches=2)
    convs = binary_convs(runner.model)
    assert len(convs) > 0
    seen = {'calls': 0, 'bad_w': 0, 'bad_x': 0}

    def spy(m):
        orig = m._conv_forward

        def conv_forward(x, w, b):
            seen['calls'] += 1
            a = w.detach().abs().flatten(1)
            # every filter is +-alpha_o: one magnitude per output filter, and alpha_o = mean |latent|
            if not torch.allclose(a, a[:, :1].expand_as(a), rtol=1e-5, atol=1e-7):
                seen['bad_w'] += 1
            if not torch.isin(x.detach().unique(), torch.tensor([-1.0, 0.0, 1.0])).all():
                seen['bad_x'] += 1
            return orig(x, w, b)
        m._conv_forward = conv_forward

    for m in convs:
        spy(m)
    before = {k: v.detach().clone() for k, v in alpha_matrices(runner.model).items()}
    runner.run()
    after = alpha_matrices(runner.model)
    # 2 iterations x (arch forward + weight forward) + evaluation forwards
    assert seen['calls'] >= 4 * len(convs)
    assert seen['bad_w'] == 0 and seen['bad_x'] == 0
    for k in before:
        assert (after[k].detach() - before[k]).abs().max() > 1e-3
    # the persistent latent step ran before the weight step: latent weights clipped to [-1, 1]
    assert all(m.weight.abs().max() <= 1.0 for m in convs)
    # alpha scale of the forward equals mean |constrained latent| per filter
    m = convs[0]
    w_eff = m.effective_weight().detach()
    from bnas_nni.quant import make_binarizer

    wc = make_binarizer('xnor').constrain(m.weight.detach())
    torch.testing.assert_close(w_eff.abs().flatten(1)[:, 0], wc.abs().flatten(1).mean(1))


# --------------------------------------------------------------------------- derivation


def _set_alphas(model, label, rows):
    cell = binary_cells(model)[label]
    with torch.no_grad():
        for e, row in zip(cell.edge_labels(), rows):
            cell._arch_alpha[e].copy_(torch.tensor(row, dtype=torch.float32))


def _logits(probs):
    return np.log(np.asarray(probs, dtype=np.float64))


def test_derivation_on_hand_made_alphas_zeroise_and_gamma():
    model = _supernet()                      # 2 nodes: edges (2,0) (2,1) (3,0) (3,1) (3,2)
    Z, MP, AP, D3, D5, C3, C5 = range(7)

    def row(winner, p, second=None, q=0.0):
        # probabilities: the winner p, an optional runner-up q, the rest shared equally
        rest = 7 - 1 - (second is not None)
        r = np.full(7, (1.0 - p - q) / rest)
        r[winner] = p
        if second is not None:
            r[second] = q
        return r

    normal = [
        row(C3, 0.6),               # node 2 <- 0: bin_conv_3x3
        row(Z, 0.7),                # node 2 <- 1: Zeroise wins the edge (and is kept: strongest)
        row(Z, 0.8),                # node 3 <- 0: Zeroise
        row(Z, 0.9),                # node 3 <- 1: Zeroise -> Zeroise wins the whole node
        row(MP, 0.25),              # node 3 <- 2: weakest, dropped
    ]
    reduce = [
        row(Z, 0.45, D3, 0.40),     # Zeroise barely ahead of bin_dil_conv_3x3: gamma=3 flips it
        row(AP, 0.5),
        row(MP, 0.6),
        row(Z, 0.5, C5, 0.3),       # gamma=3: 0.5/3 < 0.3 -> bin_conv_5x5
        row(C3, 0.2),
    ]
    _set_alphas(model, 'normal', [_logits(r) for r in normal])
    _set_alphas(model, 'reduce', [_logits(r) for r in reduce])

    g = derive_from_model(model)
    assert g.normal == (('zeroise', 1), ('bin_conv_3x3', 0), ('zeroise', 1), ('zeroise', 0))
    assert g.reduce == (('avg_pool_3x3', 1), ('zeroise', 0), ('max_pool_3x3', 0), ('zeroise', 1))
    g3 = derive_from_model(model, gamma=3.0)
    # normal cell: Zeroise still wins its edges (0.7/3, 0.9/3, 0.8/3 beat the rest); node 2 re-ranked
    assert g3.normal == (('bin_conv_3x3', 0), ('zeroise', 1), ('zeroise', 1), ('zeroise', 0))
    # reduce cell: gamma flips both Zeroise edges to the runner-up op
    assert g3.reduce == (('avg_pool_3x3', 1), ('bin_dil_conv_3x3', 0), ('max_pool_3x3', 0), ('bin_conv_5x5', 1))
    # the released rule (divide edge 0's row) changes nothing but node 0's entry order
    go = derive_from_model(model, gamma=3.0, gamma_rule='official')
    assert set(go.normal[:2]) == set(g.normal[:2]) and go.normal[2:] == g.normal[2:]
    assert set(go.reduce[:2]) == set(g.reduce[:2]) and go.reduce[2:] == g.reduce[2:]
    # the mixed cells' NNI export uses the same BNAS rule
    sample = {}
    for cell in binary_cells(model).values():
        sample.update(cell.export({}))
    assert Genotype.from_arch_dict(sample) == g


# --------------------------------------------------------------------------- selection


class _Scripted(SearchDriver):
    """Real search steps; the per-epoch validation accuracy is scripted to put the best epoch in the middle."""
    script = (0.30, 0.50, 0.40)

    def evaluate(self):
        super().evaluate()
        return self.script[len(self.history)], 1.0


@pytest.mark.parametrize('select', ['best', 'official', 'last'])
def test_best_epoch_genotype_is_kept(tmp_path, fashion_halves, select):
    runner = _runner(tmp_path, fashion_halves, epochs=3, max_train_batches=1, cls=_Scripted, select=select)
    init = {k: v.detach().double().numpy().copy() for k, v in alpha_matrices(runner.model).items()}
    cifar, imagenet = runner.run()
    hist = runner.history
    assert [h['val_acc'] for h in hist] == [0.30, 0.50, 0.40]
    assert runner.best['epoch'] == (2 if select == 'last' else 1)
    source = {'best': hist[1]['alphas'], 'official': hist[0]['alphas'], 'last': hist[2]['alphas']}[select]
    expected = derive_from_model(runner.model, alphas={k: np.asarray(v) for k, v in source.items()})
    assert (cifar.normal, cifar.reduce) == (expected.normal, expected.reduce)
    expected_img = derive_from_model(runner.model, alphas={k: np.asarray(v) for k, v in source.items()}, gamma=3.0)
    assert (imagenet.normal, imagenet.reduce) == (expected_img.normal, expected_img.reduce)
    assert not np.allclose(np.asarray(hist[0]['alphas']['normal']), init['normal'])
    # files in the run directory describe the kept genotype
    from bnas_nni.genotypes import load_genotype

    assert load_genotype(tmp_path / 'genotype.yaml') == cifar
    assert load_genotype(tmp_path / 'genotype_imagenet.yaml') == imagenet
    assert (tmp_path / 'alpha_history.json').is_file() and (tmp_path / 'checkpoint.pt').is_file()


# --------------------------------------------------------------------------- resume


class _Interrupt(SearchDriver):
    stop_at = None

    def weight_step(self, x, y, epoch=0):
        if self.stop_at is not None and self.global_step == self.stop_at:
            raise KeyboardInterrupt
        return super().weight_step(x, y, epoch)


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, fashion_halves):
    # augmentation randomness must be restored too: search on augmented data
    from bnas_nni.data import FashionMNIST32

    full = DatasetView(FashionMNIST32(train=True, subset=128, augment=True), image_size=16)
    halves = (tud.Subset(full, range(64)), tud.Subset(full, range(64, 128)))
    ref = _runner(tmp_path / 'ref', halves, epochs=3)
    ref.run()

    first = _runner(tmp_path / 'cut', halves, epochs=3, cls=_Interrupt)
    first.stop_at = 3                           # during epoch 2 (2 iterations per epoch)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert (tmp_path / 'cut' / 'checkpoint.pt').is_file()
    torch.manual_seed(12345)                    # whatever happened to the RNG meanwhile
    second = _runner(tmp_path / 'cut', halves, epochs=3)
    second.run(resume=True)
    assert second.start_epoch == 3 and len(second.history) == 3
    for k, v in alpha_matrices(ref.model).items():
        assert torch.equal(v.detach(), alpha_matrices(second.model)[k].detach()), k
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [h['val_acc'] for h in ref.history] == [h['val_acc'] for h in second.history]


# --------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize('argv, fragment', [
    (['--strategy', 'nope'], 'unknown strategy'),
    (['--lamda', '-1'], 'lamda'),
    (['--tau', '0'], 'tau'),
    (['--set', 'ops=[zeroise, bin_conv_7x7]'], 'unknown op'),
    (['--space', 'no-such-space'], 'unknown search space'),
    (['--dataset', 'fashion-mnist', '--data', 'MISSING_DIR'], 'Fashion-MNIST'),
    (['--dataset', 'cifar10', '--data', 'MISSING_DIR'], 'CIFAR-10'),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, fragment):
    argv = [a.replace('MISSING_DIR', str(tmp_path / 'missing')) for a in argv]
    rc = main(['search', '--run-dir', str(tmp_path / 'run'), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith('error:') and fragment in err[0], err


def test_cli_resume_without_run_is_an_error(tmp_path, capsys):
    assert main(['search', '--run-dir', str(tmp_path / 'none'), '--resume']) == 2
    assert 'nothing to resume' in capsys.readouterr().err


# --------------------------------------------------------------------------- as an NNI strategy


def test_binary_darts_in_nas_experiment(tmp_path, nni_home, fashion_halves):
    from nni.nas.evaluator.pytorch import DataLoader
    from nni.nas.experiment import NasExperiment

    from bnas_nni.search.evaluators import BinaryClassification

    train, val = fashion_halves
    evaluator = BinaryClassification(learning_rate=0.025, num_classes=10, max_epochs=2, limit_train_batches=2,
                                     limit_val_batches=2, train_dataloaders=DataLoader(train, batch_size=32),
                                     val_dataloaders=DataLoader(val, batch_size=32), logger=False,
                                     enable_progress_bar=False, num_sanity_val_steps=0)
    torch.manual_seed(0)
    space = BNASSpace.from_config('bnas-tiny')
    strategy = BinaryDARTS(arc_learning_rate=3e-2)
    exp = NasExperiment(space, evaluator, strategy)
    exp.config.experiment_working_directory = str(tmp_path / 'nni')
    try:
        exp.run()
    finally:
        exp.stop()
    module = strategy.oneshot_module
    cells = [m for m in module.modules() if isinstance(m, BinaryMixedCell)]
    assert cells and all(len(a) == 7 for c in cells for a in c._arch_alpha.values())   # no hidden zero
    assert [h['epoch'] for h in module.history] == [0, 1]
    assert all(0.0 <= h['val_acc'] <= 100.0 for h in module.history)     # percent
    best = max(module.history, key=lambda h: h['val_acc'])
    assert module.best['epoch'] == best['epoch']
    arch = exp.export_top_models(formatter='dict')[0]
    cifar, imagenet = strategy.genotypes()
    assert Genotype.from_arch_dict(arch) == cifar
    kept = derive_from_model(module, alphas={k: np.asarray(v) for k, v in best['alphas'].items()})
    assert kept == cifar
    # the weight optimizer runs the latent step; the strategy space still freezes to a real network
    assert all(m.weight.abs().max() <= 1.0 for m in binary_convs(module))
    net = space.freeze(arch)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


class _Naive(SearchDriver):
    """The textbook steps: every gradient computed, only the step's own optimizer applied."""

    def arch_step(self, x, y, epoch):
        self.a_optim.zero_grad(set_to_none=True)
        ce = torch.nn.functional.cross_entropy(self.model(x), y)
        loss = ce - diversity_weight(epoch, self.strategy.lamda, self.strategy.tau) * mean_edge_entropy(
            alpha_matrices(self.model).values())
        loss.backward()
        self.a_optim.step()
        return {'arch_loss': float(loss.detach()), 'arch_ce': float(ce.detach()), 'entropy': 0.0}

    def weight_step(self, x, y, epoch=0):
        self.w_optim.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        self.w_optim.step()
        return float(loss.detach()), int((logits.argmax(-1) == y).sum())


@pytest.mark.parametrize('mixed_cell', ['reference', 'fast'])
def test_skipped_gradients_leave_updates_unchanged(tmp_path, fashion_halves, mixed_cell):
    """Skipping the weight gradients in the alpha step and the alpha gradients in the weight step makes
    the same updates as textbook steps, with either mixed cell."""
    fast = _runner(tmp_path / 'fast', fashion_halves, epochs=1, mixed_cell=mixed_cell)
    naive = _runner(tmp_path / 'naive', fashion_halves, epochs=1, cls=_Naive, mixed_cell=mixed_cell)
    fast.run()
    naive.run()
    for (n, a), (_, b) in zip(fast.model.state_dict().items(), naive.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_fast_exact_path_is_the_default_everywhere():
    """BinaryDARTS itself (the NNI path too) and the paper preset select the fast mixed cell; the preset adds
    channels-last; the driver's steps skip the gradients the other optimizer would discard."""
    from bnas_nni.config import SEARCH, resolve
    from bnas_nni.paths import experiments_dir
    from bnas_nni.search.fast_cell import FastBinaryMixedCell

    assert BinaryDARTS().mixed_cell is FastBinaryMixedCell
    assert (BinaryDARTS(mixed_cell='reference').mixed_cell is BinaryMixedCell
            is BinaryDARTS(mixed_cell='binary').mixed_cell)
    cfg = resolve(SEARCH, experiments_dir() / 'search_cifar10_paper.yaml')
    assert cfg['mixed_cell'] == 'fast' and cfg['channels_last'] is True and cfg['strategy'] == 'binary-darts'
    model = _supernet()
    assert any(isinstance(m, FastBinaryMixedCell) for m in model.modules())


def test_nas_experiment_path_gets_run_directory_and_resume(tmp_path, nni_home, fashion_halves):
    """BinaryDARTS(run_dir=...) under NasExperiment: the run directory of the CLI (genotypes, alpha history,
    metrics.csv, lock) and a Lightning checkpoint that a second run with resume=True continues."""
    from nni.nas.evaluator.pytorch import DataLoader
    from nni.nas.experiment import NasExperiment

    from bnas_nni.genotypes import load_genotype
    from bnas_nni.search.evaluators import BinaryClassification

    run = tmp_path / 'run'

    def search(epochs, resume):
        train, val = fashion_halves
        evaluator = BinaryClassification(learning_rate=0.025, num_classes=10, max_epochs=epochs,
                                         limit_train_batches=1, train_dataloaders=DataLoader(train, batch_size=32),
                                         val_dataloaders=DataLoader(val, batch_size=32), logger=False,
                                         enable_progress_bar=False, num_sanity_val_steps=0)
        torch.manual_seed(0)
        strategy = BinaryDARTS(arc_learning_rate=3e-2, run_dir=str(run), resume=resume)
        exp = NasExperiment(BNASSpace.from_config('bnas-tiny'), evaluator, strategy)
        exp.config.experiment_working_directory = str(tmp_path / 'nni')
        try:
            exp.run()
        finally:
            exp.stop()
        return strategy

    first = search(2, resume=False)
    assert [h['epoch'] for h in first.oneshot_module.history] == [0, 1]
    assert {'genotype.yaml', 'genotype_imagenet.yaml', 'alpha_history.json', 'metrics.csv', 'last.ckpt'} <= \
        {p.name for p in run.iterdir()}
    assert load_genotype(run / 'genotype.yaml') == first.genotypes()[0]
    second = search(3, resume=True)
    assert [h['epoch'] for h in second.oneshot_module.history] == [0, 1, 2]   # continued, not restarted
    assert [r.split(',')[0] for r in (run / 'metrics.csv').read_text().split()[1:]] == ['0', '1', '2']
