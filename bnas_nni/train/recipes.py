"""Training recipes: the seam between *what* a network is trained with and the one train loop.

A :class:`Recipe` is chosen by name in the config (``recipe: paper``) and decides

* the **defaults** of the optimisation keys for a network family (``cifar`` or ``imagenet``): the
  optimizer, learning rate, weight decay (and ``weight_decay_binary`` for the binary convs' latent
  weights, a second parameter group), schedule, loss knobs, epochs;
* the **stages**: one for the paper recipes; several for multi-step recipes, each a set of config
  overrides (e.g. real-valued weights first), optionally initialised from the previous stage;
* the **optimizer** (:func:`bnas_nni.train.optim.optimizer_from_config`, which also attaches the
  binarizers' latent-weight step), the **schedule** (:func:`bnas_nni.train.schedules.build_schedule`)
  and the **loss** (:mod:`bnas_nni.train.losses`: cross entropy, or distillation when ``teacher`` is set);
* what happens **around each stage and epoch** through its hooks (see :class:`Recipe`): the base
  hooks re-estimate, freeze or renormalise the BN statistics as the ``bn_*`` keys say.

Everything a user may change stays a config key, so ``--set lr=0.1`` works with every recipe; a
recipe only moves the defaults. A new recipe is one module: subclass :class:`Recipe`, register an
instance with :func:`register_recipe`, and name the module in the config's ``imports:``.

Presets:

======================  ==========================================================================
``paper`` (cifar)       BNAS-A, official ``train.py`` with ``--learning_rate 0.05``: 600 epochs, batch
                        256, SGD momentum 0.9, wd 3e-6, the official one-cycle schedule per iteration
                        (with cycling momentum), drop path 0.2 * epoch / epochs, no clipping, CE.
``paper`` (imagenet)    BNAS-D..H, official ``train_imagenet.py``: 250 epochs, SGD 0.05, wd 3e-5,
                        cosine warm restarts every 50 epochs per iteration, label smoothing 0.1,
                        gradient clip 5 on the binary-weight gradient, no drop path.
``react`` (cifar)       ReActNet / AdamBNN two-step training of the ``react`` op set (RSign,
                        scaled-sign weights, RPReLU): step 1 binary activations with real weights,
                        step 2 binary weights too, started from step 1's weights; each step
                        ``epochs`` epochs (step 1: ``step1_epochs`` when set), batch 256, Adam
                        (0.9, 0.999) lr 5e-4 decayed linearly to 0 per iteration, weight decay on
                        conv weights only, 5e-6 in step 1 and ``step2_weight_decay`` (0) in step 2,
                        no drop path; distillation from ``teacher`` (else cross entropy); after
                        each step's last epoch the BN statistics are re-estimated on 100 training
                        batches, layer by layer with everything upstream in eval mode
                        (``bn_recalibration``, ``bn_recalibration_mode: eval``, precise BN of the
                        evaluated network; ``bn_freeze_epochs`` N instead
                        re-estimates them before step 2's last N epochs and trains those with the
                        statistics fixed, ``bn_renorm_epochs`` N with Batch Renormalization). 300 +
                        300 epochs, the paper recipe's 600 in all.
``react`` (imagenet)    the same with 256 + 256 epochs, lr 1.25e-3 (AdamBNN), batch 256.
======================  ==========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..config import TrainConfig, family_of
from ..data import build_dataset
from ..distributed import DistContext, broadcast_buffers
from ..errors import ConfigError
from ..networks import load_model_configs
from ..registry import Registry
from .loop import recalibrate_bn
from .losses import CrossEntropy, Distillation, TrainLoss
from .model import resolve_model_config
from .optim import optimizer_from_config
from .schedules import IterationSchedule, build_schedule
from .teacher import load_teacher

__all__ = ['Stage', 'StageRun', 'Recipe', 'PaperRecipe', 'ReactRecipe', 'RECIPES', 'register_recipe', 'get_recipe',
           'recipe_defaults_hook', 'recalibration_loader']


@dataclass(frozen=True)
class Stage:
    """One training run of a recipe: config ``overrides`` on top of the resolved config; with
    ``init_from_previous`` its network starts from the previous stage's final weights."""

    name: str = ''
    overrides: Mapping[str, Any] = field(default_factory=dict)
    init_from_previous: bool = False


@dataclass
class StageRun:
    """What a recipe's hooks see of the stage being trained, in this process.

    ``model`` is the network itself, never a DDP wrapper: what a hook changes in it is what the engine
    trains, evaluates and checkpoints. ``cfg`` is the stage's resolved config (its overrides applied);
    ``start_epoch`` is above 0 when the stage resumed from a checkpoint; ``epochs`` is the stage's length.
    """

    stage: Stage
    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ctx: DistContext
    log: Callable[[str], None]
    run_dir: Path
    start_epoch: int
    epochs: int


class Recipe:
    """Base recipe: one stage; the config's optimizer, schedule and loss; the BN-statistics keys.

    A recipe is a registered instance (one per name, shared by every run), so per-run state belongs in
    the :class:`StageRun` its hooks receive, never on ``self``. Subclasses override what differs:

    * :meth:`defaults` (config defaults per family), :meth:`stages`, :meth:`check`, :meth:`optimizer`,
      :meth:`schedule`, :meth:`loss` -- what is trained, decided before training starts;
    * the hooks, called by :func:`bnas_nni.train.runner.run_training` for every stage, in this order::

          on_stage_start(run)                         once, before the first epoch left to run
          for epoch in range(run.start_epoch, run.epochs):
              options = on_epoch_start(run, epoch)    after the epoch's lr is set and logged
              train_one_epoch(..., **options)
              on_epoch_trained(run, epoch, metrics)   before validation, the checkpoint and the CSV row
          on_stage_end(run, result)                   after the last checkpoint (also when none was left)

      ``on_epoch_start`` returns keyword arguments for this epoch's
      :func:`~bnas_nni.train.loop.train_one_epoch` (``freeze_bn``, ``renorm_bn``), or an empty mapping.
      What ``on_epoch_trained`` changes in the model is what is evaluated and saved for that epoch. Hooks
      run on every rank under torchrun: collective work happens on all ranks, files are written only
      where ``run.ctx.is_main``; under DDP change parameter values, not which ones require gradients. A
      resumed stage calls the hooks for the epochs it still runs only, so whatever a hook did to the model
      in earlier epochs must be in the checkpoint (weights, buffers) or be redone from ``run.start_epoch``.

    The base hooks implement the BN-statistics keys, so every recipe honours them: ``bn_recalibration``
    N re-estimates the BN statistics on N training batches (:func:`~bnas_nni.train.loop.recalibrate_bn`)
    after the stage's last epoch, or, with ``bn_freeze_epochs`` / ``bn_renorm_epochs`` K, before the
    stage's last K epochs, which then train with the statistics fixed / with Batch Renormalization. A
    subclass that overrides a hook calls ``super()`` to keep them.
    """

    name: str = ''
    description: str = ''

    def defaults(self, family: str) -> Dict[str, Any]:
        """Config defaults for a network family (``cifar`` or ``imagenet``)."""
        return {}

    def stages(self, cfg: TrainConfig) -> List[Stage]:
        return [Stage()]

    def optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return optimizer_from_config(model, dict(cfg))

    def schedule(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 iters_per_epoch: int) -> IterationSchedule:
        return build_schedule(dict(cfg), optimizer, iters_per_epoch)

    def check(self, cfg: TrainConfig) -> None:
        """Called before anything is written: the model config (op set, quantizers) and the teacher must
        be usable, else a one-line error. Recipes with other inputs extend it."""
        model_cfg = resolve_model_config(cfg)
        if cfg.teacher:
            load_teacher(cfg.teacher, num_classes=int(model_cfg['num_classes']), family=_family(cfg))

    def loss(self, cfg: TrainConfig, num_classes: int) -> TrainLoss:
        """The training loss: distillation from ``cfg.teacher`` when set, else cross entropy."""
        if cfg.teacher:
            return Distillation(load_teacher(cfg.teacher, num_classes=num_classes, family=_family(cfg)))
        return CrossEntropy(cfg.label_smoothing)

    # ----------------------------------------------------------------------------------------- hooks

    def on_stage_start(self, run: StageRun) -> None:
        """Once per stage, after the network is built, resumed or warm-started, before its first epoch."""

    def on_epoch_start(self, run: StageRun, epoch: int) -> Dict[str, Any]:
        """Before ``epoch`` trains: the first of the fixed-BN epochs re-estimates the statistics (when
        ``bn_recalibration`` is on); those epochs train with BN frozen or renormalised."""
        fixed = _fixed_bn_epochs(run.cfg, run.epochs)
        if fixed is None or epoch < fixed[1]:
            return {}
        mode, first = fixed
        if epoch == first:
            if run.cfg.bn_recalibration:
                reestimate_bn_statistics(run)
            span = f'epochs {first}-{run.epochs - 1}' if first < run.epochs - 1 else f'epoch {first}'
            run.log(f'{span} train with BN statistics fixed' if mode == 'freeze' else
                    f'{span} train with Batch Renormalization (forward with the running BN statistics)')
        return {'freeze_bn': mode == 'freeze', 'renorm_bn': mode == 'renorm'}

    def on_epoch_trained(self, run: StageRun, epoch: int, metrics: Mapping[str, float]) -> None:
        """After ``epoch``'s training (``metrics``: its loss/top1/top5): without fixed-BN epochs, the
        stage's last epoch re-estimates the BN statistics that its validation and checkpoint then use."""
        if (run.cfg.bn_recalibration and _fixed_bn_epochs(run.cfg, run.epochs) is None
                and epoch == run.epochs - 1):
            reestimate_bn_statistics(run)

    def on_stage_end(self, run: StageRun, result: Mapping[str, Any]) -> None:
        """After the stage (``result``: ``run_dir``, ``epochs_run``, ``final`` metrics, ``best_top1``)."""


def _family(cfg: TrainConfig) -> str:
    return family_of(cfg.dataset)


def _fixed_bn_epochs(cfg: TrainConfig, epochs: int) -> Optional[Tuple[str, int]]:
    """``('freeze' | 'renorm', first epoch)`` of the stage's epochs that train with the running BN
    statistics (``bn_freeze_epochs`` / ``bn_renorm_epochs``, which the config keeps exclusive); None if none."""
    for mode, key in (('freeze', 'bn_freeze_epochs'), ('renorm', 'bn_renorm_epochs')):
        n = min(int(cfg.get(key) or 0), epochs)
        if n:
            return mode, epochs - n
    return None


def recalibration_loader(cfg: TrainConfig, ctx: DistContext) -> DataLoader:
    """This rank's shuffled shard of the training images with the evaluation transform, for BN re-estimation
    (augmented crops have other statistics than the images the network is evaluated on)."""
    ds = build_dataset(dict(cfg), 'train-eval')
    sampler = DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=int(cfg.seed) + 1, drop_last=False)
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=int(cfg.workers),
                      pin_memory=ctx.device.type == 'cuda')


def reestimate_bn_statistics(run: StageRun) -> None:
    """Re-estimate the model's BN statistics on ``bn_recalibration`` training batches in
    ``bn_recalibration_mode``, then give every rank rank 0's."""
    cfg = run.cfg
    mode = cfg.bn_recalibration_mode or 'eval'
    seen = recalibrate_bn(run.model, recalibration_loader(cfg, run.ctx), int(cfg.bn_recalibration), ctx=run.ctx,
                          amp=cfg.amp, channels_last=cfg.channels_last, mode=mode)
    how = 'layer by layer in eval mode' if mode == 'eval' else 'in training mode'
    run.log(f'BN statistics re-estimated {how} on {seen} training images with the evaluation transform '
            "(rank 0's are kept)")
    broadcast_buffers(run.model, run.ctx)


class PaperRecipe(Recipe):
    """The official BNAS recipes (see the module docstring); behaviour identical to the release's."""

    name = 'paper'
    description = 'the official BNAS recipes: CIFAR-10 one-cycle SGD (BNAS-A), ImageNet cosine restarts (BNAS-D..H)'

    CIFAR = {'epochs': 600, 'batch_size': 256, 'optimizer': 'sgd', 'lr': 0.05, 'momentum': 0.9, 'weight_decay': 3e-6,
             'schedule': 'onecycle', 'label_smoothing': 0.0, 'grad_clip': None, 'drop_path_prob': 0.2,
             'workers': 2, 'report_freq': 50}
    IMAGENET = {**CIFAR, 'epochs': 250, 'weight_decay': 3e-5, 'schedule': 'cosine_restarts', 'restart_epochs': 50,
                'label_smoothing': 0.1, 'grad_clip': 5.0, 'grad_clip_mode': 'binary', 'drop_path_prob': 0.0,
                'workers': 4, 'report_freq': 100}

    def defaults(self, family: str) -> Dict[str, Any]:
        return dict(self.IMAGENET if family == 'imagenet' else self.CIFAR)


class ReactRecipe(Recipe):
    """ReActNet's two-step recipe with AdamBNN's weight-decay rule (see the module docstring).

    Both steps distil from ``teacher`` when one is given (a bnas-nni checkpoint of any network, e.g. the
    full-precision version of the same genotype with ``binarizer: none, activation: identity``, or
    ``torchvision:NAME=WEIGHTS_FILE``). Step 1 runs in ``<run_dir>/step1``, step 2 in ``<run_dir>/step2``;
    each resumes on its own, and step 2 starts from step 1's final weights (its RSign thresholds and
    RPReLU parameters included; the binarizers own no tensors, so the state dicts are the same).
    """

    name = 'react'
    description = ('ReActNet-style two steps (binary activations, then binary weights too), Adam with linear '
                   'decay, conv-only weight decay (0 in step 2), distillation from `teacher`')

    CIFAR = {'epochs': 300, 'batch_size': 256, 'optimizer': 'adam', 'lr': 5e-4, 'lr_min': 0.0, 'betas': [0.9, 0.999],
             'weight_decay': 5e-6, 'weight_decay_other': 0.0, 'step2_weight_decay': 0.0, 'schedule': 'linear',
             'label_smoothing': 0.0, 'grad_clip': None, 'drop_path_prob': 0.0, 'op_set': 'react',
             'bn_recalibration': 100, 'workers': 2, 'report_freq': 50}
    IMAGENET = {**CIFAR, 'epochs': 256, 'lr': 1.25e-3, 'workers': 4, 'report_freq': 100}

    def defaults(self, family: str) -> Dict[str, Any]:
        return dict(self.IMAGENET if family == 'imagenet' else self.CIFAR)

    def stages(self, cfg: TrainConfig) -> List[Stage]:
        step1_epochs = cfg.step1_epochs or cfg.epochs
        # step 1 never trains with fixed BN statistics: they only start step 2, which moves them again
        return [Stage('step1', {'binarizer': 'none', 'epochs': int(step1_epochs), 'bn_freeze_epochs': 0,
                                'bn_renorm_epochs': 0}),
                Stage('step2', {'weight_decay': float(cfg.step2_weight_decay or 0.0)}, init_from_previous=True)]


#: name -> Recipe instance
RECIPES: Registry = Registry('recipe')


def register_recipe(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Make ``recipe`` selectable as ``recipe: <recipe.name>``."""
    if not recipe.name:
        raise ConfigError('a recipe needs a name')
    return RECIPES.register(recipe.name, recipe, replace=replace)


def get_recipe(name: str) -> Recipe:
    return RECIPES.get(name)


register_recipe(PaperRecipe())
register_recipe(ReactRecipe())


def recipe_defaults_hook(lookup) -> Dict[str, Any]:
    """For :func:`bnas_nni.config.resolve`: the chosen recipe's defaults for the model's family.

    Without an explicit ``dataset`` the model config's dataset decides the family (``bnas-d`` means
    ImageNet), so ``--model bnas-d`` alone selects the ImageNet recipe and data.
    """
    dataset = lookup('dataset', None)
    out: Dict[str, Any] = {}
    if dataset is None:
        model = lookup('model')
        configured = load_model_configs().get(str(model), {})
        if configured.get('dataset') == 'imagenet':
            out['dataset'] = dataset = 'imagenet'
    family = family_of(dataset or 'cifar10')
    if family == 'imagenet':
        out.setdefault('model', 'bnas-d')
        out.setdefault('image_size', 224)
    out.update(get_recipe(lookup('recipe')).defaults(family))
    return out
