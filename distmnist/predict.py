"""``python -m distmnist.predict``: the predict command (its code is distmnist/prediction.py).

This module only starts the command. ``distmnist.predict(...)`` is the Python API's function
(distmnist.api.predict); import the command's code as ``distmnist.prediction``.
"""

if __name__ == "__main__":  # a Ctrl-C during the imports ends with one line (errors.import_command)
    from distmnist.errors import import_command

    import_command("distmnist.prediction").main()
else:
    from distmnist.prediction import main  # noqa: F401  # the command's entry, for whoever imports this module
