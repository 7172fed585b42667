"""The training driver (trainers, ``bnas-nni train``) and checkpoint evaluation (``bnas-nni eval``).

:func:`run_training` does, in order: resolve the config (nothing is written if it, the model or the
data are wrong), start the process group, take NNI parameters on rank 0 and broadcast them, lock the
run directory, then run the recipe's stages. A stage builds model/data, the recipe's optimizer,
schedule and loss, resumes or warm-starts if asked, and per epoch trains, validates, reports to NNI,
checkpoints and logs a CSV row and TensorBoard scalars. A single-stage recipe (``paper``) uses the
run directory itself; a multi-stage recipe gives each stage a subdirectory (``<run_dir>/<stage>``) and
starts each stage from the previous one's final weights when the recipe says so; when the last stage
is done, its checkpoint is copied to ``<run_dir>/checkpoint.pt`` too, so that the run directory names its
final model as a single-stage run's does (``eval``/``export --checkpoint <run_dir>``).

Metrics are reported in percent everywhere (logs, CSV, NNI): ``default`` is the validation top-1.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..checkpoints import (
    load_checkpoint_into,
    load_run_checkpoint,
    read_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
    unwrap,
)
from ..config import TRAIN, TrainConfig, family_of, resolve
from ..data import build_dataset, build_datasets, describe_dataset, record_dataset
from ..distributed import ShardSampler, broadcast_buffers, cleanup, init_distributed
from ..errors import CheckpointError, ConfigError, DatasetError
from ..integrations.nni import trial as nni_trial
from ..io import atomic_path
from ..rundir import RunDir, setup_logging
from ..seeding import capture_rng, restore_rng, seed_everything
from .loop import evaluate, train_one_epoch
from .model import build_network, resolve_model_config
from .recipes import Recipe, Stage, StageRun, get_recipe, recipe_defaults_hook

__all__ = ['resolve_train_config', 'resolve_model_config', 'build_network', 'make_loaders', 'run_training',
           'run_evaluation', 'default_run_dir', 'TRAIN_CSV_FIELDS']

TRAIN_CSV_FIELDS = ['epoch', 'lr', 'drop_path_prob', 'train_loss', 'train_top1', 'train_top5', 'valid_loss',
                    'valid_top1', 'valid_top5', 'epoch_seconds']
#: keys that matter only for one family; the ``args =`` log line leaves them out elsewhere
_IMAGENET_ONLY = ('val_resize', 'color_jitter', 'restart_epochs', 'grad_clip_mode')
_CIFAR_ONLY = ('onecycle_min_factor', 'onecycle_momentum', 'onecycle_annihilation', 'onecycle_reduce_factor')


def resolve_train_config(path: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
                         nni_params: Optional[Mapping[str, Any]] = None, *,
                         defaults: Optional[Mapping[str, Any]] = None,
                         base: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """The training config: section defaults <- ``defaults`` (a trainer script's) <- the recipe's defaults
    <- YAML <- ``overrides`` <- NNI parameters (see :mod:`bnas_nni.config`)."""
    schema = TRAIN.with_defaults(**dict(defaults or {}))
    cfg = resolve(schema, path, overrides, nni_params, base=base, defaults_hook=recipe_defaults_hook)
    get_recipe(cfg.recipe)       # an unknown recipe is one line
    return cfg


def default_run_dir(cfg: TrainConfig) -> Path:
    """``run_dir``, or ``$NNI_OUTPUT_DIR/run`` in an NNI trial, or ``runs/<name>``."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if os.environ.get('NNI_OUTPUT_DIR'):
        return Path(os.environ['NNI_OUTPUT_DIR']) / 'run'
    return Path('runs') / (cfg.name or f"{family_of(cfg.dataset)}-{cfg.model}")


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


def make_loaders(cfg: TrainConfig, train_ds: Any, val_ds: Any, ctx: Any):
    """Train loader over a ``DistributedSampler`` (shuffled with ``seed``; ``set_epoch`` per epoch, also
    for one process, so a resumed run sees the same order) and an unpadded sharded val loader."""
    train_sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                       seed=int(cfg.seed), drop_last=False)
    pin = ctx.device.type == 'cuda'
    workers = int(cfg.workers)
    # no persistent workers: each epoch's workers are seeded from the main generator, which a
    # checkpoint restores, so a resumed run draws the same augmentations as an uninterrupted one
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=False)
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=False, **common)
    val = DataLoader(val_ds, batch_size=cfg.batch_size, sampler=ShardSampler(len(val_ds), ctx.rank, ctx.world_size),
                     **common)
    return train, val, train_sampler


def _show_progress(cfg: TrainConfig, ctx: Any) -> bool:
    mode = cfg.progress
    if not ctx.is_main or mode == 'never':
        return False
    return mode == 'always' or sys.stderr.isatty()


def _args_line(cfg: TrainConfig) -> str:
    """The resolved config for the log, without the other family's keys."""
    skip = _CIFAR_ONLY if family_of(cfg.dataset) == 'imagenet' else _IMAGENET_ONLY
    return 'args = ' + str({k: v for k, v in cfg.items() if k not in skip})


def run_training(config_path: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None, *,
                 defaults: Optional[Mapping[str, Any]] = None, resume: Any = None,
                 on_step: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Train one network with its recipe; returns ``{'run_dir', 'epochs_run', 'final', 'best_top1', 'stages'}``.

    ``resume``: None/False to start fresh (refused if the run directory already has a checkpoint),
    True to continue from the run directory's checkpoint(s) (or start fresh if none was written yet),
    or a checkpoint path / run directory to continue from (single-stage recipes).
    """
    cfg = resolve_train_config(config_path, overrides, defaults=defaults)   # a bad config stops here, before any file
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    ctx = init_distributed(cfg.device)
    top = None
    try:
        nni_params = nni_trial.trial_parameters(ctx)
        if nni_params:
            cfg = resolve_train_config(config_path, overrides, nni_params, defaults=defaults)
        recipe = get_recipe(cfg.recipe)
        stages = recipe.stages(cfg)
        recipe.check(cfg)                       # the model config and the teacher, before any file is written
        run_dir = default_run_dir(cfg)
        cfg.run_dir = str(run_dir)
        resume_path = None
        if resume not in (None, False, True):
            if len(stages) > 1:
                raise ConfigError(f'recipe {recipe.name!r} has {len(stages)} stages; resume it with --resume '
                                  '(its run directory), not a checkpoint path')
            resume_path = resolve_checkpoint_path(resume)
            if not resume_path.is_file():
                raise CheckpointError(f'checkpoint {resume_path} does not exist')
        top = RunDir(run_dir, ctx.is_main)
        top.check_free()                                            # a directory in use: say so first
        stage_dirs = [run_dir if len(stages) == 1 else run_dir / (s.name or f'stage{i + 1}')
                      for i, s in enumerate(stages)]
        final = run_dir / 'checkpoint.pt'      # a multi-stage run's copy of its last stage's (see the docstring)
        if not resume and any(f.is_file() for f in [d / 'checkpoint.pt' for d in stage_dirs] + [final]):
            raise ConfigError(f'{run_dir} already holds a checkpoint; pass --resume to continue it or choose '
                              'another run_dir/name')
        if resume is True and not any((d / 'checkpoint.pt').is_file() for d in stage_dirs):
            raise ConfigError(f'nothing to resume: {stage_dirs[0] / "checkpoint.pt"} does not exist; check the '
                              'run directory, or start without --resume')
        top.acquire()                                               # one writer per run directory
        log = setup_logging(ctx.is_main, top.log_path if ctx.is_main else None).info
        if len(stages) > 1:
            top.save_config(cfg)
        reporter = nni_trial.TrialReporter(is_main=ctx.is_main)
        results: List[Dict[str, Any]] = []
        previous: Optional[Path] = None
        for stage, stage_dir in zip(stages, stage_dirs):
            stage_cfg = (resolve_train_config(base=cfg, overrides=dict(stage.overrides)) if stage.overrides
                         else cfg.replace())
            stage_cfg.run_dir = str(stage_dir)
            if len(stages) > 1:
                log(f'stage {stage.name}: ' + ', '.join(f'{k}={v!r}' for k, v in stage.overrides.items()))
            init = previous if stage.init_from_previous else (cfg.init_from or None)
            results.append(_run_stage(stage_cfg, recipe, stage, ctx, log, reporter, resume=resume,
                                      resume_path=resume_path, init_from=init, on_step=on_step))
            previous = stage_dir / 'checkpoint.pt'
        if len(stages) > 1 and ctx.is_main and previous is not None and previous.is_file():
            with atomic_path(final) as tmp:
                shutil.copyfile(previous, tmp)
            log(f'final model: {final} (the checkpoint of stage {stages[-1].name})')
        last = results[-1]
        if last['final']:
            f = last['final']
            reporter.final(f['valid_top1'], top5=f['valid_top5'], loss=f['valid_loss'], best_top1=last['best_top1'])
            log(f"final valid_acc {f['valid_top1']:f} top5 {f['valid_top5']:f} best {last['best_top1']:f}")
        return {'run_dir': str(run_dir), 'epochs_run': sum(r['epochs_run'] for r in results), 'final': last['final'],
                'best_top1': last['best_top1'], 'stages': results}
    finally:
        if top is not None:
            top.close()
        cleanup(ctx)


def _run_stage(cfg: TrainConfig, recipe: Recipe, stage: Stage, ctx: Any, log: Callable[[str], None],
               reporter: Any, *, resume: Any, resume_path: Optional[Path], init_from: Optional[str | os.PathLike],
               on_step: Optional[Callable[[int, int], None]]) -> Dict[str, Any]:
    """One stage: build, resume or warm-start, train ``epochs`` epochs with the recipe's hooks (see
    :class:`~bnas_nni.train.recipes.Recipe`). The caller holds the run directory's lock."""
    model_cfg = resolve_model_config(cfg)
    seed_everything(int(cfg.seed))                               # the same initial weights on every rank
    model = build_network(model_cfg)
    train_ds, val_ds = build_datasets(cfg)
    _check_data(train_ds, val_ds, int(model_cfg['num_classes']))

    run = RunDir(cfg.run_dir, ctx.is_main, tensorboard=bool(cfg.tensorboard), csv_fields=TRAIN_CSV_FIELDS)
    ckpt_path: Optional[Path] = None
    if resume_path is not None:
        ckpt_path = resume_path
    elif resume and run.checkpoint_path.is_file():
        ckpt_path = run.checkpoint_path

    seed_everything(int(cfg.seed) + ctx.rank)                    # per-rank augmentation / drop path
    device = ctx.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = recipe.optimizer(model, cfg)
    train_loader, val_loader, train_sampler = make_loaders(cfg, train_ds, val_ds, ctx)
    iters = len(train_loader) if cfg.max_train_batches is None else min(len(train_loader), cfg.max_train_batches)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*lr_scheduler.step.*')
        schedule = recipe.schedule(optimizer, cfg, iters)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == 'fp16' else None
    criterion = recipe.loss(cfg, int(model_cfg['num_classes'])).to(device)

    start_epoch, best_top1, last = 0, 0.0, {}
    state = None
    if ckpt_path is not None:
        state = load_run_checkpoint(ckpt_path, model, 'train')     # refuses another architecture
        optimizer.load_state_dict(state['optimizer'])
        schedule.load_state_dict(state['scheduler'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        start_epoch = int(state['epoch'])
        best_top1 = float(state.get('best_top1', 0.0))
        last = dict(state.get('metrics') or {})
    elif init_from:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*different binarization.*')
            load_checkpoint_into(model, read_checkpoint(init_from))    # warm start: weights only
        log(f'initialised the weights from {init_from}')

    if ctx.distributed:
        has_zero = 'zeroise' in unwrap(model).genotype.ops_used()
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                    find_unused_parameters=has_zero)

    if ctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
    try:
        run.truncate_rows(start_epoch)          # rows past the checkpoint: a stop between row and checkpoint
        if state is None:
            run.save_config(cfg)
            if ctx.is_main:
                record_dataset(cfg, run.path)       # dataset.yaml: classes, channels, side, mean/std
        else:
            restore_rng(state['rng'])
            if ctx.rank:
                torch.manual_seed(int(cfg.seed) + ctx.rank + 7919 * start_epoch)
        log(_args_line(cfg))
        described = describe_dataset(cfg)
        if described:
            log(described)
        net = unwrap(model)
        n_params = sum(p.numel() for p in net.parameters())
        log(f'model {cfg.model} genotype {net.genotype.name or "<custom>"} '
            f'C={model_cfg["init_channels"]} L={model_cfg["layers"]} classes={model_cfg["num_classes"]} '
            f'param size = {n_params / 1e6:f}M; recipe {recipe.name}; world {ctx.world_size} on {device}'
            + (f'; {ctx.backend}' if ctx.backend else ''))
        if state is not None:
            log(f'resumed from {ckpt_path} at epoch {start_epoch} (lr {schedule.lr():e})')
            saved = state.get('config') or {}
            changed = [f'{k} ({saved[k]!r} -> {cfg[k]!r})' for k in cfg
                       if k in saved and saved[k] != cfg[k] and k not in ('run_dir', 'progress')]
            if changed:
                log('note: the config differs from the checkpoint\'s in ' + ', '.join(changed)
                    + '; optimizer and schedule state continue from the checkpoint')
        show = _show_progress(cfg, ctx)
        epochs = int(cfg.epochs)
        stage_run = StageRun(stage=stage, cfg=cfg, model=net, optimizer=optimizer, ctx=ctx, log=log,
                             run_dir=run.path, start_epoch=start_epoch, epochs=epochs)
        recipe.on_stage_start(stage_run)
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            train_sampler.set_epoch(epoch)
            drop = float(cfg.drop_path_prob) * epoch / epochs
            net.drop_path_prob = drop
            schedule.set_epoch_start(epoch)
            lr = schedule.lr()
            log(f'epoch {epoch} lr {lr:e}')
            options = recipe.on_epoch_start(stage_run, epoch) or {}
            tr = train_one_epoch(model, train_loader, optimizer, criterion, epoch=epoch, ctx=ctx, schedule=schedule,
                                 grad_clip=cfg.grad_clip, grad_clip_mode=cfg.grad_clip_mode, amp=cfg.amp,
                                 scaler=scaler, channels_last=cfg.channels_last, report_freq=cfg.report_freq,
                                 max_batches=cfg.max_train_batches, show_progress=show, log=log, on_step=on_step,
                                 **options)
            log(f"train_acc {tr['top1']:f}")
            recipe.on_epoch_trained(stage_run, epoch, tr)
            broadcast_buffers(net, ctx)                              # every rank evaluates rank 0's model
            va = evaluate(model, val_loader, ctx=ctx, amp=cfg.amp, channels_last=cfg.channels_last,
                          report_freq=cfg.report_freq, max_batches=cfg.max_val_batches, show_progress=show,
                          log=log)
            log(f"valid_acc {va['top1']:f}")
            log(f"valid_acc_top5 {va['top5']:f}")
            best_top1 = max(best_top1, va['top1'])
            last = {'epoch': epoch, 'lr': lr, 'drop_path_prob': drop, 'train_loss': tr['loss'],
                    'train_top1': tr['top1'], 'train_top5': tr['top5'], 'valid_loss': va['loss'],
                    'valid_top1': va['top1'], 'valid_top5': va['top5'], 'epoch_seconds': round(time.time() - t0, 3)}
            reporter.intermediate(va['top1'], top5=va['top5'], loss=va['loss'])
            if ctx.is_main:                          # the row, then the checkpoint (see RunDir.commit_epoch)
                run.commit_epoch(last, {f'{split}/{m}': last[f'{split}_{m}'] for split in ('train', 'valid')
                                        for m in ('top1', 'top5', 'loss')} | {'lr': lr},
                                 lambda: save_checkpoint(net, run.checkpoint_path, kind='train', epoch=epoch + 1,
                                                         optimizer=optimizer.state_dict(),
                                                         scheduler=schedule.state_dict(),
                                                         scaler=scaler.state_dict() if scaler is not None else None,
                                                         rng=capture_rng(), config=cfg.as_dict(), metrics=dict(last),
                                                         best_top1=float(best_top1)))
            ctx.barrier()
        if start_epoch >= epochs:
            log(f'nothing to do: the checkpoint already finished {start_epoch} of {epochs} epochs')
        result = {'run_dir': str(run.path), 'epochs_run': max(0, epochs - start_epoch), 'final': last,
                  'best_top1': best_top1}
        recipe.on_stage_end(stage_run, result)
        return result
    finally:
        run.close()


def run_evaluation(cfg: TrainConfig, checkpoint: str | os.PathLike, *, official: bool = False,
                   layout: Optional[str] = None) -> Dict[str, float]:
    """Top-1/top-5 of a checkpoint on the config's validation set (whole set, all ranks).

    ``official``: the file comes from ``gistvision/bnas`` (``_ops``/``preprocess*_red``/``module.``
    keys are mapped). Our own checkpoints are refused if their architecture differs from the model.
    """
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
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
    ctx = init_distributed(cfg.device)
    try:
        log = setup_logging(ctx.is_main).info
        model = model.to(ctx.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader = DataLoader(val_ds, batch_size=cfg.batch_size,
                            sampler=ShardSampler(len(val_ds), ctx.rank, ctx.world_size),
                            num_workers=int(cfg.workers), pin_memory=ctx.device.type == 'cuda')
        log(f"evaluating {path} ({info.get('layout')} layout) as {cfg.model} "
            f"C={model_cfg['init_channels']} L={model_cfg['layers']} precision rule "
            f"{model_cfg.get('precision_rule') or 'standard'}")
        return evaluate(model, loader, ctx=ctx, amp=cfg.amp, channels_last=cfg.channels_last,
                        report_freq=cfg.report_freq, max_batches=cfg.max_val_batches,
                        show_progress=_show_progress(cfg, ctx), log=log)
    finally:
        cleanup(ctx)
