"""``python -m distmnist.evaluate``: the evaluate command (its code is distmnist/evaluation.py).

This module only starts the command. ``distmnist.evaluate(...)`` is the Python API's function
(distmnist.api.evaluate); import the command's code as ``distmnist.evaluation``.
"""

if __name__ == "__main__":  # a Ctrl-C during the imports ends with one line (errors.import_command)
    from distmnist.errors import import_command

    import_command("distmnist.evaluation").main()
else:
    from distmnist.evaluation import main  # noqa: F401  # the command's entry, for whoever imports this module
