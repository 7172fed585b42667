"""What a study concludes: ``summary.json``, ``report.md`` and the two plots, from its result rows.

Contract: the unit of every statistic is the *cell* (a search seed's derived cell, or a random sample):
a cell's accuracy is the mean top-1 of its trainings over the protocol's seeds, and an arm's mean, std,
bootstrap 95 % interval and its comparison with the baseline arm (difference of means, Welch's t-test and
a permutation test) are over its cells, so training-seed noise is not counted as search-seed evidence.
The report also gives the baseline's distribution (min, quartiles, max), the share of baseline cells each
arm's mean beats, and the protocol's own ranking stability: Kendall's tau between the accuracies of the
same cells under the first two training seeds. Plots: accuracy per arm (every cell a point, the mean with
its interval) and accuracy against OPs, or predicted latency when every cell has one, with the Pareto
front. :func:`redraw` rebuilds all of it from ``results.csv`` (``bnas-nni plot STUDY_DIR``).
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..io import atomic_path, atomic_write_text, load_yaml
from . import stats
from .arms import Cost, arm_costs
from .config import StudyConfig, parse_study
from .ranking import RANKING_FILE
from .results import StudyFiles

__all__ = ['budget_table', 'measured_table', 'summarize_study', 'write_report', 'write_plots', 'redraw', 'PLOTS']

PLOTS = ('accuracy_per_arm.png', 'accuracy_vs_cost.png')


def budget_table(costs: Sequence[Cost], study: StudyConfig) -> str:
    """The declared search cost of every arm, side by side (printed before the study runs)."""
    width = max(len(c.arm) for c in costs)
    lines = ['search budget per arm (one search; image-epochs = images x epochs through a trained network):']
    for cost, arm in zip(costs, study.arms):
        runs = f'x {len(arm.seeds)} search seeds' if not arm.is_random else 'baseline'
        lines.append(f'  {cost.arm:<{width}}  {cost.image_epochs:>12,}  {cost.detail}  [{runs}]')
    return '\n'.join(lines)


def measured_table(study: StudyConfig, files: StudyFiles, costs: Sequence[Cost]) -> str:
    """Declared and measured cost of every arm's searches side by side (printed once the cells exist)."""
    width = max(len(c.arm) for c in costs)
    lines = ['search cost per arm, declared and measured (mean over its searches):']
    for cost, arm in zip(costs, study.arms):
        if arm.is_random:
            lines.append(f'  {cost.arm:<{width}}  {0:>12,}  no search')
            continue
        runs = [m['search'] for m in (files.read_cell(f'{arm.name}-s{s}') for s in arm.seeds) if m is not None]
        cpu = stats.mean([r['cpu_seconds'] for r in runs])
        wall = stats.mean([r['wall_seconds'] for r in runs])
        lines.append(f'  {cost.arm:<{width}}  {cost.image_epochs:>12,}  {cpu:8.1f} CPU s  {wall:8.1f} wall s  '
                     f'({len(runs)} searches)')
    return '\n'.join(lines)


def _num(x: Any) -> Any:
    """JSON-safe number (nan -> None)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def _cell_means(rows: Sequence[Dict[str, Any]]) -> 'OrderedDict[str, Dict[str, Any]]':
    cells: 'OrderedDict[str, Dict[str, Any]]' = OrderedDict()
    for r in rows:
        c = cells.setdefault(r['cell'], {'arm': r['arm'], 'top1': [], 'ops_m': r.get('ops_m'),
                                         'latency_ms': r.get('latency_ms'), 'seeds': {}})
        c['top1'].append(float(r['top1']))
        c['seeds'][int(r['seed'])] = float(r['top1'])
    for c in cells.values():
        c['mean'] = float(np.mean(c['top1']))
    return cells


def summarize_study(study: StudyConfig, rows: Sequence[Dict[str, Any]], costs: Sequence[Cost],
                    search_meta: Dict[str, Dict[str, Any]],
                    ranking: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The numbers of the report (see the module docstring); ``search_meta``: cell -> its cells/<cell>.json;
    ``ranking``: the one-shot accuracies of :func:`bnas_nni.study.ranking.rank_cells`, if any."""
    cells = _cell_means(rows)
    by_arm = {a.name: [c['mean'] for c in cells.values() if c['arm'] == a.name] for a in study.arms}
    base = by_arm.get(study.baseline) if study.baseline else None
    cost_of = {c.arm: c for c in costs}
    arms = []
    for a in study.arms:
        xs = by_arm[a.name]
        arm_rows = [r for r in rows if r['arm'] == a.name]
        lo, hi = stats.bootstrap_ci(xs, samples=study.bootstrap_samples, seed=study.stats_seed)
        searches = [m['search'] for m in search_meta.values() if m.get('arm') == a.name and not a.is_random]
        entry: Dict[str, Any] = {
            'arm': a.name, 'strategy': a.strategy or 'random cells', 'kind': a.kind, 'cells': len(xs),
            'trainings': len(arm_rows),
            'search_cost_image_epochs': cost_of[a.name].image_epochs, 'search_cost': cost_of[a.name].detail,
            'search_cpu_seconds_mean': _num(stats.mean([s['cpu_seconds'] for s in searches])) if searches else None,
            'search_wall_seconds_mean': _num(stats.mean([s['wall_seconds'] for s in searches])) if searches else None,
            'top1_mean': _num(stats.mean(xs)), 'top1_std': _num(stats.std(xs)), 'top1_ci95': [_num(lo), _num(hi)],
            'top1_trainings_mean': _num(stats.mean([r['top1'] for r in arm_rows])),
            'top1_trainings_std': _num(stats.std([r['top1'] for r in arm_rows])),
            'ops_m_mean': _num(stats.mean([c['ops_m'] for c in cells.values() if c['arm'] == a.name
                                           and c['ops_m'] is not None])),
            'latency_ms_mean': _num(stats.mean([c['latency_ms'] for c in cells.values() if c['arm'] == a.name
                                                and c['latency_ms'] is not None])),
            'cell_top1': {name: _num(c['mean']) for name, c in cells.items() if c['arm'] == a.name},
        }
        if base is not None and a.name != study.baseline:
            t, p = stats.welch_t_test(xs, base)
            entry.update(diff_vs_baseline=_num(stats.mean(xs) - stats.mean(base)), welch_t=_num(t), p_welch=_num(p),
                         p_permutation=_num(stats.permutation_test(xs, base, samples=study.bootstrap_samples,
                                                                   seed=study.stats_seed)) if xs and base else None,
                         beats_baseline_share=_num(np.mean([b < stats.mean(xs) for b in base])) if xs and base
                         else None)
        arms.append(entry)
    summary: Dict[str, Any] = {
        'study': study.name, 'dataset': study.dataset, 'space': study.space, 'baseline': study.baseline,
        'protocol': {'config': study.train_config, 'train': study.train, 'seeds': study.train_seeds},
        'trainings': len(rows), 'cells': len(cells), 'arms': arms,
    }
    if base:
        q = np.quantile(base, [0, 0.25, 0.5, 0.75, 1.0])
        summary['baseline_distribution'] = {'n': len(base), 'min': _num(q[0]), 'q25': _num(q[1]),
                                            'median': _num(q[2]), 'q75': _num(q[3]), 'max': _num(q[4])}
    if len(study.train_seeds) >= 2:
        s0, s1 = study.train_seeds[:2]
        both = [c for c in cells.values() if s0 in c['seeds'] and s1 in c['seeds']]
        tau, p = stats.kendall_tau([c['seeds'][s0] for c in both], [c['seeds'][s1] for c in both])
        summary['seed_rank_tau'] = {'seeds': [s0, s1], 'cells': len(both), 'tau': _num(tau), 'p': _num(p)}
    if ranking and ranking.get('cells'):
        ranked = [n for n in cells if n in ranking['cells']]
        one_shot = [ranking['cells'][n]['top1'] for n in ranked]
        tau, p = stats.kendall_tau(one_shot, [cells[n]['mean'] for n in ranked])
        summary['supernet_ranking'] = {**ranking['key'], 'cells': len(ranked), 'tau': _num(tau), 'p': _num(p),
                                       'one_shot_top1': {n: _num(v) for n, v in zip(ranked, one_shot)}}
    return summary


def _fmt(x: Any, spec: str = '.2f', none: str = '–') -> str:
    return none if x is None else format(x, spec)


def report_markdown(study: StudyConfig, summary: Dict[str, Any]) -> str:
    latency = any(a['latency_ms_mean'] is not None for a in summary['arms'])
    head = ['arm', 'search cost (image-epochs)', 'search CPU s', 'cells', 'trainings', 'top-1 % mean ± std',
            '95 % CI', f'Δ vs {study.baseline}', 'p (Welch)', 'p (perm.)', 'OPs (M)'] + (['latency ms'] if latency
                                                                                          else [])
    lines = [f'# Study {study.name}', '', study.description or '', '',
             f'Dataset {study.dataset}, space {study.space}; every cell trained from scratch with '
             f'`{Path(study.train_config).name if study.train_config else "defaults"}` + {study.train or {}} '
             f'for seeds {study.train_seeds}, top-1 on the held-out split. Statistics over cells (each cell: the '
             f'mean over its training seeds); 95 % bootstrap interval ({study.bootstrap_samples} resamples, seed '
             f'{study.stats_seed}).', '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for a in summary['arms']:
        cells = [a['arm'], f"{a['search_cost_image_epochs']:,} ({a['search_cost']})",
                 _fmt(a['search_cpu_seconds_mean'], '.0f'), str(a['cells']), str(a['trainings']),
                 f"{_fmt(a['top1_mean'])} ± {_fmt(a['top1_std'])}",
                 f"[{_fmt(a['top1_ci95'][0])}, {_fmt(a['top1_ci95'][1])}]",
                 _fmt(a.get('diff_vs_baseline'), '+.2f'), _fmt(a.get('p_welch'), '.3f'),
                 _fmt(a.get('p_permutation'), '.3f'), _fmt(a['ops_m_mean'], '.2f')]
        if latency:
            cells.append(_fmt(a['latency_ms_mean'], '.3f'))
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
    dist = summary.get('baseline_distribution')
    if dist:
        lines.append(f"Baseline {study.baseline} ({dist['n']} cells): min {_fmt(dist['min'])}, quartiles "
                     f"{_fmt(dist['q25'])} / {_fmt(dist['median'])} / {_fmt(dist['q75'])}, max {_fmt(dist['max'])}.")
        for a in summary['arms']:
            if a.get('beats_baseline_share') is not None:
                lines.append(f"- {a['arm']}: its mean beats {a['beats_baseline_share']:.0%} of the baseline's cells.")
        lines.append('')
    tau = summary.get('seed_rank_tau')
    if tau:
        lines.append(f"Protocol ranking stability: Kendall τ = {_fmt(tau['tau'], '.3f')} (p {_fmt(tau['p'], '.3f')}) "
                     f"between training seeds {tau['seeds'][0]} and {tau['seeds'][1]} over {tau['cells']} cells.")
        lines.append('')
    rank = summary.get('supernet_ranking')
    if rank:
        lines.append(f"Supernet ranking: Kendall τ = {_fmt(rank['tau'], '.3f')} (p {_fmt(rank['p'], '.3f')}) between "
                     f"the one-shot top-1 of {rank['cells']} cells in the supernet of {rank['arm']} seed "
                     f"{rank['seed']} ({rank['images']} validation images, BN re-estimated on {rank['bn_batches']} "
                     'batches) and their stand-alone top-1.')
        lines.append('')
    lines.append('Per cell (mean top-1 over training seeds):')
    lines.append('')
    one_shot = (rank or {}).get('one_shot_top1', {})
    for a in summary['arms']:
        lines.append(f"- {a['arm']}: " + ', '.join(
            f'{c} {_fmt(v)}' + (f' (one-shot {_fmt(one_shot[c])})' if one_shot.get(c) is not None else '')
            for c, v in a['cell_top1'].items()))
    lines += ['', '![accuracy per arm](accuracy_per_arm.png)', '', '![accuracy vs cost](accuracy_vs_cost.png)', '']
    return '\n'.join(lines)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)


def write_plots(study: StudyConfig, files: StudyFiles, rows: Sequence[Dict[str, Any]],
                summary: Dict[str, Any]) -> List[Path]:
    """``accuracy_per_arm.png`` and ``accuracy_vs_cost.png`` in the study directory."""
    import matplotlib  # plotting libraries load only when a study draws

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cells = _cell_means(rows)
    names = [a.name for a in study.arms]
    colors = {n: plt.get_cmap('tab10')(i % 10) for i, n in enumerate(names)}
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(names), 4.2))
    for i, a in enumerate(summary['arms']):
        ys = list(a['cell_top1'].values())
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, s=22, alpha=0.75, color=colors[a['arm']])
        if a['top1_mean'] is not None:
            lo, hi = a['top1_ci95']
            ax.errorbar([i + 0.28], [a['top1_mean']], yerr=[[a['top1_mean'] - lo], [hi - a['top1_mean']]],
                        fmt='D', color='black', capsize=4, markersize=5)
    base = next((a for a in summary['arms'] if a['arm'] == study.baseline), None)
    if base is not None and base['top1_mean'] is not None:
        ax.axhline(base['top1_mean'], color='gray', linestyle=':', linewidth=1, label=f'{study.baseline} mean')
        ax.legend(fontsize=8, loc='lower right')
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel('top-1 % (cell mean over training seeds)')
    ax.set_title(f'{study.name}: accuracy per arm (mean, 95% bootstrap CI)', fontsize=9)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    out = [files.root / PLOTS[0]]
    _save(fig, out[0])
    plt.close(fig)

    use_latency = bool(cells) and all(c['latency_ms'] is not None for c in cells.values())
    key, label = ('latency_ms', 'predicted latency (ms per batch)') if use_latency else ('ops_m', 'OPs (M)')
    pts = [(c[key], c['mean'], c['arm']) for c in cells.values() if c[key] is not None]
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for n in names:
        sel = [(x, y) for x, y, a in pts if a == n]
        if sel:
            ax.scatter(*zip(*sel), s=26, alpha=0.8, color=colors[n], label=n)
    if pts:
        front = stats.pareto_front([p[0] for p in pts], [p[1] for p in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], '--', color='gray', drawstyle='steps-post',
                label='Pareto front')
    ax.set_xlabel(label)
    ax.set_ylabel('top-1 %')
    ax.set_title(f'{study.name}: accuracy vs {"latency" if use_latency else "OPs"}', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(files.root / PLOTS[1])
    _save(fig, out[1])
    plt.close(fig)
    return out


def _search_meta(study: StudyConfig, files: StudyFiles, rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    meta = {}
    for cell in dict.fromkeys(r['cell'] for r in rows):
        m = files.read_cell(cell)
        if m is not None:
            meta[cell] = m
    return meta


def _saved_ranking(study: StudyConfig, files: StudyFiles) -> Optional[Dict[str, Any]]:
    """``ranking.json`` when the study asks for a supernet ranking and the file holds that one."""
    path = files.root / RANKING_FILE
    if not study.supernet_ranking or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get('key') == dict(study.supernet_ranking) else None


def write_report(study: StudyConfig, files: StudyFiles, rows: Sequence[Dict[str, Any]],
                 costs: Sequence[Cost]) -> Dict[str, Any]:
    """``summary.json``, ``report.md`` and the plots; returns the summary."""
    summary = summarize_study(study, rows, costs, _search_meta(study, files, rows), _saved_ranking(study, files))
    atomic_write_text(files.summary_path, json.dumps(summary, indent=1) + '\n')
    atomic_write_text(files.report_path, report_markdown(study, summary))
    if rows:
        write_plots(study, files, rows, summary)
    return summary


def redraw(run_dir: str | Path) -> List[Path]:
    """Rebuild summary, report and plots of a study directory from its ``results.csv``."""
    files = StudyFiles(run_dir)
    if not files.csv_path.is_file():
        raise ConfigError(f'{run_dir} has no results.csv yet: no training of the study has finished')
    study = parse_study(load_yaml(files.study_path), source=str(files.study_path))
    rows = files.read_csv()
    write_report(study, files, rows, arm_costs(study))
    return [files.summary_path, files.report_path] + [files.root / p for p in PLOTS]
