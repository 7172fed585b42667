"""The cells a study trains: each search arm's derived cell per search seed, and the random baseline's samples.

Contract: a cell exists once ``cells/<cell>.yaml`` (its genotype) and ``cells/<cell>.json`` (its arm,
search seed, OPs, parameters, optional latency, and for a searched cell the declared and measured cost
of its search) are written, atomically, the genotype last. :func:`ensure_cells` makes every missing cell
and never redoes one that exists: a search killed mid-way continues from its checkpoint where the
strategy resumes (``binary-darts`` and the driver's strategies) and starts again in a clean run
directory otherwise (NNI restarts its experiments). OPs and parameters are those of the network the
protocol trains (``bnas-nni summary``'s counts).
"""
from __future__ import annotations

import importlib
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional

from ..console import log as console_log
from ..genotypes import Genotype, save_genotype
from ..search.run import run_search
from ..search.strategies import get_strategy_spec
from ..summary import summarize
from ..train.model import build_network, resolve_model_config
from .arms import Cost, random_cells
from .config import Arm, StudyConfig
from .jobs import cpu_seconds
from .results import Job, StudyFiles

__all__ = ['cell_names', 'ensure_cells', 'plan_jobs', 'network_counts', 'load_latency_model']


def cell_names(arm: Arm) -> List[str]:
    """The cells an arm contributes, by name: ``<arm>-s<seed>`` per search seed, ``<arm>-cNN`` per sample."""
    if arm.is_random:
        return [f'{arm.name}-c{i:02d}' for i in range(arm.cells)]
    return [f'{arm.name}-s{s}' for s in arm.seeds]


def plan_jobs(study: StudyConfig) -> List[Job]:
    """Every training of the study: each cell of each arm, once per training seed (arm order, then cell, seed)."""
    return [Job(arm.name, cell, seed) for arm in study.arms for cell in cell_names(arm) for seed in study.train_seeds]


def load_latency_model(study: StudyConfig) -> Optional[Any]:
    """The study's latency model when ``latency_table`` is set and :mod:`bnas_nni.latency` is installed."""
    if not study.latency_table:
        return None
    try:
        latency = importlib.import_module('bnas_nni.latency')   # optional part of the package
    except ImportError:
        return None
    return latency.LatencyModel.load(study.latency_table)


def network_counts(study: StudyConfig, genotype_path: str, latency_model: Optional[Any] = None,
                   genotype: Optional[Genotype] = None) -> Dict[str, Any]:
    """OPs (millions), parameters and (with a latency model) predicted latency of the protocol's network."""
    cfg = study.train_config_for(genotype_path, study.train_seeds[0])
    s = summarize(build_network(resolve_model_config(cfg)))
    out: Dict[str, Any] = {'ops_m': round(s.ops / 1e6, 4), 'params': int(s.params), 'latency_ms': None}
    if latency_model is not None and genotype is not None:
        out['latency_ms'] = round(float(latency_model.predict(genotype)), 4)
    return out


def _write_cell(study: StudyConfig, files: StudyFiles, name: str, genotype: Genotype, meta: Dict[str, Any],
                latency_model: Optional[Any]) -> None:
    path = files.cell_genotype(name)
    tmp_path = path.with_name(f'{name}.pending.yaml')      # counted from the genotype the training will read
    save_genotype(Genotype(genotype.normal, genotype.reduce, genotype.normal_concat, genotype.reduce_concat,
                           name=name), tmp_path)
    counts = network_counts(study, str(tmp_path), latency_model, genotype)
    files.write_cell_meta(name, {**meta, **counts, 'cell': name, 'genotype': str(genotype).split(': ', 1)[-1][:-1]})
    os.replace(tmp_path, path)                               # the genotype last: the cell now exists


def _search_cell(study: StudyConfig, files: StudyFiles, arm: Arm, seed: int, cost: Cost,
                 log: Callable[[str], None]) -> tuple:
    run_dir = files.search_dir(arm.name, seed)
    spec = get_strategy_spec(arm.strategy)
    resume = spec.resumable and (run_dir / 'checkpoint.pt').is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)                   # an interrupted NNI search restarts in a clean directory
    cfg = study.search_config_for(arm, seed, str(run_dir))
    files.event(f'start search {arm.name} seed {seed} pid {os.getpid()}' + (' (continuing)' if resume else ''))
    log(f'study: search {arm.name} seed {seed} ({cost.detail})' + (', continuing its checkpoint' if resume else ''))
    t0, c0 = time.time(), cpu_seconds()
    summary = run_search(cfg, resume=resume, log=log)
    wall, cpu = time.time() - t0, cpu_seconds() - c0
    acc = summary.get('supernet_val_acc')
    meta = {'arm': arm.name, 'strategy': arm.strategy, 'search_seed': seed,
            'search': {'image_epochs': cost.image_epochs, 'detail': cost.detail, 'wall_seconds': round(wall, 2),
                       'cpu_seconds': round(cpu, 2), 'continued': resume,
                       'supernet_val_acc': None if acc is None or acc < 0 else float(acc)}}
    files.event(f'done search {arm.name} seed {seed} ({wall:.0f} s)')
    return summary['genotype'], meta


def ensure_cells(study: StudyConfig, files: StudyFiles, costs: Dict[str, Cost],
                 log: Callable[[str], None] = console_log) -> None:
    """Make every cell of the study that does not exist yet (see the module docstring)."""
    latency_model = load_latency_model(study)
    for arm in study.arms:
        names = cell_names(arm)
        if arm.is_random:
            if all(files.read_cell(n) is not None for n in names):
                continue
            for genotype, name in zip(random_cells(study.space, arm.cells, arm.seed, prefix=arm.name), names):
                if files.read_cell(name) is None:
                    _write_cell(study, files, name, genotype,
                                {'arm': arm.name, 'strategy': None, 'search_seed': None, 'sampler_seed': arm.seed,
                                 'search': {'image_epochs': 0, 'detail': costs[arm.name].detail}}, latency_model)
            log(f'study: {arm.name}: {arm.cells} cells sampled uniformly from {study.space} (seed {arm.seed})')
            continue
        for seed, name in zip(arm.seeds, names):
            if files.read_cell(name) is not None:
                continue
            genotype, meta = _search_cell(study, files, arm, seed, costs[arm.name], log)
            _write_cell(study, files, name, genotype, meta, latency_model)
