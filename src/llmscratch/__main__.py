"""``python -m llmscratch``, which is what ``torchrun -m llmscratch`` runs."""

import sys

from .cli import main

sys.exit(main())
