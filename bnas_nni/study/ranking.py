r"""How well a one-shot supernet ranks cells: each study cell evaluated inside one search's supernet.

A one-shot search is only as good as its supernet's ranking: if the accuracy a cell reaches with weights
inherited from the supernet does not order cells as training them from scratch does, the search optimises
the wrong thing (Yu et al., ICLR 2020, "Evaluating the search phase of neural architecture search"). This
module measures that ranking for a study: every cell of the study (searched and random) is put into the
supernet of one BinaryDARTS search by fixing its architecture weights --

.. math::

   \alpha_{e,k} = \begin{cases} s & \text{edge } e \text{ kept by the cell with op } k,
   \text{ or } e \text{ not kept and } k = \mathrm{Zeroise} \\ -s & \text{otherwise} \end{cases}
   \qquad s = 30

so that :math:`\mathrm{softmax}(\alpha_e)` is one-hot to within :math:`e^{-60}` and the supernet computes
exactly the cell (Zeroise is a candidate of the BNAS space, so an edge the cell does not keep contributes
zero) -- then its BN statistics are re-estimated on ``bn_batches`` training batches (the supernet's were
collected under the mixture of all ops) and its top-1 is measured on the first ``images`` images of the
search's validation half. Kendall's :math:`\tau` between these one-shot accuracies and the cells' mean
stand-alone top-1 (the study's trainings) is the supernet's ranking quality.

Results are kept in ``<study>/ranking.json`` keyed by the search and the evaluation settings, so a rerun
of the study does not evaluate again.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..genotypes import CELL_TYPES, Genotype, load_genotype
from ..io import atomic_write_text
from .config import StudyConfig
from .results import StudyFiles

__all__ = ['one_hot_alphas', 'supernet_cell_accuracy', 'rank_cells', 'RANKING_FILE', 'STRENGTH']

RANKING_FILE = 'ranking.json'
#: the logit of the kept op of an edge (and of Zeroise on an edge the cell does not keep); the rest get -STRENGTH
STRENGTH = 30.0


def one_hot_alphas(genotype: Genotype, op_names: Sequence[str], num_nodes: int,
                   strength: float = STRENGTH) -> Dict[str, torch.Tensor]:
    """``{'normal': [E, K], 'reduce': [E, K]}`` architecture logits that select exactly ``genotype``'s cells:
    rows in the supernet's edge order (node by node, inputs ascending)."""
    ops = list(op_names)
    if 'zeroise' not in ops:
        raise ConfigError('supernet ranking needs Zeroise among the space\'s ops (an edge a cell does not keep '
                          'is switched off with it)')
    rows = [(i, j) for i in range(num_nodes) for j in range(i + 2)]
    out: Dict[str, torch.Tensor] = {}
    for t in CELL_TYPES:
        entries = genotype.cell(t)
        if len(entries) != 2 * num_nodes:
            raise ConfigError(f'genotype {genotype.name or str(genotype)!r} has {len(entries) // 2} nodes per '
                              f'{t} cell; the supernet has {num_nodes}')
        kept = {(idx // 2, j): op for idx, (op, j) in enumerate(entries)}
        a = torch.full((len(rows), len(ops)), -float(strength), dtype=torch.float64)
        for r, edge in enumerate(rows):
            op = kept.get(edge, 'zeroise')
            if op not in ops:
                raise ConfigError(f'genotype {genotype.name!r} uses {op!r}, which the supernet does not have '
                                  f'({", ".join(ops)})')
            a[r, ops.index(op)] = float(strength)
        out[t] = a
    return out


def _set_alphas(model: nn.Module, alphas: Mapping[str, torch.Tensor]) -> None:
    from ..search.supernet import binary_cells
    for label, cell in binary_cells(model).items():
        for r, edge in enumerate(cell.edge_labels()):
            cell._arch_alpha[edge].data.copy_(alphas[label][r].to(cell._arch_alpha[edge].dtype))


def _batch_norms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def supernet_cell_accuracy(model: nn.Module, genotype: Genotype, *, train_batches: Sequence[Tuple[torch.Tensor, Any]],
                           eval_batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[float, float]:
    """(top-1 %, mean loss) of ``genotype`` inside the supernet ``model`` (see the module docstring); the
    model's architecture weights and BN statistics are restored afterwards."""
    from ..search.supernet import alpha_matrices, binary_cells, cell_ops
    cells = binary_cells(model)
    num_nodes = next(iter(cells.values())).num_nodes
    saved_alphas = {k: v.detach().clone() for k, v in alpha_matrices(model).items()}
    bns = _batch_norms(model)
    saved_bn = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
                for m in bns]
    was_training = model.training
    try:
        _set_alphas(model, one_hot_alphas(genotype, cell_ops(model), num_nodes))
        for m in bns:
            m.reset_running_stats()
            m.momentum = None                    # a cumulative average over the re-estimation batches
        if bns:
            model.train()
            for x, _ in train_batches:
                model(x)
        model.eval()
        hits = seen = 0
        loss = 0.0
        for x, y in eval_batches:
            out = model(x)
            loss += float(F.cross_entropy(out, y, reduction='sum'))
            hits += int((out.argmax(-1) == y).sum())
            seen += int(y.numel())
        return 100.0 * hits / max(seen, 1), loss / max(seen, 1)
    finally:
        _set_alphas(model, saved_alphas)
        for m, (mean, var, count, momentum) in zip(bns, saved_bn):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
        model.train(was_training)


def _load_supernet(study: StudyConfig, files: StudyFiles, arm_name: str, seed: int):
    """The supernet of one finished search of the study, its weights and alphas from the search checkpoint,
    and the search's (train, validation) data."""
    from ..checkpoints import load_run_checkpoint
    from ..data import search_splits
    from ..search.run import build_space
    from ..search.strategies import build_strategy, get_strategy_spec

    arm = study.arm(arm_name)
    if arm.is_random or get_strategy_spec(arm.strategy).runner != 'driver':
        raise ConfigError(f'supernet_ranking.arm {arm_name!r} is not a one-shot search bnas-nni runs itself '
                          '(use a binary-darts arm)')
    if int(seed) not in arm.seeds:
        raise ConfigError(f'supernet_ranking.seed {seed} is not a search seed of arm {arm_name!r} '
                          f'({", ".join(map(str, arm.seeds))})')
    run_dir = files.root / 'searches' / arm.name / f'seed{seed}'
    checkpoint = run_dir / 'checkpoint.pt'
    if not checkpoint.is_file():
        raise ConfigError(f'supernet ranking: {checkpoint} not found; the search of arm {arm_name!r} seed {seed} '
                          'must finish first (rerun the study)')
    cfg = study.search_config_for(arm, seed, run_dir=str(run_dir))
    strategy = build_strategy(cfg)
    model = strategy.mutate_model(build_space(cfg))
    load_run_checkpoint(checkpoint, model, 'search')
    train, _val, val_eval = search_splits(cfg)
    return model, train, val_eval, int(cfg.batch_size)


def _batches(data: Any, count: int, batch_size: int, seed: Optional[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of ``data``: shuffled by ``seed`` (None: in order); the augmentation draws
    come from torch's generator seeded here, so the same call gives the same images."""
    shuffle = seed is not None
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)
    out: List[Tuple[torch.Tensor, torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        for x, y in loader:
            if len(out) == count:
                break
            out.append((x, y))
    return out


def rank_cells(study: StudyConfig, files: StudyFiles, cells: Sequence[str],
               log: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """One-shot top-1 of every cell in ``cells`` (names under ``<study>/cells``) in the supernet the study's
    ``supernet_ranking`` names; None when the study does not ask for it. Cached in ``ranking.json``."""
    spec = study.supernet_ranking
    if not spec:
        return None
    key = dict(spec)                  # already normalised by the config (arm, seed, images, bn_batches)
    path = files.root / RANKING_FILE
    saved: Dict[str, Any] = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
    if saved.get('key') != key:
        saved = {'key': key, 'cells': {}}
    todo = [c for c in cells if c not in saved['cells']]
    if todo:
        model, train, val_eval, batch = _load_supernet(study, files, key['arm'], key['seed'])
        train_batches = _batches(train, key['bn_batches'], batch, seed=0)
        eval_batches = _batches(val_eval, -(-key['images'] // batch), batch, seed=None)
        n_eval = sum(int(y.numel()) for _, y in eval_batches)
        log(f"supernet ranking: {len(todo)} cells in the supernet of {key['arm']} seed {key['seed']} "
            f"(BN re-estimated on {len(train_batches)} batches, top-1 on {n_eval} validation images)")
        for name in todo:
            genotype = load_genotype(str(files.root / 'cells' / f'{name}.yaml'))
            acc, loss = supernet_cell_accuracy(model, genotype, train_batches=train_batches,
                                               eval_batches=eval_batches)
            saved['cells'][name] = {'top1': round(acc, 4), 'loss': round(loss, 6)}
            atomic_write_text(path, json.dumps(saved, indent=1, sort_keys=True) + '\n')
            log(f'supernet ranking: {name} one-shot top-1 {acc:.2f}%')
    return saved
