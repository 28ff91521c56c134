"""``python -m distmnist.evaluate``: the evaluate command (its code is distmnist/evaluation.py).

This module only starts the command. ``distmnist.evaluate(...)`` is the Python API's function
(distmnist.api.evaluate); import the command's code as ``distmnist.evaluation``.
"""

from distmnist.evaluation import main

if __name__ == "__main__":
    main()
