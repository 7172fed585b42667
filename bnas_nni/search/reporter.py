"""A search as an ``nnictl`` trial, so searches show up in the NNI web UI.

Under NNI (``NNI_PLATFORM`` set), ``bnas-nni search`` (e.g. the trial command ``python -m bnas_nni search
--config experiments/search_quick_fashion.yaml`` of ``experiments/nnictl_search_grid.yml``) runs the
same :func:`bnas_nni.search.run.run_search` as anywhere else, with a :class:`SearchTrialReporter`:

1. the trial's NNI parameters are a last config layer: any search config key (``seed``, ``lamda``,
   ``tau`` ..., ``final_*`` for the brief final training), on top of ``--config`` and ``--set``;
2. the search runs in ``$NNI_OUTPUT_DIR/search`` (continued if NNI restarts the trial) and reports,
   after every epoch, an intermediate result ``{'default': supernet val acc %, 'arch_entropy': mean
   edge entropy, 'epoch': n}`` (a search with a latency model adds ``expected_latency_ms`` and
   ``latency_ms``, the predicted latency of the epoch's derived network);
3. the kept genotypes are written to ``$NNI_OUTPUT_DIR/genotype.yaml`` and ``genotype_imagenet.yaml``;
4. the derived network is trained briefly (the one train loop,
   :func:`~bnas_nni.search.evaluators.evaluate_derived`) and the final result is reported
   ``{'default': best supernet val acc %, 'derived_acc': test accuracy % of the derived cell,
   'zeroise_ops': ...}`` (plus ``latency_ms``, the derived network's predicted latency, when the search
   has a latency model): ``default`` is the same quantity in intermediates and final.

Reports go through the trial command channel NNI opened for this process, captured before anything
else runs (:class:`bnas_nni.integrations.nni.trial.RealTrialChannel`). A trial may be a ``torchrun`` job
(``experiments/nnictl_search_ddp.yml``): every rank inherits NNI's variables, but rank 0 alone takes
the parameters (and hands them to the other ranks), reports, writes the genotypes and trains the
derived cell; the search itself is data-parallel (:mod:`bnas_nni.search.data_parallel`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import nni
import torch

from ..config import SearchConfig
from ..console import log as console_log
from ..data import build_dataset, data_options, dataset_info
from ..genotypes import save_genotype
from ..integrations.nni.trial import RealTrialChannel, under_nni
from ..networks import BNASNetwork
from .evaluators import evaluate_derived

__all__ = ['brief_train', 'SearchReporter', 'SearchTrialReporter']


def brief_train(genotype: Any, cfg: SearchConfig, *, log=console_log) -> float:
    """Train the derived network of ``genotype`` for ``final_epochs`` with the one train loop (SGD,
    cosine, the binarizer's latent step) and return its top-1 accuracy (%) on the first
    ``final_test_subset`` test images."""
    data = {**data_options(cfg), 'image_size': cfg.final_image_size or cfg.image_size}
    train = build_dataset({**data, 'train_subset': cfg.final_train_subset}, 'train')
    test = build_dataset({**data, 'val_subset': cfg.final_test_subset}, 'val')
    torch.manual_seed(int(cfg.seed))
    model = BNASNetwork(genotype, init_channels=int(cfg.final_init_channels), layers=int(cfg.final_layers),
                        num_classes=dataset_info(data).num_classes or 10, dataset=cfg.dataset)
    metric = evaluate_derived(model, train_data=train, val_data=test, reinit=False, report=False,
                              epochs=int(cfg.final_epochs), batch_size=int(cfg.final_batch_size),
                              lr=float(cfg.final_lr), momentum=0.9, weight_decay=float(cfg.final_weight_decay),
                              lr_min=0.0, seed=int(cfg.seed), channels_last=True)
    log(f'derived cell: {cfg.final_epochs} epoch(s) on {len(train)} images, C={cfg.final_init_channels} '
        f'L={cfg.final_layers}: test acc {metric["default"]:.2f}% on {len(test)} test images '
        f'({metric["seconds"]:.1f}s)')
    return float(metric['default'])


class SearchReporter:
    """What a search tells the world beyond its run directory; this base class tells nothing.

    :func:`bnas_nni.search.run.run_search` calls, on rank 0 only: :meth:`parameters` once before the
    search (a last config layer, as NNI parameters), :meth:`resumes` (continue the run directory's
    search), :meth:`epoch` after every epoch with the epoch's record, and :meth:`finish` once with the
    search's summary.
    """

    def config_defaults(self) -> Dict[str, Any]:
        """Config keys this reporter sets unless the command line does (e.g. where the run directory is)."""
        return {}

    def parameters(self) -> Dict[str, Any]:
        return {}

    def resumes(self, cfg: SearchConfig) -> bool:
        return False

    def epoch(self, record: Mapping[str, Any]) -> None:
        pass

    def finish(self, summary: Mapping[str, Any], cfg: SearchConfig, log=console_log) -> Optional[Dict[str, Any]]:
        return None


class SearchTrialReporter(SearchReporter):
    """A search as an NNI trial: parameters from NNI, an intermediate result per epoch, the genotypes in
    ``$NNI_OUTPUT_DIR``, a brief training of the derived cell, and the final result (module docstring).

    Construct it first thing in the process: on rank 0 it captures the trial command channel before any
    NNI engine can swap it (pass ``channel`` to report elsewhere, e.g. in tests).
    """

    def __init__(self, out_dir: Optional[str | os.PathLike] = None, channel: Optional[RealTrialChannel] = None) -> None:
        self.out_dir = Path(out_dir or os.environ.get('NNI_OUTPUT_DIR') or Path('runs') / 'search-trial')
        is_main = int(os.environ.get('RANK', '0')) == 0
        self.channel = channel or (RealTrialChannel() if is_main else None)

    def config_defaults(self) -> Dict[str, Any]:
        return {'run_dir': str(self.out_dir / 'search'), 'progress': 'never'}

    def parameters(self) -> Dict[str, Any]:
        if not under_nni():
            return {}
        with self.channel.active():
            return dict(nni.get_next_parameter() or {})

    def resumes(self, cfg: SearchConfig) -> bool:
        # a trial NNI restarts continues its own search instead of failing on the existing run directory
        return (Path(cfg.run_dir) / 'checkpoint.pt').is_file()

    def epoch(self, record: Mapping[str, Any]) -> None:
        if record.get('val_acc') is None:
            return
        metric = {'default': float(record['val_acc']), 'epoch': int(record['epoch']) + 1}
        for key, name in (('entropy', 'arch_entropy'), ('arch_ce', 'arch_ce'),
                          ('expected_latency_ms', 'expected_latency_ms'), ('predicted_latency_ms', 'latency_ms')):
            if record.get(key) is not None:
                metric[name] = float(record[key])
        self.channel.intermediate(metric)

    def finish(self, summary: Mapping[str, Any], cfg: SearchConfig, log=console_log) -> Dict[str, Any]:
        cifar, imagenet = summary['genotype'], summary['genotype_imagenet']
        best = summary['supernet_val_acc']
        meta = {'source': 'bnas-nni search', 'trial': os.environ.get('NNI_TRIAL_JOB_ID', 'standalone'),
                'params': dict(summary.get('params') or {}), 'supernet_val_acc': best}
        save_genotype(cifar, self.out_dir / 'genotype.yaml', **meta)
        save_genotype(imagenet, self.out_dir / 'genotype_imagenet.yaml', **meta)
        derived = brief_train(cifar, cfg, log=log)
        zeroise = sum(op == 'zeroise' for cell in ('normal', 'reduce') for op, _ in cifar.cell(cell))
        metric = {'default': float(best) if best is not None and best >= 0 else derived, 'derived_acc': derived,
                  'zeroise_ops': float(zeroise)}
        if summary.get('predicted_latency_ms') is not None:      # a search with a latency model
            metric['latency_ms'] = float(summary['predicted_latency_ms'])
        self.channel.final(metric)
        log(f'final result: {metric}; genotype in {self.out_dir / "genotype.yaml"}')
        return metric
