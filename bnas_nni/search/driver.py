"""The resumable search driver of ``bnas-nni search``: a plain loop around :class:`BinaryDartsModule`.

:class:`SearchDriver` builds the supernet (``strategy.mutate_model``) and the strategy's one-shot module,
the weight optimizer (:func:`bnas_nni.train.optim.build_optimizer`: SGD with the latent-weight step) and
the module's alpha optimizer, then per epoch sets the paper's weight learning rate, runs the module's
architecture and weight steps on the two halves of the training split, evaluates the supernet without
autograd, records the epoch (selection, genotypes, run directory) and checkpoints.

Run directory (see :mod:`bnas_nni.search.record` for the per-epoch files): ``config.yaml``,
``checkpoint.pt`` (after every epoch, atomic: weights, alphas, both optimizers, RNG states, history,
best epoch), ``genotype.yaml`` / ``genotype_imagenet.yaml``, ``alpha_history.json``, ``metrics.csv``,
``log.txt`` and ``tb/``. A ``KeyboardInterrupt`` or a kill leaves the last completed epoch's checkpoint,
and ``run(resume=True)`` continues exactly (same batches, same augmentations, same updates).

Data-parallel (``dist``: a :class:`~bnas_nni.distributed.DistContext` of several ranks, see
:mod:`bnas_nni.search.data_parallel`): every rank trains the same supernet on its shard of both halves
(:class:`~bnas_nni.search.data_parallel.EpochShardSampler`, per-process ``batch_size``), the module's
``grad_sync`` seam averages each step's own gradients, ``sync_bn`` normalises with the statistics over
all ranks, BN running statistics are averaged and the supernet accuracy summed over all ranks after
every epoch, and the ranks' alphas, genotype and weights are compared before the epoch is recorded.
Only rank 0 writes the run directory. Augmentations are drawn per rank from a generator seeded by
(seed, epoch, rank), so a resumed run with the same number of ranks continues exactly; a run may also
resume with another number of ranks (the checkpoint holds one copy of the replicated state).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import load_run_checkpoint, save_checkpoint
from ..console import log as console_log
from ..console import progress
from ..distributed import (
    DistContext,
    ShardSampler,
    all_reduce_sums,
    average_buffers,
    broadcast_module,
    broadcast_object,
    collective_errors,
)
from ..errors import CheckpointError, ConfigError
from ..io import append_text
from ..rundir import RunDir
from ..seeding import capture_rng, restore_rng, seed_everything
from ..train.optim import build_optimizer
from .binary_darts import BinaryDARTS, edge_probabilities
from .data_parallel import (
    EpochShardSampler,
    GradientSync,
    check_same_architecture,
    check_world_fits,
    enable_sync_batch_norm,
)
from .objective import diversity_weight, search_lr
from .record import SearchRecorder, search_csv_fields

__all__ = ['SearchDriver', 'SupernetModule']


class SupernetModule(pl.LightningModule):
    """The smallest training module a one-shot module can wrap: the supernet and its forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def set_model(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Cycle:
    """Endless iteration over a loader, re-shuffled on every pass (the architecture batch stream)."""

    def __init__(self, make_iter: Callable[[int], Iterator]) -> None:
        self.make_iter = make_iter
        self.passes = 0
        self.it: Optional[Iterator] = None

    def __next__(self):
        if self.it is None:
            self.it = self.make_iter(self.passes)
        try:
            return next(self.it)
        except StopIteration:
            self.passes += 1
            self.it = self.make_iter(self.passes)
            return next(self.it)


class SearchDriver:
    """Runs :class:`BinaryDARTS` on a :class:`~bnas_nni.space.BNASSpace` with a run directory.

    ``space`` is mutated in place into the supernet. ``train_data`` and ``val_data`` are the two halves of
    the training set (augmented); ``eval_data`` is the validation half without augmentation (used for the
    per-epoch supernet accuracy; defaults to ``val_data``). Accuracies are in percent. ``dist`` runs it
    data-parallel (see the module docstring); ``batch_size`` is then per process.
    """

    def __init__(self, space: nn.Module, strategy: BinaryDARTS, *, train_data: Any, val_data: Any,
                 eval_data: Any = None, run_dir: Union[str, os.PathLike], epochs: int = 50, batch_size: int = 64,
                 lr: float = 0.025, lr_min: float = 0.001, momentum: float = 0.9, weight_decay: float = 3e-4,
                 grad_clip: Optional[float] = None, seed: int = 2, workers: int = 0,
                 max_train_batches: Optional[int] = None, max_val_batches: Optional[int] = None,
                 device: Union[str, torch.device] = 'cpu', progress: bool = False, tensorboard: bool = True,
                 channels_last: bool = False, log_prob_every: int = 10, name: str = 'search',
                 epoch_callbacks: Sequence[Callable[[Dict[str, Any], 'SearchDriver'], None]] = (),
                 log: Callable[[str], None] = console_log, config: Optional[Dict[str, Any]] = None,
                 dist: Optional[DistContext] = None, sync_bn: bool = False) -> None:
        if epochs < 1 or batch_size < 1:
            raise ConfigError(f'epochs and batch_size must be >= 1, got {epochs} and {batch_size}')
        if not (lr > 0 and 0 <= lr_min <= lr):
            raise ConfigError(f'need lr > 0 and 0 <= lr_min <= lr, got lr={lr}, lr_min={lr_min}')
        self.strategy = strategy
        self.dist = dist if dist is not None else DistContext(device=torch.device(device))
        check_world_fits(len(train_data), len(val_data), int(batch_size), self.dist)
        self.rundir = RunDir(run_dir, is_main=self.dist.is_main, tensorboard=tensorboard,
                             csv_fields=search_csv_fields(getattr(strategy, 'latency', None) is not None))
        self.run_dir = self.rundir.path
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.lr, self.lr_min = lr, lr_min
        self.grad_clip = grad_clip
        self.seed, self.workers = int(seed), int(workers)
        self.max_train_batches, self.max_val_batches = max_train_batches, max_val_batches
        self.device = torch.device(device)
        self.progress = progress
        self.log_prob_every = max(1, int(log_prob_every))
        self.name = name
        self.epoch_callbacks = list(epoch_callbacks)
        self._log = log
        self.config = dict(config or {})
        self.train_data, self.val_data = train_data, val_data
        self.eval_data = eval_data if eval_data is not None else val_data

        self.channels_last = bool(channels_last)
        self.model = strategy.mutate_model(space).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.module = strategy.configure_oneshot_module(SupernetModule(self.model))
        self.alphas = self.module.arch_parameters()
        if not self.alphas:
            raise ConfigError('the space has no BNAS cells to search')
        self.sync_bn = bool(sync_bn) and self.dist.distributed
        self.synced_bns = 0
        if self.dist.distributed:
            broadcast_module(self.module, self.dist)          # every rank starts from rank 0's supernet
            self.module.grad_sync = GradientSync(self.dist)
            if self.sync_bn:
                self.synced_bns = enable_sync_batch_norm(self.model, self.dist)
        self.weights = self.module.weight_parameters()
        self.w_optim = build_optimizer(self.model, optimizer='sgd', lr=lr, momentum=momentum,
                                       weight_decay=weight_decay, params=self.weights)
        self.a_optim = self.module.configure_architecture_optimizers()
        self.recorder = SearchRecorder(self.rundir, name=name, epochs=self.epochs, log=self._log_line)
        self.start_epoch = 0
        self.global_step = 0

    # ------------------------------------------------------------------ the module's state

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.module.history

    @property
    def best(self) -> Dict[str, Any]:
        return self.module.best

    def genotypes(self, name: Optional[str] = None):
        """(CIFAR, ImageNet) genotypes of the kept alphas (the current ones before any epoch ended)."""
        return self.module.genotypes(self.name if name is None else name)

    # ------------------------------------------------------------------ data

    def _loader(self, data: Any, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
        """This rank's loader: a shuffled shard (one rank: the whole set in ``RandomSampler`` order) or,
        for evaluation, an unpadded shard of the first ``max_val_batches`` batches."""
        gen = torch.Generator()
        gen.manual_seed(seed)
        rank, world = self.dist.rank, self.dist.world_size
        if shuffle:
            sampler: Any = EpochShardSampler(len(data), rank, world, gen)
        else:
            n = len(data) if self.max_val_batches is None else min(len(data), self.max_val_batches * self.batch_size)
            sampler = ShardSampler(n, rank, world)
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, sampler=sampler, generator=gen,
                                           num_workers=self.workers, drop_last=False,
                                           pin_memory=self.device.type == 'cuda')

    def batches_per_epoch(self) -> int:
        """Steps per epoch (per rank when data-parallel)."""
        n = math.ceil(math.ceil(len(self.train_data) / self.dist.world_size) / self.batch_size)
        return min(n, self.max_train_batches) if self.max_train_batches else n

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.rundir.checkpoint_path

    def save_checkpoint(self) -> None:
        """Rank 0 writes the (replicated) state; the generator states are rank 0's."""
        if not self.dist.is_main:
            return
        save_checkpoint(self.model, self.checkpoint_path, kind='search', epoch=self.start_epoch,
                        global_step=self.global_step, epochs=self.epochs, w_optim=self.w_optim.state_dict(),
                        a_optim=self.a_optim.state_dict(), rng=capture_rng(), config=self.config,
                        world_size=self.dist.world_size, **self.module.selection_state())

    def load_checkpoint(self, path: Optional[Union[str, os.PathLike]] = None) -> bool:
        """Restore from ``path`` (default: the run directory's checkpoint); False when there is none.
        Data-parallel: rank 0 reads the file and hands its content to the other ranks."""
        path = Path(path) if path else self.checkpoint_path
        state: Optional[Dict[str, Any]] = None
        with collective_errors(self.dist):
            if self.dist.is_main and path.is_file():
                try:
                    state = load_run_checkpoint(path, self.model, 'search')
                except CheckpointError as exc:
                    raise ConfigError(f'cannot resume the search: {exc}') from None
        if self.dist.distributed:
            state = broadcast_object(state, self.dist)
            if state is not None:
                broadcast_module(self.model, self.dist)
        if state is None:
            return False
        saved_world = int(state.get('world_size') or 1)
        if saved_world != self.dist.world_size:
            self._log_line(f'note: the checkpoint was written by {saved_world} process(es), this run has '
                           f'{self.dist.world_size}; batch_size {self.batch_size} is per process, so the batch '
                           f'over all processes goes from {saved_world * self.batch_size} to '
                           f'{self.dist.world_size * self.batch_size}')
        self.w_optim.load_state_dict(state['w_optim'])
        self.a_optim.load_state_dict(state['a_optim'])
        self.start_epoch = int(state['epoch'])
        self.global_step = int(state['global_step'])
        self.module.load_selection_state(state)
        restore_rng(state['rng'])
        return True

    # ------------------------------------------------------------------ steps

    def _log_line(self, text: str) -> None:
        if not self.dist.is_main:
            return
        self._log(text)
        if self.rundir.is_main:
            append_text(self.rundir.log_path, text + '\n')

    @torch.no_grad()
    def _entropy_now(self) -> float:
        return float(self.module.arch_entropy())

    def arch_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Dict[str, float]:
        return self.module.arch_step(lambda: F.cross_entropy(self.model(x), y), epoch, self.a_optim,
                                     self.global_step)

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> Tuple[float, int]:
        def compute():
            logits = self.model(x)
            return F.cross_entropy(logits, y), logits

        loss, logits = self.module.weight_step(compute, epoch, self.w_optim, self.grad_clip, self.global_step)
        return loss, int((logits.argmax(-1) == y).sum())

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, float]:
        """(accuracy in percent, mean loss) of the supernet on ``eval_data`` (the first ``max_val_batches``
        batches; BN in eval mode, no autograd), summed over all ranks' shards."""
        self.model.eval()
        hits = seen = 0
        loss_sum = 0.0
        try:
            for x, y in self._loader(self.eval_data, False, 0):
                x, y = self._to_device(x), y.to(self.device)
                out = self.model(x)
                loss_sum += float(F.cross_entropy(out, y, reduction='sum'))
                hits += int((out.argmax(-1) == y).sum())
                seen += int(y.numel())
        finally:
            self.model.train()
        total = all_reduce_sums({'hits': hits, 'seen': seen, 'loss': loss_sum}, self.dist)
        return 100.0 * total['hits'] / max(total['seen'], 1), total['loss'] / max(total['seen'], 1)

    def _progress(self, total: int, epoch: int):
        if not self.progress:
            return None
        return progress(total=total, desc=f'search {epoch + 1}/{self.epochs}', enabled=True)

    def _log_probs(self, tb: Any, step: int) -> None:
        for edge, probs in edge_probabilities(self.model).items():
            for op, p in probs.items():
                tb.add_scalar(f'prob/{edge}/{op}', p, step)

    def run_epoch(self, epoch: int) -> Dict[str, Any]:
        """Train one epoch, evaluate, record it (selection and run directory); returns the history record."""
        t0 = time.time()
        lr = search_lr(epoch, self.epochs, self.lr, self.lr_min)
        for group in self.w_optim.param_groups:
            group['lr'] = lr
        self.module.begin_epoch()
        self.model.train()
        if self.dist.distributed:        # per-rank augmentations, a function of (seed, epoch, rank) only
            seed_everything(self.seed * 1_000_003 + 7919 * epoch + 104_729 * (self.dist.rank + 1))
        train_loader = self._loader(self.train_data, True, self.seed * 1_000_003 + 2 * epoch)
        val_stream = _Cycle(lambda k: iter(self._loader(self.val_data, True,
                                                        self.seed * 1_000_003 + 2 * epoch + 1 + 7919 * k)))
        total = self.batches_per_epoch()
        bar = self._progress(total, epoch)
        tb = self.rundir.writer()
        sums = {'loss': 0.0, 'hits': 0, 'seen': 0, 'arch_ce': 0.0, 'arch_loss': 0.0, 'steps': 0}
        warm = epoch < self.module.warmup_epochs
        try:
            for step, (x, y) in enumerate(train_loader):
                if step >= total:
                    break
                xv, yv = next(val_stream)
                x, y = self._to_device(x), y.to(self.device, non_blocking=True)
                xv, yv = self._to_device(xv), yv.to(self.device, non_blocking=True)
                arch = ({'arch_loss': float('nan'), 'arch_ce': float('nan'), 'entropy': self._entropy_now()}
                        if warm else self.arch_step(xv, yv, epoch))
                loss, hits = self.weight_step(x, y, epoch)
                n = int(y.numel())
                sums['loss'] += loss * n
                sums['hits'] += hits
                sums['seen'] += n
                sums['arch_ce'] += arch['arch_ce']
                sums['arch_loss'] += arch['arch_loss']
                sums['steps'] += 1
                self.global_step += 1
                if tb is not None:
                    tb.add_scalar('loss/train', loss, self.global_step)
                    tb.add_scalar('loss/arch_ce', arch['arch_ce'], self.global_step)
                    tb.add_scalar('loss/arch', arch['arch_loss'], self.global_step)
                    tb.add_scalar('arch/entropy', arch['entropy'], self.global_step)
                    if arch.get('expected_latency_ms') is not None:
                        tb.add_scalar('arch/expected_latency_ms', arch['expected_latency_ms'], self.global_step)
                    tb.add_scalar('lr', lr, self.global_step)
                    if self.global_step % self.log_prob_every == 0:
                        self._log_probs(tb, self.global_step)
                if bar is not None:
                    bar.set_postfix(loss=f'{loss:.3f}', arch_ce=f'{arch["arch_ce"]:.3f}', H=f'{arch["entropy"]:.3f}')
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if self.dist.distributed:
            sums = all_reduce_sums(sums, self.dist)
            average_buffers(self.model, self.dist)     # one set of BN statistics to evaluate and checkpoint
        val_acc, val_loss = self.evaluate()
        check_same_architecture(self.module, epoch, self.epochs, self.dist)
        steps = max(sums['steps'], 1)
        return self.module.record_epoch(
            epoch, val_acc, lr=lr, train_loss=sums['loss'] / max(sums['seen'], 1),
            train_acc=100.0 * sums['hits'] / max(sums['seen'], 1), arch_ce=sums['arch_ce'] / steps,
            arch_loss=sums['arch_loss'] / steps, val_loss=val_loss,
            diversity_weight=diversity_weight(epoch, self.module.lamda, self.module.tau),
            epoch_seconds=round(time.time() - t0, 3))

    # ------------------------------------------------------------------ the search

    def run(self, resume: bool = False):
        """Search from scratch (or from the run directory's checkpoint when ``resume``); returns the
        kept (CIFAR, ImageNet) genotypes."""
        self.rundir.acquire()
        try:
            resumed = resume and self.load_checkpoint()
            # rows past the checkpoint (a stop between an epoch's row and its checkpoint, even the first) go
            self.rundir.truncate_rows(self.start_epoch)
            if resumed:
                self._log_line(f'resumed from {self.checkpoint_path} at epoch {self.start_epoch}/{self.epochs}')
            self.module.epoch_callbacks = [self.recorder] + [
                (lambda cb: (lambda record, module: cb(record, self)))(cb) for cb in self.epoch_callbacks]
            for epoch in range(self.start_epoch, self.epochs):
                self.run_epoch(epoch)
                self.start_epoch = epoch + 1
                self.save_checkpoint()
                tb = self.rundir.writer()
                if tb is not None:
                    self._log_probs(tb, self.global_step)
                    tb.flush()
            self.recorder.write_outputs(self.module)
        finally:
            self.rundir.close()
        return self.genotypes()
