"""``python -m distmnist.predict``: the predict command (its code is distmnist/prediction.py).

This module only starts the command. ``distmnist.predict(...)`` is the Python API's function
(distmnist.api.predict); import the command's code as ``distmnist.prediction``.
"""

from distmnist.prediction import main

if __name__ == "__main__":
    main()
