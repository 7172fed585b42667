"""Training recipes: the seam between *what* a network is trained with and the one train loop.

A :class:`Recipe` is chosen by name in the config (``recipe: paper``) and decides

* the **defaults** of the optimisation keys for a network family (``cifar`` or ``imagenet``): the
  optimizer, learning rate, weight decay (and ``weight_decay_binary`` for the binary convs' latent
  weights, a second parameter group), schedule, loss knobs, epochs;
* the **stages**: one for the paper recipes; several for multi-step recipes, each a set of config
  overrides (e.g. real-valued weights first), optionally initialised from the previous stage;
* the **optimizer** (:func:`bnas_nni.train.optim.optimizer_from_config`, which also attaches the
  binarizers' latent-weight step), the **schedule** (:func:`bnas_nni.train.schedules.build_schedule`)
  and the **loss** (:mod:`bnas_nni.train.losses`: cross entropy, or distillation when ``teacher`` is set).

Everything a user may change stays a config key, so ``--set lr=0.1`` works with every recipe; a
recipe only moves the defaults. Register new ones with :func:`register_recipe`.

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

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import Registry

__all__ = ['Stage', 'Recipe', 'PaperRecipe', 'ReactRecipe', 'RECIPES', 'register_recipe', 'get_recipe',
           'recipe_defaults_hook']


@dataclass(frozen=True)
class Stage:
    """One training run of a recipe: config ``overrides`` on top of the resolved config; with
    ``init_from_previous`` its network starts from the previous stage's final weights."""

    name: str = ''
    overrides: Mapping[str, Any] = field(default_factory=dict)
    init_from_previous: bool = False


class Recipe:
    """Base recipe: one stage, the config's optimizer, schedule and loss. Subclasses override what differs."""

    name: str = ''
    description: str = ''

    def defaults(self, family: str) -> Dict[str, Any]:
        """Config defaults for a network family (``cifar`` or ``imagenet``)."""
        return {}

    def stages(self, cfg: Mapping[str, Any]) -> List[Stage]:
        return [Stage()]

    def optimizer(self, model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
        from .optim import optimizer_from_config

        return optimizer_from_config(model, dict(cfg))

    def schedule(self, optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], iters_per_epoch: int):
        from .schedules import build_schedule

        return build_schedule(dict(cfg), optimizer, iters_per_epoch)

    def check(self, cfg: Mapping[str, Any]) -> None:
        """Called before anything is written: the model config (op set, quantizers) and the teacher must
        be usable, else a one-line error. Recipes with other inputs extend it."""
        from .engine import resolve_model_config

        model_cfg = resolve_model_config(cfg)
        if cfg.get('teacher'):
            from .teacher import load_teacher

            load_teacher(cfg['teacher'], num_classes=int(model_cfg['num_classes']), family=_family(cfg))

    def loss(self, cfg: Mapping[str, Any], num_classes: int):
        """The training loss: distillation from ``cfg['teacher']`` when set, else cross entropy."""
        from .losses import CrossEntropy, Distillation

        if cfg.get('teacher'):
            from .teacher import load_teacher

            return Distillation(load_teacher(cfg['teacher'], num_classes=num_classes, family=_family(cfg)))
        return CrossEntropy(cfg.get('label_smoothing', 0.0))


def _family(cfg: Mapping[str, Any]) -> str:
    from ..config import family_of

    return family_of(cfg.get('dataset'))


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

    def stages(self, cfg: Mapping[str, Any]) -> List[Stage]:
        step1_epochs = cfg.get('step1_epochs') or cfg['epochs']
        # step 1 never trains with fixed BN statistics: they only start step 2, which moves them again
        return [Stage('step1', {'binarizer': 'none', 'epochs': int(step1_epochs), 'bn_freeze_epochs': 0,
                                'bn_renorm_epochs': 0}),
                Stage('step2', {'weight_decay': float(cfg.get('step2_weight_decay') or 0.0)}, init_from_previous=True)]


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
    from ..config import family_of
    from ..networks import load_model_configs

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
