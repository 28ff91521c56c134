"""distmnist: the classic MNIST CNN, trained on one CPU, one GPU or many, with Accelerate.

From Python (a script, a notebook, a function under ``accelerate.notebook_launcher``), the same
engine as the command line:

    import distmnist
    result = distmnist.train(data_dir="../shared/mnist", epochs=3)   # = python -m distmnist.train --data-dir ...
    report = distmnist.evaluate(result.weights)                       # = python -m distmnist.evaluate --checkpoint ...
    [p.digit for p in distmnist.predict(result.weights, ["docs/my-digit.png"])]
    distmnist.load_run("runs/mnist")                                  # a finished (or running) run's folder

Importing the package stays cheap (``distmnist --version`` imports it): torch is imported only when
the API is first used. ``distmnist.train``, ``distmnist.evaluate`` and ``distmnist.predict`` are the
functions of distmnist.api; the commands' code is in distmnist.training, distmnist.evaluation and
distmnist.prediction (``python -m distmnist.train`` starts it through a small module of that name,
which nothing imports).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

API = ("train", "evaluate", "predict", "load_run", "TrainResult", "EpochRecord", "EvalReport", "Prediction",
       "Mistake")  # distmnist.api
ERRORS = ("DistmnistError", "RunFailed", "RunStopped")  # distmnist.errors: no torch needed to catch them
__all__ = ["__version__", *API, *ERRORS]


def __getattr__(name: str):
    """The API's names, imported on first use (torch with them)."""
    if name in API:
        value = getattr(importlib.import_module(f"{__name__}.api"), name)
    elif name in ERRORS:
        value = getattr(importlib.import_module(f"{__name__}.errors"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
