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
command modules (``python -m distmnist.train``, ``from distmnist import train; train.main(argv)``),
and calling one calls its function in distmnist.api.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

COMMANDS = ("train", "evaluate", "predict")  # modules that are also the API's functions when called
API = ("load_run", "TrainResult", "EpochRecord", "EvalReport", "Prediction", "Mistake")  # distmnist.api
ERRORS = ("DistmnistError", "RunFailed", "RunStopped")  # distmnist.errors: no torch needed to catch them
__all__ = ["__version__", *COMMANDS, *API, *ERRORS]


class CommandModule(types.ModuleType):
    """A command's module that, called, runs the Python API's function of the same name.

    The package attribute ``distmnist.train`` is the module ``distmnist/train.py`` as soon as anything
    imports it (the import system sets it), so the function cannot simply take that name; instead
    the module forwards calls to ``distmnist.api.train`` and reports that function's signature."""

    def _function(self):
        api = importlib.import_module(f"{__name__}.api")
        return getattr(api, self.__name__.rpartition(".")[2])

    def __call__(self, *args, **kwargs):
        return self._function()(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature(distmnist.train), IPython's `?`
        import inspect

        return inspect.signature(self._function())


def command_module(name: str) -> None:
    """Make module ``name`` (one of COMMANDS, imported) callable; a no-op when it runs as __main__."""
    module = sys.modules[name]
    if name.rpartition(".")[2] in COMMANDS:
        module.__class__ = CommandModule


def __getattr__(name: str):
    if name in COMMANDS:
        return importlib.import_module(f"{__name__}.{name}")  # sets the package attribute from now on
    if name in API:
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    if name in ERRORS:
        return getattr(importlib.import_module(f"{__name__}.errors"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
