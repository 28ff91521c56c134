"""python -m distmnist.serve RUN_DIR: the same as ``distmnist serve RUN_DIR``."""

from distmnist.errors import import_command

import_command("distmnist.serve.command").main()
