"""``python -m distmnist.train``: the train command (its code is distmnist/training.py).

This module only starts the command. ``distmnist.train(...)`` is the Python API's function
(distmnist.api.train); import the command's code as ``distmnist.training``.
"""

if __name__ == "__main__":  # a Ctrl-C during the imports ends with one line (errors.import_command)
    from distmnist.errors import import_command

    import_command("distmnist.training").main()
else:
    from distmnist.training import main  # noqa: F401  # the command's entry, for whoever imports this module
