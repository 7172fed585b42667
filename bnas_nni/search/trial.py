"""A search run as an ``nnictl`` trial, so searches show up in the NNI web UI.

Each trial (``trainers/search_trial.py``, launched by ``experiments/nnictl_search_grid.yml``):

1. takes its hyperparameters from NNI: any search config key (``seed``, ``lamda``, ``tau`` ...,
   ``final_*`` for the brief final training), on top of ``--config`` and ``--set``;
2. runs the search (:func:`bnas_nni.search.run.run_search`, any registered strategy) in
   ``$NNI_OUTPUT_DIR/search`` and reports, after every epoch, an intermediate result
   ``{'default': supernet val acc %, 'arch_entropy': mean edge entropy, 'epoch': n}``;
3. writes the kept genotypes to ``$NNI_OUTPUT_DIR/genotype.yaml`` and ``genotype_imagenet.yaml``;
4. trains the derived network briefly (the one train loop, :func:`~bnas_nni.search.evaluators.evaluate_derived`)
   and reports the final result ``{'default': best supernet val acc %, 'derived_acc': test accuracy % of
   the derived cell, 'zeroise_ops': ...}``: ``default`` is the same quantity in intermediates and final.

Reports go through the trial command channel NNI opened for this process, captured before anything
else runs (:class:`bnas_nni.nni.trial.RealTrialChannel`). Outside NNI the same script runs standalone.

A trial may be a ``torchrun`` job (``torchrun --nproc_per_node 2 -m bnas_nni search ...`` in an
nnictl experiment, ``experiments/nnictl_search_ddp.yml``): every rank inherits NNI's variables, but
rank 0 alone takes the parameters (and hands them to the other ranks), reports, writes the genotypes
and trains the derived cell; the search itself is data-parallel (:mod:`bnas_nni.search.distributed`).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..console import log as console_log
from ..io import parse_set_items
from ..nni.trial import RealTrialChannel

__all__ = ['brief_train', 'run_trial', 'main']


def brief_train(genotype: Any, cfg: Mapping[str, Any], *, log=console_log) -> float:
    """Train the derived network of ``genotype`` for ``final_epochs`` with the one train loop (SGD,
    cosine, the binarizer's latent step) and return its top-1 accuracy (%) on the first
    ``final_test_subset`` test images."""
    import torch

    from ..data import build_dataset
    from ..networks import BNASNetwork
    from .evaluators import evaluate_derived

    data = {'dataset': cfg['dataset'], 'data': cfg['data'], 'download': cfg['download'],
            'image_size': cfg['final_image_size'] or cfg.get('image_size')}
    train = build_dataset({**data, 'train_subset': cfg['final_train_subset']}, 'train')
    test = build_dataset({**data, 'val_subset': cfg['final_test_subset']}, 'val')
    torch.manual_seed(int(cfg['seed']))
    model = BNASNetwork(genotype, init_channels=int(cfg['final_init_channels']), layers=int(cfg['final_layers']),
                        num_classes=10, dataset=cfg['dataset'])
    metric = evaluate_derived(model, train_data=train, val_data=test, reinit=False, report=False,
                              epochs=int(cfg['final_epochs']), batch_size=int(cfg['final_batch_size']),
                              lr=float(cfg['final_lr']), momentum=0.9, weight_decay=float(cfg['final_weight_decay']),
                              lr_min=0.0, seed=int(cfg['seed']), channels_last=True)
    log(f'derived cell: {cfg["final_epochs"]} epoch(s) on {len(train)} images, C={cfg["final_init_channels"]} '
        f'L={cfg["final_layers"]}: test acc {metric["default"]:.2f}% on {len(test)} test images '
        f'({metric["seconds"]:.1f}s)')
    return float(metric['default'])


def run_trial(config: Optional[str], overrides: Mapping[str, Any], *, channel: Optional[RealTrialChannel] = None,
              log=console_log) -> Dict[str, Any]:
    """Everything a search trial does (see the module docstring); returns the final metric (rank 0;
    ``{}`` on the other ranks of a torchrun trial)."""
    from ..distributed import cleanup
    from .distributed import peer_failures, quiet_off_main
    from .run import resolve_search_config, search_context

    out_dir = Path(os.environ.get('NNI_OUTPUT_DIR') or Path('runs') / 'search-trial')
    overrides = dict(overrides)
    overrides.setdefault('run_dir', str(out_dir / 'search'))
    overrides.setdefault('progress', 'never')
    base = resolve_search_config(config, overrides)                  # device and timeout, before NNI
    ctx = search_context(base)
    try:
        with peer_failures(ctx, base['dist_timeout']), quiet_off_main(ctx):
            return _run_trial(config, overrides, out_dir, ctx, channel, log if ctx.is_main else (lambda *_: None))
    finally:
        cleanup(ctx)


def _run_trial(config: Optional[str], overrides: Dict[str, Any], out_dir: Path, ctx: Any,
               channel: Optional[RealTrialChannel], log) -> Dict[str, Any]:
    from ..distributed import broadcast_object
    from ..genotypes import save_genotype
    from ..nni.trial import under_nni
    from .run import resolve_search_config, run_search

    params: Dict[str, Any] = {}
    if ctx.is_main:
        channel = channel or RealTrialChannel()
        if under_nni():
            import nni

            with channel.active():
                params = dict(nni.get_next_parameter() or {})
    params = broadcast_object(params, ctx)          # NNI hands one parameter set per trial, to rank 0
    cfg = resolve_search_config(config, overrides, nni_params=params)
    if params:
        log(f'trial parameters: {params}')

    def report_epoch(record: Mapping[str, Any], _: Any) -> None:
        if record.get('val_acc') is None or not ctx.is_main:
            return
        metric = {'default': float(record['val_acc']), 'epoch': int(record['epoch']) + 1}
        for key, name in (('entropy', 'arch_entropy'), ('arch_ce', 'arch_ce')):
            if record.get(key) is not None:
                metric[name] = float(record[key])
        channel.intermediate(metric)

    # a trial NNI restarts continues its own search instead of failing on the existing run directory
    resume = broadcast_object((Path(cfg['run_dir']) / 'checkpoint.pt').is_file() if ctx.is_main else None, ctx)
    summary = run_search(cfg, resume=resume, epoch_callbacks=[report_epoch], log=log, ctx=ctx)
    if not ctx.is_main:
        return {}
    cifar, imagenet = summary['genotype'], summary['genotype_imagenet']
    best = summary['supernet_val_acc']
    meta = {'source': 'bnas-nni search', 'trial': os.environ.get('NNI_TRIAL_JOB_ID', 'standalone'),
            'params': dict(params), 'supernet_val_acc': best}
    save_genotype(cifar, out_dir / 'genotype.yaml', **meta)
    save_genotype(imagenet, out_dir / 'genotype_imagenet.yaml', **meta)
    derived = brief_train(cifar, cfg, log=log)
    metric = {'default': float(best) if best is not None and best >= 0 else derived, 'derived_acc': derived,
              'zeroise_ops': float(sum(op == 'zeroise' for cell in ('normal', 'reduce') for op, _ in cifar.cell(cell)))}
    channel.final(metric)
    log(f'final result: {metric}; genotype in {out_dir / "genotype.yaml"}')
    return metric


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``trainers/search_trial.py``."""
    from ..cli import quiet_warnings, run_guarded

    def trial() -> int:
        quiet_warnings()
        # capture before any NNI engine can swap it (rank 0 of a torchrun trial alone talks to NNI)
        channel = RealTrialChannel() if int(os.environ.get('RANK', '0')) == 0 else None
        p = argparse.ArgumentParser(prog='search_trial.py', description=__doc__.splitlines()[0])
        p.add_argument('--config', default=None, help='search preset (default experiments/search_quick_fashion.yaml)')
        p.add_argument('--set', action='append', metavar='KEY=VALUE', help='override a search config key')
        p.add_argument('--final', action='append', metavar='KEY=VALUE',
                       help='override the brief final training (final_epochs, final_lr ...; the final_ may be left out)')
        args = p.parse_args(argv)
        config = args.config
        if config is None:
            from ..paths import experiments_dir

            config = str(experiments_dir() / 'search_quick_fashion.yaml')
        overrides = parse_set_items(args.set)
        overrides.update({k if k.startswith('final_') else f'final_{k}': v
                          for k, v in parse_set_items(args.final).items()})
        run_trial(config, overrides, channel=channel)
        return 0

    return run_guarded(trial, 'interrupted; the search run directory is resumable with bnas-nni search --resume')
