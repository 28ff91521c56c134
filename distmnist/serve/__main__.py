"""python -m distmnist.serve RUN_DIR: the same as ``distmnist serve RUN_DIR``."""

from .command import main

main()
