#!/usr/bin/env python
"""NNI trial: one BNAS search, reported to the NNI web UI (see bnas_nni/strategy/search_trial.py).

    python trainers/search_trial.py --config experiments/search_quick_fashion.yaml [--set KEY=VALUE] [--final KEY=VALUE]

Launched by ``nnictl create --config experiments/nnictl_search_grid.yml``; runs standalone as well.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a fresh clone without `pip install -e .`

from bnas_nni.search.trial import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
