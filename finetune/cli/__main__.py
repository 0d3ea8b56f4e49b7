"""``python -m finetune.cli``, as ``python -m finetune``."""

import sys

from .app import main

sys.exit(main())
