"""``python -m bnas_nni ...`` is ``bnas-nni ...`` (also what ``torchrun -m bnas_nni`` runs on every rank)."""
import sys

from .cli import main

sys.exit(main())
