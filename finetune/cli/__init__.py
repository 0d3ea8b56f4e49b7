"""The ``finetune`` command line: a thin typer shell over the library.

Every command turns a :class:`~finetune.errors.FinetuneError` into one paragraph on stderr and
exit code 1, with no traceback. Heavy imports (torch, timm) happen inside the commands, so
``finetune ls`` and ``finetune validate`` answer quickly. :mod:`.app` holds the typer app and
:func:`main` (the console-script entry point ``finetune.cli:main``); :mod:`.common` what the
commands share; :mod:`.train`, :mod:`.evaluate`, :mod:`.compare` and :mod:`.show` the commands.

May import every other part of finetune (inside the commands, except :mod:`finetune.errors`);
nothing imports the CLI.
"""

from .app import app, main

__all__ = ["app", "main"]
