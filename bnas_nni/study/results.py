"""The files of a study's run directory, and its results keyed by (arm, cell, seed).

Layout::

    <study>/study.yaml                the validated study (a continued study must match it)
    <study>/cells/<cell>.yaml         a cell's genotype, written once its search finished (or it was sampled)
    <study>/cells/<cell>.json         what is known of the cell: arm, search seed, OPs, params, search cost
    <study>/searches/<arm>/seed<k>/   the search run of one arm and search seed (resumable where the strategy is)
    <study>/trainings/<cell>/seed<k>/ the training run of one cell and training seed (resumable)
    <study>/results/<cell>__seed<k>.json   one finished training: its results.csv row
    <study>/results.csv               every finished training, one row each, in plan order
    <study>/events.log                one line per search or training started or finished

Contract: a result file exists only for a finished training (written atomically after it ended), so a
study killed at any point, kill -9 included, continues by skipping every key that has one; nothing
finished is ever redone. ``results.csv`` is rebuilt from the result files, never appended to.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..io import append_text, atomic_write_text

__all__ = ['Job', 'StudyFiles', 'ROW_FIELDS', 'TIMING_FIELDS']

#: the columns of results.csv
ROW_FIELDS = ['arm', 'strategy', 'cell', 'search_seed', 'seed', 'top1', 'top5', 'loss', 'best_top1', 'epochs',
              'ops_m', 'params', 'latency_ms', 'genotype', 'train_seconds', 'cpu_seconds']
#: columns that depend on the machine's load, not on the computation (left out when rows are compared)
TIMING_FIELDS = ('train_seconds', 'cpu_seconds')


@dataclass(frozen=True, order=True)
class Job:
    """One training of the study: a cell of an arm, trained with one seed. Its NNI parameters are
    ``{'arm': ..., 'cell': ..., 'seed': ...}``."""

    arm: str
    cell: str
    seed: int

    @property
    def key(self) -> str:
        return f'{self.arm}/{self.cell}/seed{self.seed}'

    def params(self) -> Dict[str, Any]:
        return {'arm': self.arm, 'cell': self.cell, 'seed': int(self.seed)}


class StudyFiles:
    """Paths and keyed records of one study run directory (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    @property
    def study_path(self) -> Path:
        return self.root / 'study.yaml'

    @property
    def csv_path(self) -> Path:
        return self.root / 'results.csv'

    @property
    def summary_path(self) -> Path:
        return self.root / 'summary.json'

    @property
    def report_path(self) -> Path:
        return self.root / 'report.md'

    @property
    def events_path(self) -> Path:
        return self.root / 'events.log'

    def cell_genotype(self, cell: str) -> Path:
        return self.root / 'cells' / f'{cell}.yaml'

    def cell_meta_path(self, cell: str) -> Path:
        return self.root / 'cells' / f'{cell}.json'

    def search_dir(self, arm: str, seed: int) -> Path:
        return self.root / 'searches' / arm / f'seed{seed}'

    def training_dir(self, job: Job) -> Path:
        return self.root / 'trainings' / job.cell / f'seed{job.seed}'

    def result_path(self, job: Job) -> Path:
        return self.root / 'results' / f'{job.cell}__seed{job.seed}.json'

    # ------------------------------------------------------------------ records
    def event(self, text: str) -> None:
        """One line of ``events.log`` (what started and finished, with the time and the PID)."""
        self.root.mkdir(parents=True, exist_ok=True)
        append_text(self.events_path, f'{time.strftime("%Y-%m-%dT%H:%M:%S")} {text}\n')

    def events(self) -> List[str]:
        try:
            return [line.split(' ', 1)[1] for line in self.events_path.read_text().splitlines() if ' ' in line]
        except FileNotFoundError:
            return []

    def read_cell(self, cell: str) -> Optional[Dict[str, Any]]:
        path = self.cell_meta_path(cell)
        if not (path.is_file() and self.cell_genotype(cell).is_file()):
            return None
        return json.loads(path.read_text())

    def write_cell_meta(self, cell: str, meta: Dict[str, Any]) -> None:
        atomic_write_text(self.cell_meta_path(cell), json.dumps(meta, indent=1, sort_keys=True) + '\n')

    def read_result(self, job: Job) -> Optional[Dict[str, Any]]:
        path = self.result_path(job)
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def write_result(self, job: Job, row: Dict[str, Any]) -> None:
        atomic_write_text(self.result_path(job), json.dumps(row, indent=1) + '\n')

    def rows(self, jobs: Sequence[Job]) -> List[Dict[str, Any]]:
        """The finished rows of ``jobs``, in their order."""
        return [r for r in (self.read_result(j) for j in jobs) if r is not None]

    def write_csv(self, rows: Sequence[Dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=ROW_FIELDS, extrasaction='ignore', lineterminator='\n')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ('' if row.get(k) is None else row.get(k)) for k in ROW_FIELDS})
        atomic_write_text(self.csv_path, buf.getvalue())

    def read_csv(self) -> List[Dict[str, Any]]:
        """``results.csv`` with numbers as numbers (what ``bnas-nni plot STUDY_DIR`` redraws from)."""
        with open(self.csv_path, newline='') as f:
            rows = list(csv.DictReader(f))
        out = []
        for row in rows:
            parsed: Dict[str, Any] = {}
            for k, v in row.items():
                if v == '':
                    parsed[k] = None
                elif k in ('arm', 'strategy', 'cell', 'genotype'):
                    parsed[k] = v
                elif k in ('search_seed', 'seed', 'epochs', 'params'):
                    parsed[k] = int(float(v))
                else:
                    parsed[k] = float(v)
            out.append(parsed)
        return out
