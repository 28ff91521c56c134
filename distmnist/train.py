"""``python -m distmnist.train``: the train command (its code is distmnist/training.py).

This module only starts the command. ``distmnist.train(...)`` is the Python API's function
(distmnist.api.train); import the command's code as ``distmnist.training``.
"""

from distmnist.training import main

if __name__ == "__main__":
    main()
