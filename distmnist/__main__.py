"""python -m distmnist COMMAND ...: the same as the ``distmnist`` command, for environments without its script."""

from .cli import main

raise SystemExit(main())
