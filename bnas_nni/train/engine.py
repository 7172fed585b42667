"""The training driver shared by the CIFAR and ImageNet trainers, and checkpoint evaluation.

:func:`run_training` does, in order: resolve the config (nothing is written if it, the model or the
data are wrong), start the process group, take NNI parameters on rank 0 and broadcast them, build
model/data/optimizer/schedule, resume if asked, then per epoch: train, validate, report to NNI,
checkpoint, CSV/TensorBoard. :func:`run_evaluation` scores a bnas-nni or official checkpoint.
"""
from __future__ import annotations

import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError, DatasetError
from .config import default_run_dir, resolve_config

__all__ = ['resolve_model_config', 'build_network', 'make_loaders', 'run_training', 'run_evaluation']

MODEL_KEYS = ('genotype', 'init_channels', 'layers', 'num_classes', 'precision_rule', 'binarizer')


def resolve_model_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The network settings: the named model config with the trainer's overrides applied."""
    from ..networks import model_config

    overrides = {k: cfg.get(k) for k in MODEL_KEYS}
    overrides['dataset'] = 'imagenet' if cfg['task'] == 'imagenet' else 'cifar10'
    mc = model_config(cfg['model'], **overrides)
    if cfg['task'] == 'cifar' and cfg.get('num_classes') is None:
        mc['num_classes'] = 10
    return mc


def build_network(model_cfg: Mapping[str, Any]) -> nn.Module:
    from ..networks import build_model

    return build_model(dict(model_cfg))


def _num_classes_of(ds: Any) -> Optional[int]:
    base = getattr(ds, 'dataset', ds)
    classes = getattr(base, 'classes', None)
    return len(classes) if classes is not None else None


def _check_data(train_ds: Any, val_ds: Any, num_classes: int) -> None:
    for name, ds in (('training', train_ds), ('validation', val_ds)):
        if len(ds) == 0:
            raise DatasetError(f'the {name} set is empty')
        k = _num_classes_of(ds)
        if k is not None and k > num_classes:
            raise DatasetError(f'the {name} set has {k} classes but the model has {num_classes} outputs; '
                               f'set num_classes: {k}')


def make_loaders(cfg: Mapping[str, Any], train_ds: Any, val_ds: Any, ctx: Any):
    """Train loader over a ``DistributedSampler`` (shuffled with ``seed``; ``set_epoch`` per epoch, also
    for one process, so a resumed run sees the same order) and an unpadded sharded val loader."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from ..distributed import ShardSampler

    train_sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                       seed=int(cfg['seed']), drop_last=False)
    pin = ctx.device.type == 'cuda'
    workers = int(cfg['workers'])
    # no persistent workers: each epoch's workers are seeded from the main generator, which a
    # checkpoint restores, so a resumed run draws the same augmentations as an uninterrupted one
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=False)
    train = DataLoader(train_ds, batch_size=cfg['batch_size'], sampler=train_sampler, drop_last=False, **common)
    val = DataLoader(val_ds, batch_size=cfg['batch_size'], sampler=ShardSampler(len(val_ds), ctx.rank, ctx.world_size),
                     **common)
    return train, val, train_sampler


def _show_progress(cfg: Mapping[str, Any], ctx: Any) -> bool:
    mode = cfg.get('progress', 'auto')
    if not ctx.is_main or mode == 'never':
        return False
    return mode == 'always' or sys.stderr.isatty()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def run_training(config_path: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None, *,
                 task: Optional[str] = None, resume: Any = None,
                 on_step: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Train one network; returns ``{'run_dir', 'epochs_run', 'final', 'best_top1'}``.

    ``resume``: None/False to start fresh (refused if the run directory already has a checkpoint),
    True to continue from the run directory's checkpoint (or start fresh if none was written yet),
    or a checkpoint path / run directory to continue from.
    """
    from ..nni import trial as nni_trial
    from .checkpoint import (load_training_checkpoint, resolve_checkpoint_path, restore_rng,
                             save_training_checkpoint, unwrap)
    from ..distributed import broadcast_buffers, cleanup, init_distributed
    from .loops import evaluate, make_criterion, train_one_epoch
    from ..rundir import RunDir, setup_logging
    from .schedules import build_schedule
    from ..quant import attach_latent_constraint
    from ..data import build_datasets

    cfg = resolve_config(config_path, overrides, task)            # a bad config stops here, before any file
    if cfg.get('threads'):
        torch.set_num_threads(int(cfg['threads']))
    ctx = init_distributed(cfg['device'])
    run = None
    try:
        nni_params = nni_trial.trial_parameters(ctx)
        if nni_params:
            cfg = resolve_config(config_path, overrides, task, nni_params)
        model_cfg = resolve_model_config(cfg)
        model_cfg['name'] = cfg['model']
        net_cfg = {k: v for k, v in model_cfg.items() if k != 'name'}
        _seed_everything(int(cfg['seed']))                          # the same initial weights on every rank
        model = build_network(net_cfg)
        train_ds, val_ds = build_datasets(cfg)
        _check_data(train_ds, val_ds, int(net_cfg['num_classes']))

        run_dir = default_run_dir(cfg)
        cfg['run_dir'] = str(run_dir)
        run = RunDir(run_dir, ctx.is_main, tensorboard=bool(cfg['tensorboard']))
        ckpt_path: Optional[Path] = None
        if resume not in (None, False):
            ckpt_path = run.checkpoint_path if resume is True else resolve_checkpoint_path(resume)
            if resume is not True and not ckpt_path.is_file():
                raise CheckpointError(f'checkpoint {ckpt_path} does not exist')
            if not ckpt_path.is_file():
                ckpt_path = None
        elif run.checkpoint_path.is_file():
            raise ConfigError(f'{run_dir} already holds a checkpoint; pass --resume to continue it or choose '
                              'another run_dir/name')

        _seed_everything(int(cfg['seed']) + ctx.rank)               # per-rank augmentation / drop path
        device = ctx.device
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        model = model.to(device)
        if cfg['channels_last']:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg['lr'], momentum=cfg['momentum'],
                                    weight_decay=cfg['weight_decay'])
        attach_latent_constraint(optimizer, model)
        train_loader, val_loader, train_sampler = make_loaders(cfg, train_ds, val_ds, ctx)
        iters = len(train_loader) if cfg['max_train_batches'] is None else min(len(train_loader), cfg['max_train_batches'])
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*lr_scheduler.step.*')
            schedule = build_schedule(cfg, optimizer, iters)
        scaler = torch.amp.GradScaler(device.type) if cfg['amp'] == 'fp16' else None
        criterion = make_criterion(cfg['label_smoothing']).to(device)
        val_criterion = make_criterion(0.0).to(device)

        start_epoch, best_top1, last = 0, 0.0, {}
        state = None
        if ckpt_path is not None:
            state = load_training_checkpoint(ckpt_path, model)   # refuses another architecture
            optimizer.load_state_dict(state['optimizer'])
            schedule.load_state_dict(state['scheduler'])
            if scaler is not None and state.get('scaler'):
                scaler.load_state_dict(state['scaler'])
            start_epoch = int(state['epoch'])
            best_top1 = float(state.get('best_top1', 0.0))
            last = dict(state.get('metrics') or {})

        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            has_zero = 'zeroise' in unwrap(model).genotype.ops_used()
            model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                        find_unused_parameters=has_zero)

        run.create()
        log = setup_logging(ctx.is_main, run.log_path if ctx.is_main else None).info
        if state is None:
            run.save_config(cfg)
        else:
            run.truncate_rows(start_epoch)
            restore_rng(state['rng'])
            if ctx.rank:
                torch.manual_seed(int(cfg['seed']) + ctx.rank + 7919 * start_epoch)
        log(f'args = {cfg}')
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        log(f'model {cfg["model"]} genotype {unwrap(model).genotype.name or "<custom>"} '
            f'C={net_cfg["init_channels"]} L={net_cfg["layers"]} classes={net_cfg["num_classes"]} '
            f'param size = {n_params / 1e6:f}M; world {ctx.world_size} on {device}'
            + (f'; {ctx.backend}' if ctx.backend else ''))
        if state is not None:
            log(f'resumed from {ckpt_path} at epoch {start_epoch} (lr {schedule.lr():e})')
            saved = state.get('config') or {}
            changed = [f'{k} ({saved[k]!r} -> {cfg[k]!r})' for k in cfg
                       if k in saved and saved[k] != cfg[k] and k not in ('run_dir', 'progress')]
            if changed:
                log('note: the config differs from the checkpoint\'s in ' + ', '.join(changed)
                    + '; optimizer and schedule state continue from the checkpoint')
        reporter = nni_trial.TrialReporter(is_main=ctx.is_main)
        show = _show_progress(cfg, ctx)
        epochs = int(cfg['epochs'])

        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            train_sampler.set_epoch(epoch)
            drop = float(cfg['drop_path_prob']) * epoch / epochs
            unwrap(model).drop_path_prob = drop
            schedule.set_epoch_start(epoch)
            lr = schedule.lr()
            log(f'epoch {epoch} lr {lr:e}')
            tr = train_one_epoch(model, train_loader, optimizer, criterion, epoch=epoch, ctx=ctx, schedule=schedule,
                                 grad_clip=cfg['grad_clip'], grad_clip_mode=cfg['grad_clip_mode'], amp=cfg['amp'],
                                 scaler=scaler, channels_last=cfg['channels_last'], report_freq=cfg['report_freq'],
                                 max_batches=cfg['max_train_batches'], show_progress=show, log=log, on_step=on_step)
            log(f"train_acc {tr['top1']:f}")
            broadcast_buffers(unwrap(model), ctx)                # every rank evaluates rank 0's model
            va = evaluate(model, val_loader, val_criterion, ctx=ctx, amp=cfg['amp'], channels_last=cfg['channels_last'],
                          report_freq=cfg['report_freq'], max_batches=cfg['max_val_batches'], show_progress=show, log=log)
            log(f"valid_acc {va['top1']:f}")
            log(f"valid_acc_top5 {va['top5']:f}")
            best_top1 = max(best_top1, va['top1'])
            last = {'epoch': epoch, 'lr': lr, 'drop_path_prob': drop, 'train_loss': tr['loss'], 'train_top1': tr['top1'],
                    'train_top5': tr['top5'], 'valid_loss': va['loss'], 'valid_top1': va['top1'],
                    'valid_top5': va['top5'], 'epoch_seconds': round(time.time() - t0, 3)}
            reporter.intermediate(va['top1'], top5=va['top5'], loss=va['loss'])
            if ctx.is_main:
                save_training_checkpoint(run.checkpoint_path, model=model, optimizer=optimizer,
                                         scheduler_state=schedule.state_dict(), epoch=epoch + 1, config=cfg,
                                         scaler=scaler, metrics=last, best_top1=best_top1)
                run.log_epoch(last)
            ctx.barrier()
        if start_epoch >= epochs:
            log(f'nothing to do: the checkpoint already finished {start_epoch} of {epochs} epochs')
        if last:
            reporter.final(last['valid_top1'], top5=last['valid_top5'], loss=last['valid_loss'], best_top1=best_top1)
            log(f"final valid_acc {last['valid_top1']:f} top5 {last['valid_top5']:f} best {best_top1:f}")
        return {'run_dir': str(run_dir), 'epochs_run': max(0, epochs - start_epoch), 'final': last,
                'best_top1': best_top1}
    finally:
        if run is not None:
            run.close()
        cleanup(ctx)


def run_evaluation(cfg: Dict[str, Any], checkpoint: str | os.PathLike, *, official: bool = False,
                   layout: Optional[str] = None) -> Dict[str, float]:
    """Top-1/top-5 of a checkpoint on the config's validation set (whole set, all ranks).

    ``official``: the file comes from ``gistvision/bnas`` (``_ops``/``preprocess*_red``/``module.``
    keys are mapped). Our own checkpoints are refused if their architecture differs from the model.
    """
    from ..checkpoints import load_checkpoint_into
    from ..data import build_dataset
    from .checkpoint import read_checkpoint
    from ..distributed import cleanup, init_distributed
    from .loops import evaluate, make_criterion
    from ..rundir import setup_logging

    if cfg.get('threads'):
        torch.set_num_threads(int(cfg['threads']))
    model_cfg = resolve_model_config(cfg)
    model = build_network(model_cfg)
    path = Path(checkpoint)
    obj = read_checkpoint(path)
    layout = layout or ('official' if official else 'auto')
    try:
        info = load_checkpoint_into(model, obj, layout=layout)
    except CheckpointError as exc:
        raise CheckpointError(f'{path}: {exc}') from None
    val_ds = build_dataset(cfg, 'val')
    _check_data(val_ds, val_ds, int(model_cfg['num_classes']))
    ctx = init_distributed(cfg['device'])
    try:
        log = setup_logging(ctx.is_main).info
        model = model.to(ctx.device)
        if cfg['channels_last']:
            model = model.to(memory_format=torch.channels_last)
        from torch.utils.data import DataLoader

        from ..distributed import ShardSampler

        loader = DataLoader(val_ds, batch_size=cfg['batch_size'], sampler=ShardSampler(len(val_ds), ctx.rank, ctx.world_size),
                            num_workers=int(cfg['workers']), pin_memory=ctx.device.type == 'cuda')
        log(f"evaluating {path} ({info.get('layout')} layout) as {cfg['model']} "
            f"C={model_cfg['init_channels']} L={model_cfg['layers']} precision rule {model_cfg.get('precision_rule') or 'standard'}")
        res = evaluate(model, loader, make_criterion(0.0).to(ctx.device), ctx=ctx, amp=cfg['amp'],
                       channels_last=cfg['channels_last'], report_freq=cfg['report_freq'],
                       max_batches=cfg['max_val_batches'], show_progress=_show_progress(cfg, ctx), log=log)
        return res
    finally:
        cleanup(ctx)
