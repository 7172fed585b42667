"""A BNAS search run as an ``nnictl`` trial, so searches show up in the NNI web UI.

Each trial (``trainers/search_trial.py``, launched by ``experiments/nnictl_search_grid.yml``):

1. takes its hyperparameters from NNI (any search config key: ``seed``, ``lamda``, ``tau`` ...; keys
   starting with ``final_`` set the brief final training) on top of ``--config``;
2. runs the search (:func:`bnas_nni.search.cli.run_search`) in ``$NNI_OUTPUT_DIR/search`` and
   reports, after every epoch, an intermediate result
   ``{'default': supernet val acc, 'arch_entropy': mean edge entropy, 'epoch': n}``;
3. writes the kept genotypes to ``$NNI_OUTPUT_DIR/genotype.yaml`` and ``genotype_imagenet.yaml``;
4. trains the derived network briefly and reports the final result
   ``{'default': test accuracy of the derived cell, 'supernet_val_acc': ..., 'zeroise_ops': ...}``.

Reports go through the trial command channel NNI opened for this process, captured before anything
else runs: NNI's sequential engine (used when a search runs through ``NasExperiment``) swaps the
global channel for an in-process one, and reports sent through that never reach the manager.
Outside NNI the same script runs standalone and prints what it would report.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

from ..errors import ConfigError
from ..nni.trial import RealTrialChannel
from ..io import parse_set_items

__all__ = ['FINAL_DEFAULTS', 'brief_train', 'run_trial', 'main']

#: the brief training of the derived cell that gives the trial's final result
FINAL_DEFAULTS: Dict[str, Any] = {
    'final_epochs': 1,
    'final_init_channels': 8,
    'final_layers': 3,
    'final_batch_size': 64,
    'final_lr': 0.05,
    'final_weight_decay': 3e-6,
    'final_train_subset': 2048,     # first N training images (Fashion-MNIST / CIFAR-10 train split)
    'final_test_subset': 1000,      # first N test images
    'final_image_size': None,       # None: the search's image_size (the native 32 when unset)
}


def _final_data(cfg: Mapping[str, Any], final: Mapping[str, Any]):
    from .. import data as D
    from .cli import Resized

    size = final['final_image_size'] or cfg.get('image_size')
    if cfg['dataset'] == 'fashion-mnist':
        train = D.FashionMNIST32(cfg['data'], train=True, subset=final['final_train_subset'], augment=True)
        test = D.FashionMNIST32(cfg['data'], train=False, subset=final['final_test_subset'], augment=False)
    else:
        root = cfg['data'] or 'data/cifar10'
        train = D.cifar10(root, train=True, download=cfg['download'], subset=final['final_train_subset'])
        test = D.cifar10(root, train=False, download=cfg['download'], subset=final['final_test_subset'])
    if size:
        train, test = Resized(train, size), Resized(test, size)
    return train, test


def brief_train(genotype: Any, cfg: Mapping[str, Any], final: Mapping[str, Any], *, seed: int = 0,
                log=print) -> float:
    """Train the derived network of ``genotype`` for ``final_epochs`` (SGD, cosine, the binarizer's latent
    step) and return its top-1 accuracy on the first ``final_test_subset`` test images."""
    import torch
    import torch.nn.functional as F
    import torch.utils.data as tud

    from ..quant import attach_latent_constraint
    from ..networks import BNASNetwork

    torch.manual_seed(seed)
    train, test = _final_data(cfg, final)
    model = BNASNetwork(genotype, init_channels=int(final['final_init_channels']), layers=int(final['final_layers']),
                        num_classes=10, dataset=cfg['dataset'])
    channels_last = True   # same math; dilated convs are far faster channels-last on CPU
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=final['final_lr'], momentum=0.9,
                          weight_decay=final['final_weight_decay'])
    attach_latent_constraint(opt, model)
    gen = torch.Generator().manual_seed(seed)
    loader = tud.DataLoader(train, batch_size=int(final['final_batch_size']), shuffle=True, generator=gen)
    steps = max(1, int(final['final_epochs']) * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    fmt = (lambda t: t.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda t: t)
    t0 = time.time()
    model.train()
    for epoch in range(int(final['final_epochs'])):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(fmt(x)), y)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    hits = seen = 0
    with torch.no_grad():
        for x, y in tud.DataLoader(test, batch_size=256):
            hits += int((model(fmt(x)).argmax(-1) == y).sum())
            seen += int(y.numel())
    acc = hits / max(seen, 1)
    log(f'derived cell: {final["final_epochs"]} epoch(s) on {len(train)} images, C={final["final_init_channels"]} '
        f'L={final["final_layers"]}: test acc {100 * acc:.2f}% on {seen} test images ({time.time() - t0:.1f}s)')
    return acc


def run_trial(config: Optional[str], overrides: Mapping[str, Any], final_overrides: Mapping[str, Any], *,
              channel: Optional[RealTrialChannel] = None, log=print) -> Dict[str, Any]:
    """Everything a search trial does (see the module docstring); returns the final metric."""
    from ..genotypes import save_genotype
    from ..nni.trial import under_nni
    from .cli import resolve_search_config, run_search

    channel = channel or RealTrialChannel()
    params: Dict[str, Any] = {}
    if under_nni():
        import nni

        with channel.active():
            params = dict(nni.get_next_parameter() or {})
    final = dict(FINAL_DEFAULTS)
    for source in (final_overrides, {k: v for k, v in params.items() if k.startswith('final_')}):
        for k, v in source.items():
            if k not in final:
                raise ConfigError(f'unknown final-training key {k!r}; known: {", ".join(FINAL_DEFAULTS)}')
            final[k] = v
    search_params = {k: v for k, v in params.items() if not k.startswith('final_')}
    out_dir = Path(os.environ.get('NNI_OUTPUT_DIR') or Path('runs') / 'search-trial')
    overrides = dict(overrides)
    overrides.setdefault('run_dir', str(out_dir / 'search'))
    overrides.setdefault('progress', 'never')
    cfg = resolve_search_config(config, overrides, nni_params=search_params)
    if cfg['strategy'] != 'binary-darts':
        raise ConfigError(f'search trials run binary-darts (per-epoch reports); got strategy {cfg["strategy"]!r}. '
                          "NNI's own strategies have their experiments/strategy_*.yaml")
    if params:
        log(f'trial parameters: {params}')

    def report_epoch(result: Mapping[str, Any], runner: Any) -> None:
        channel.intermediate({'default': float(result['val_acc']), 'arch_entropy': float(result['entropy']),
                              'arch_ce': float(result['arch_ce']), 'epoch': int(result['epoch']) + 1})

    # a trial NNI restarts continues its own search instead of failing on the existing run directory
    resume = (Path(cfg['run_dir']) / 'config.yaml').is_file()
    summary = run_search(cfg, resume=resume, epoch_callbacks=[report_epoch], log=log)
    cifar, imagenet = summary['genotype'], summary['genotype_imagenet']
    meta = {'source': 'bnas-nni search', 'trial': os.environ.get('NNI_TRIAL_JOB_ID', 'standalone'),
            'params': {k: v for k, v in params.items()}, 'supernet_val_acc': summary['supernet_val_acc']}
    save_genotype(cifar, out_dir / 'genotype.yaml', **meta)
    save_genotype(imagenet, out_dir / 'genotype_imagenet.yaml', **meta)
    acc = brief_train(cifar, cfg, final, seed=int(cfg['seed']), log=log)
    metric = {'default': float(acc),
              'supernet_val_acc': float(summary['supernet_val_acc'] or 0.0),
              'zeroise_ops': float(sum(op == 'zeroise' for cell in ('normal', 'reduce') for op, _ in cifar.cell(cell)))}
    channel.final(metric)
    log(f'final result: {metric}; genotype in {out_dir / "genotype.yaml"}')
    return metric




def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``trainers/search_trial.py``."""
    from ..cli import quiet_warnings, run_guarded

    def trial() -> int:
        quiet_warnings()
        channel = RealTrialChannel()          # capture before any NNI engine can swap it
        p = argparse.ArgumentParser(prog='search_trial.py', description=__doc__.splitlines()[0])
        p.add_argument('--config', default=None, help='search preset (default experiments/search_quick_fashion.yaml)')
        p.add_argument('--set', action='append', metavar='KEY=VALUE', help='override a search config key')
        p.add_argument('--final', action='append', metavar='KEY=VALUE',
                       help=f'override the brief final training ({", ".join(FINAL_DEFAULTS)})')
        args = p.parse_args(argv)
        config = args.config
        if config is None:
            from ..paths import experiments_dir

            config = str(experiments_dir() / 'search_quick_fashion.yaml')
        final = {k if k.startswith('final_') else f'final_{k}': v for k, v in parse_set_items(args.final).items()}
        run_trial(config, parse_set_items(args.set), final, channel=channel)
        return 0

    return run_guarded(trial, 'interrupted; the search run directory is resumable with bnas-nni search --resume')
