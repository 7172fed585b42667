"""The study config: which arms to compare, on which space and dataset, under which evaluation protocol.

A study YAML (``experiments/study_*.yaml``) is read once into a :class:`StudyConfig`; every problem is
one :class:`~bnas_nni.errors.ConfigError` line before anything runs: an unknown key (the allowed ones
are listed), an arm that is neither a search nor the random baseline, an unknown strategy or strategy
option, an unknown dataset or space, a baseline that names no arm. The search and training configs of
every arm are resolved here with the library's own resolvers (:func:`resolve_search_config`,
:func:`resolve_train_config`), so a study accepts exactly the keys and datasets ``bnas-nni search`` and
``bnas-nni train`` accept. Relative file names are looked up beside the study YAML, then in the
repository, then in the working directory.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..config import MAX_NAME_LENGTH, SearchConfig, TrainConfig, check_plain_name
from ..errors import ConfigError
from ..io import load_yaml
from ..paths import REPO_ROOT
from ..search.run import resolve_search_config
from ..search.strategies import get_strategy_spec
from ..train.runner import resolve_train_config

__all__ = ['StudyConfig', 'Arm', 'STUDY_KEYS', 'ARM_KEYS', 'PROTOCOL_KEYS', 'RANKING_KEYS', 'load_study_config',
           'RANDOM_ARM_KIND', 'FIXED_SEARCH', 'FIXED_TRAIN']

#: top-level keys of a study YAML and their help (the guide's reference table is this table)
STUDY_KEYS: Dict[str, str] = {
    'name': 'study name (a plain name); the default run directory is runs/study-<name>',
    'description': 'free text kept with the study',
    'dataset': 'dataset of every search and training (any name the dataset registry knows)',
    'space': 'search space of every arm and of the random baseline (search_spaces/ name or YAML)',
    'search_config': 'search YAML every arm starts from (its strategy, seed, dataset and space are set by the study)',
    'search': 'search keys set for every arm (e.g. {epochs: 5})',
    'arms': 'the arms: a list of {name, strategy, seeds, search} (a search) or {name, cells, seed} (random cells)',
    'baseline': 'the arm the others are compared with (default: the random-cell arm)',
    'protocol': 'the evaluation protocol of every cell: {config, train, seeds}',
    'budget_tolerance': 'largest relative difference between the search arms\' declared costs (0.1 = 10%)',
    'bootstrap_samples': 'resamples of the bootstrap interval and of the permutation test',
    'stats_seed': 'seed of the bootstrap and the permutation test',
    'trial_concurrency': 'NNI trials at once (NNI 3.0 mixes up concurrent trials: keep 1)',
    'port': 'NNI manager / web UI port on 127.0.0.1; None: a free one',
    'max_duration': 'time budget of the NNI experiment, e.g. 3h',
    'latency_table': 'a bnas_nni.latency model (JSON) for a latency column; None: no latency',
    'supernet_ranking': "rank every cell with the one-shot supernet of one search: {arm, seed, images, "
                        "bn_batches}; Kendall tau against the cells' stand-alone top-1; None: off",
}
#: keys of supernet_ranking and their help
RANKING_KEYS: Dict[str, str] = {
    'arm': 'a binary-darts arm of the study whose supernet ranks the cells',
    'seed': 'which of its search seeds (default: its first)',
    'images': 'validation images of the one-shot top-1 (default 1024)',
    'bn_batches': 'training batches the BN statistics are re-estimated on, per cell (default 8)',
}
ARM_KEYS: Dict[str, str] = {
    'name': 'arm name in tables and plots (default: the strategy, or random)',
    'strategy': 'a registered search strategy (binary-darts, darts, gumbel-darts, random-one-shot, random, '
                'regularized-evolution, tpe ...)',
    'seeds': 'search seeds of a search arm: one derived cell per seed (a list, or a count N for 0..N-1)',
    'search': "search keys of this arm only, over the study's search (e.g. its strategy_options)",
    'cells': 'the random baseline: number of cells sampled uniformly from the space',
    'seed': 'the random baseline: seed of the cell sampler',
}
PROTOCOL_KEYS: Dict[str, str] = {
    'config': 'training YAML every cell is trained with (its genotype, seed and dataset are set by the study)',
    'train': 'training keys set for every training (epochs, train_subset, init_channels ...)',
    'seeds': 'training seeds: every cell is trained once per seed (a list, or a count K for 0..K-1)',
}
RANDOM_ARM_KIND = 'random cells'
#: keys the study sets in every search / training (a user value for them is refused)
FIXED_SEARCH = ('strategy', 'seed', 'dataset', 'space', 'run_dir', 'save', 'out')
FIXED_TRAIN = ('genotype', 'seed', 'dataset', 'run_dir')


@dataclass
class Arm:
    """One arm: a search strategy run once per search seed, or ``cells`` uniform samples of the space."""

    name: str
    strategy: Optional[str] = None
    seeds: List[int] = field(default_factory=list)
    search: Dict[str, Any] = field(default_factory=dict)
    cells: int = 0
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.strategy is None

    @property
    def kind(self) -> str:
        return RANDOM_ARM_KIND if self.is_random else get_strategy_spec(self.strategy).kind

    def to_dict(self) -> Dict[str, Any]:
        if self.is_random:
            return {'name': self.name, 'cells': self.cells, 'seed': self.seed}
        return {'name': self.name, 'strategy': self.strategy, 'seeds': list(self.seeds), 'search': dict(self.search)}


@dataclass
class StudyConfig:
    """A validated study (see the module docstring); ``to_dict`` is what the run directory keeps."""

    name: str
    dataset: str
    space: str
    search_config: Optional[str]
    search: Dict[str, Any]
    arms: List[Arm]
    baseline: Optional[str]
    train_config: Optional[str]
    train: Dict[str, Any]
    train_seeds: List[int]
    description: str = ''
    budget_tolerance: float = 0.1
    bootstrap_samples: int = 10000
    stats_seed: int = 0
    trial_concurrency: int = 1
    port: Optional[int] = None
    max_duration: str = '24h'
    latency_table: Optional[str] = None
    supernet_ranking: Optional[Dict[str, Any]] = None

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f'unknown arm {name!r}; the study has {", ".join(a.name for a in self.arms)}')

    def search_config_for(self, arm: Arm, seed: int, run_dir: Optional[str] = None) -> SearchConfig:
        """The resolved search config of ``arm`` with search seed ``seed``."""
        overrides = {**self.search, **arm.search, 'strategy': arm.strategy, 'seed': int(seed),
                     'dataset': self.dataset, 'space': self.space, 'run_dir': run_dir, 'save': None,
                     'name': f'{arm.name}-s{seed}', 'progress': 'never', 'tensorboard': False}
        try:
            return resolve_search_config(self.search_config, overrides)
        except ConfigError as exc:
            raise ConfigError(f'arm {arm.name!r}: {exc}') from None

    def train_overrides(self, genotype: Optional[str], seed: int, run_dir: Optional[str] = None) -> Dict[str, Any]:
        """The keys the protocol sets over its training YAML for one cell (genotype YAML) and training seed."""
        overrides = {'progress': 'never', 'tensorboard': False, **self.train, 'dataset': self.dataset,
                     'seed': int(seed), 'run_dir': run_dir}
        if genotype is not None:
            overrides['genotype'] = genotype
        return overrides

    def train_config_for(self, genotype: Optional[str], seed: int, run_dir: Optional[str] = None) -> TrainConfig:
        """The resolved training config of the protocol for one cell (genotype YAML) and training seed."""
        try:
            return resolve_train_config(self.train_config, self.train_overrides(genotype, seed, run_dir))
        except ConfigError as exc:
            raise ConfigError(f'protocol: {exc}') from None

    def to_dict(self) -> Dict[str, Any]:
        return {'name': self.name, 'description': self.description, 'dataset': self.dataset, 'space': self.space,
                'search_config': self.search_config, 'search': dict(self.search),
                'arms': [a.to_dict() for a in self.arms], 'baseline': self.baseline,
                'protocol': {'config': self.train_config, 'train': dict(self.train), 'seeds': list(self.train_seeds)},
                'budget_tolerance': self.budget_tolerance, 'bootstrap_samples': self.bootstrap_samples,
                'stats_seed': self.stats_seed, 'trial_concurrency': self.trial_concurrency, 'port': self.port,
                'max_duration': self.max_duration, 'latency_table': self.latency_table,
                'supernet_ranking': None if self.supernet_ranking is None else dict(self.supernet_ranking)}


#: keys that a continued study may change (how it runs, not what it computes)
RESUME_FREE = ('description', 'trial_concurrency', 'port', 'max_duration', 'supernet_ranking')


def _unknown(where: str, given: Mapping[str, Any], allowed: Mapping[str, str]) -> None:
    unknown = sorted(str(k) for k in given if k not in allowed)
    if unknown:
        raise ConfigError(f'{where}: unknown key{"s" if len(unknown) > 1 else ""} {", ".join(unknown)}; '
                          f'allowed: {", ".join(allowed)}')


def _mapping(value: Any, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f'{where} must be a mapping of keys, got {value!r}')
    return dict(value)


def _seeds(value: Any, where: str, default: List[int]) -> List[int]:
    if value is None:
        return list(default)
    if isinstance(value, bool):
        raise ConfigError(f'{where}: give a list of integer seeds or a count, got {value!r}')
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f'{where}: a count of seeds must be >= 1, got {value}')
        return list(range(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in value):
        if len(set(value)) != len(value):
            raise ConfigError(f'{where}: seeds repeat ({value}); give each seed once')
        return [int(s) for s in value]
    raise ConfigError(f'{where}: give a list of integer seeds or a count, e.g. [0, 1, 2] or 3; got {value!r}')


def _find_file(value: Optional[str], where: str, base: Optional[Path]) -> Optional[str]:
    """A file named in the study: beside the study YAML, in the repository, or from the working directory."""
    if value in (None, ''):
        return None
    p = Path(str(value))
    candidates = [p] if p.is_absolute() else [c for c in ((base / p) if base else None, REPO_ROOT / p, Path.cwd() / p)
                                              if c is not None]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    raise ConfigError(f'{where}: file not found: {value}; give a path relative to the study YAML, the repository '
                      'or the working directory')


def _parse_arm(raw: Any, index: int) -> Arm:
    where = f'arms[{index}]'
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{where} must be a mapping, e.g. {{strategy: binary-darts, seeds: 3}} or '
                          f'{{name: random, cells: 8}}; got {raw!r}')
    _unknown(where, raw, ARM_KEYS)
    strategy, cells = raw.get('strategy'), raw.get('cells')
    if strategy is None and cells is None:
        raise ConfigError(f'{where} ({raw.get("name", "unnamed")}): unknown arm: give a strategy (a search) or '
                          'cells: N (the random baseline)')
    if strategy is not None and cells is not None:
        raise ConfigError(f'{where}: an arm is a search (strategy) or random cells (cells), not both')
    name = str(raw.get('name') or (strategy if strategy is not None else 'random'))
    check_plain_name(f'{where} name', name)
    if strategy is not None:
        for key in ('seed',):
            if key in raw:
                raise ConfigError(f'{where} ({name}): {key} belongs to random-cell arms; a search arm takes seeds')
        spec = get_strategy_spec(str(strategy))          # unknown strategy: one line listing the known ones
        search = _mapping(raw.get('search'), f'{where} search')
        fixed = sorted(k for k in search if k in FIXED_SEARCH)
        if fixed:
            raise ConfigError(f'{where} ({name}) search: the study sets {", ".join(fixed)}; remove them')
        return Arm(name=name, strategy=spec.name, seeds=_seeds(raw.get('seeds'), f'{where} seeds', [0, 1, 2]),
                   search=search)
    if not isinstance(cells, int) or isinstance(cells, bool) or cells < 1:
        raise ConfigError(f'{where} ({name}): cells must be a positive integer, got {cells!r}')
    for key in ('seeds', 'search'):
        if key in raw:
            raise ConfigError(f'{where} ({name}): {key} belongs to search arms; a random-cell arm takes cells and seed')
    seed = raw.get('seed', 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f'{where} ({name}): seed must be an integer, got {seed!r}')
    return Arm(name=name, cells=int(cells), seed=int(seed))


def _number(raw: Mapping[str, Any], key: str, default: Any, kind: type, minimum: float) -> Any:
    value = raw.get(key, default)
    if value is None:
        return None if default is None else default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f'{key} must be a number, got {value!r}') from None
    if number < minimum:
        raise ConfigError(f'{key} must be >= {minimum}, got {value!r}')
    return number


def _parse_ranking(raw: Any, arms: List[Arm]) -> Optional[Dict[str, Any]]:
    if raw in (None, False):
        return None
    spec = _mapping(raw, 'supernet_ranking')
    _unknown('supernet_ranking', spec, RANKING_KEYS)
    one_shot = [a for a in arms if not a.is_random and get_strategy_spec(a.strategy).runner == 'driver']
    name = spec.get('arm', one_shot[0].name if one_shot else None)
    arm = next((a for a in one_shot if a.name == name), None)
    if arm is None:
        raise ConfigError(f'supernet_ranking: arm {name!r} is not a binary-darts arm of the study; choose one of '
                          f'{", ".join(a.name for a in one_shot) or "(none: add a binary-darts arm)"}')
    seed = spec.get('seed', arm.seeds[0])
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in arm.seeds:
        raise ConfigError(f'supernet_ranking: seed {seed!r} is not a search seed of arm {arm.name!r} '
                          f'({", ".join(map(str, arm.seeds))})')
    return {'arm': arm.name, 'seed': int(seed), 'images': _number(spec, 'images', 1024, int, 1),
            'bn_batches': _number(spec, 'bn_batches', 8, int, 0)}


def parse_study(raw: Mapping[str, Any], *, source: str = 'study', base: Optional[Path] = None) -> StudyConfig:
    """Validate a study mapping (a loaded YAML); see the module docstring for what is checked."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{source}: a study config is a mapping of keys ({", ".join(STUDY_KEYS)})')
    _unknown(source, raw, STUDY_KEYS)
    for key in ('dataset', 'arms', 'protocol'):
        if raw.get(key) in (None, '', []):
            raise ConfigError(f'{source}: {key} is missing; a study needs a dataset, arms and a protocol')
    name = str(raw.get('name') or (re.sub(r'[^A-Za-z0-9_.-]', '_', Path(source).stem) or 'study'))[:MAX_NAME_LENGTH]
    check_plain_name('name', name)
    if not isinstance(raw['arms'], (list, tuple)):
        raise ConfigError(f'{source}: arms must be a list of arms')
    arms = [_parse_arm(a, i) for i, a in enumerate(raw['arms'])]
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f'{source}: arm names repeat ({", ".join(dupes)}); give each arm its own name')
    random_arms = [a.name for a in arms if a.is_random]
    baseline = raw.get('baseline', random_arms[0] if random_arms else None)
    if baseline is not None and str(baseline) not in names:
        raise ConfigError(f'{source}: baseline names unknown arm {baseline!r}; the arms are {", ".join(names)}')
    protocol = _mapping(raw['protocol'], 'protocol')
    _unknown('protocol', protocol, PROTOCOL_KEYS)
    train = _mapping(protocol.get('train'), 'protocol train')
    fixed = sorted(k for k in train if k in FIXED_TRAIN)
    if fixed:
        raise ConfigError(f'protocol train: the study sets {", ".join(fixed)}; remove them')
    search = _mapping(raw.get('search'), 'search')
    fixed = sorted(k for k in search if k in FIXED_SEARCH)
    if fixed:
        raise ConfigError(f'search: the study sets {", ".join(fixed)} (per arm); remove them')
    concurrency = _number(raw, 'trial_concurrency', 1, int, 1)
    port = _number(raw, 'port', None, int, 0)
    cfg = StudyConfig(
        name=name, description=str(raw.get('description') or ''), dataset=str(raw['dataset']),
        space=str(raw.get('space') or 'bnas'),
        search_config=_find_file(raw.get('search_config'), 'search_config', base), search=search, arms=arms,
        baseline=None if baseline is None else str(baseline),
        train_config=_find_file(protocol.get('config'), 'protocol config', base), train=train,
        train_seeds=_seeds(protocol.get('seeds'), 'protocol seeds', [0, 1]),
        budget_tolerance=_number(raw, 'budget_tolerance', 0.1, float, 0.0),
        bootstrap_samples=_number(raw, 'bootstrap_samples', 10000, int, 100),
        stats_seed=_number(raw, 'stats_seed', 0, int, 0), trial_concurrency=concurrency, port=port,
        max_duration=str(raw.get('max_duration') or '24h'),
        latency_table=_find_file(raw.get('latency_table'), 'latency_table', base),
        supernet_ranking=_parse_ranking(raw.get('supernet_ranking'), arms))
    check_resolves(cfg)
    return cfg


def check_resolves(cfg: StudyConfig) -> None:
    """Resolve every arm's search config and the protocol's training config once (unknown dataset, space,
    strategy option or key: one line, before anything runs)."""
    cfg.train_config_for(None, cfg.train_seeds[0])
    for arm in cfg.arms:
        if not arm.is_random:
            cfg.search_config_for(arm, arm.seeds[0])


def load_study_config(path: str | os.PathLike, overrides: Optional[Mapping[str, Any]] = None) -> StudyConfig:
    """Read and validate a study YAML; ``overrides`` (``--set key=value``) replace top-level keys."""
    path = Path(path)
    raw = load_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{path}: a study config is a mapping of keys ({", ".join(STUDY_KEYS)})')
    raw = dict(raw)
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition('.')
        if rest:                                  # protocol.train.epochs=1, search.epochs=2
            node = raw.setdefault(head, {})
            parts = rest.split('.')
            for p in parts[:-1]:
                node = node.setdefault(p, {}) if isinstance(node, dict) else node
            if not isinstance(node, dict):
                raise ConfigError(f'--set {key}: {head} is not a mapping')
            node[parts[-1]] = value
        else:
            raw[key] = value
    raw.setdefault('name', re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem).lstrip('_.-') or 'study')
    return parse_study(raw, source=str(path), base=path.parent.resolve())
