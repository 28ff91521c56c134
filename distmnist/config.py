"""One typed, validated training config: defaults < YAML file (--config) < command line.

The same name is used everywhere: ``batch_size`` in YAML and in the dataclass is
``--batch-size`` on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .args import ArgumentParser, did_you_mean
from .errors import DistmnistError
from .files import check_file

MAX_SEED = 2**32 - 1  # torch takes 64-bit seeds, but seed + rank and seed + epoch must not overflow
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
MAX_EPOCHS = 1_000_000  # nothing set up grows with the run's length; the bound keeps step counts far from int64
MAX_BATCH = 1_000_000  # images per step: more than MNIST holds, far below int64 and memory overflows
MAX_LIMIT = 10**9  # --limit-train / --limit-test / --val-size: more images than any IDX file can hold
PATH_FIELDS = ("data_dir", "output_dir", "resume")  # a number here is a mistake, not a folder name
MAX_CONFIG_BYTES = 1 << 20  # a config of a dozen options: anything bigger is not one
MAX_YAML_ALIASES = 20  # enough for any sane config, too few for an exponential "billion laughs"


def _opt(default: Any, help: str, *, choices: Sequence[str] | None = None, metavar: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class TrainConfig:
    # data
    data_dir: str = _opt("data", "folder holding MNIST (the four IDX files, .gz or not, directly or under "
                         "MNIST/raw/); downloaded there by torchvision if missing", metavar="DIR")
    no_download: bool = _opt(False, "never download: fail with a clear error if the files are not in --data-dir")
    limit_train: int | None = _opt(None, "use only the first N training images (quick runs)", metavar="N")
    limit_test: int | None = _opt(None, "use only the first N test images (quick runs)", metavar="N")
    val_size: int = _opt(0, "hold out N training images as a validation set (the same N images on every rank, "
                         "drawn with --seed); each epoch reports validation accuracy and the best epoch's weights "
                         "are kept as best.safetensors; 0 = none, the tutorial's recipe", metavar="N")
    early_stop: int = _opt(0, "stop once validation accuracy has not improved for N epochs (needs --val-size); "
                           "0 = never", metavar="PATIENCE")
    data_path: str = _opt("auto", "how batches reach the model: 'resident' keeps the data set on the device "
                          "and gathers batches there, 'loader' uses a DataLoader; auto = resident",
                          choices=("auto", "resident", "loader"))
    # recipe (the tutorial's)
    epochs: int = _opt(10, "number of passes over the training set")
    batch_size: int = _opt(100, "training images per process per step (global batch = this x world size); "
                           "ignored with --global-batch-size")
    global_batch_size: int | None = _opt(None, "training images per step over all processes together (G / world "
                                         "size per process): the same batches, dropout masks and weights on any "
                                         "number of processes; unset = --batch-size per process", metavar="G")
    test_batch_size: int = _opt(1000, "test images per process per evaluation batch")
    lr: float = _opt(0.01, "SGD learning rate (finite, > 0)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "SGD weight decay (L2 penalty added to the gradient)", metavar="WD")
    nesterov: bool = _opt(False, "Nesterov momentum")
    lr_schedule: str = _opt("constant", "learning-rate schedule over the optimizer steps, --lr being its peak: "
                            "constant, step (x --lr-gamma every --lr-step-size steps), cosine (down to --min-lr), "
                            "onecycle (OneCycleLR: lr/25 up to lr, then down to lr/25/1e4)",
                            choices=("constant", "step", "cosine", "onecycle"))
    warmup_steps: int = _opt(0, "linear warm-up: step t < N runs at lr x (t+1)/N; for onecycle, the rising part "
                             "(0 = the first 3 tenths of the run, as OneCycleLR)", metavar="N")
    lr_step_size: int = _opt(0, "step schedule: optimizer steps between two decays (0 = one epoch)", metavar="N")
    lr_gamma: float = _opt(0.7, "step schedule: factor of each decay", metavar="G")
    min_lr: float = _opt(0.0, "cosine schedule: the learning rate it ends at", metavar="LR")
    seed: int = _opt(1, f"random seed (weights, shuffling, dropout), 0 to {MAX_SEED}")
    # hardware
    mixed_precision: str = _opt("no", "autocast precision through Accelerate (fp16 needs a GPU)",
                                choices=("no", "fp16", "bf16"))
    cpu: bool = _opt(False, "train on the CPU even if a GPU is present")
    cuda_graphs: str = _opt("auto", "capture the training step as a CUDA graph (auto = on for one CUDA process "
                            "without fp16)", choices=("auto", "on", "off"))
    # output
    output_dir: str = _opt("runs/mnist", "where checkpoints, metrics.jsonl and model.safetensors go", metavar="DIR")
    resume: str | None = _opt(None, "'auto' = continue the run in --output-dir from its newest checkpoint (fresh "
                              "start if there is none), or a checkpoint folder or run folder to continue from",
                              metavar="{auto,PATH}")
    overwrite: bool = _opt(False, "start over in an --output-dir that holds another run, deleting that run's files "
                           "first (without it such a folder is refused)")
    keep_checkpoints: int = _opt(0, "keep only the newest K checkpoints, pruned after a new one is complete "
                                 "(0 = keep all)", metavar="K")
    checkpoint_every: str | None = _opt(None, "also checkpoint in the middle of epochs: every N optimizer steps "
                                        "(e.g. 500) or every M minutes (e.g. 10m), so that a lost process costs "
                                        "that much at most; unset = at epoch ends only", metavar="{N,Mm}")
    setup_timeout: float = _opt(1800.0, "seconds set-up may take (process group, data, checkpoint, model) before "
                                "the process exits 1; a stuck rendezvous or rank ends instead of hanging",
                                metavar="SECONDS")
    dist_timeout: float = _opt(600.0, "seconds a collective may wait for another rank once training runs "
                               "(a hung or lost rank ends the run instead of blocking it)", metavar="SECONDS")
    log_with: str | None = _opt(None, "also log metrics to an Accelerate tracker (tensorboard, wandb, mlflow, ...); "
                                "the package must be installed", metavar="TRACKER")
    log_every: int = _opt(0, "also send the loss and learning rate of every Nth optimizer step to the --log-with "
                          "tracker, read at the end of each epoch (0 = epochs only)", metavar="N")
    log_interval: float = _opt(10.0, "plain console: seconds between progress lines, across epochs", metavar="SECONDS")
    progress: str = _opt("auto", "console: rich bars, plain lines, or nothing (auto = rich on a terminal)",
                         choices=("auto", "rich", "plain", "none"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check(cfg: TrainConfig) -> None:
    """Reject impossible values at start-up, naming the flag."""
    bounded = {"epochs": MAX_EPOCHS, "batch_size": MAX_BATCH, "test_batch_size": MAX_BATCH,
               "global_batch_size": MAX_BATCH, "limit_train": MAX_LIMIT, "limit_test": MAX_LIMIT}
    for name, most in bounded.items():
        value = getattr(cfg, name)
        if value is not None and not 1 <= value <= most:
            raise DistmnistError(f"--{_flag(name)} must be between 1 and {most:,}, got {value}")
    checkpoint_interval(cfg.checkpoint_every)
    if not 0 < cfg.setup_timeout <= MAX_DIST_TIMEOUT_S:
        raise DistmnistError(f"--setup-timeout must be > 0 and at most {MAX_DIST_TIMEOUT_S:g} seconds (7 days), "
                             f"got {cfg.setup_timeout}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise DistmnistError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise DistmnistError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.keep_checkpoints < 0:
        raise DistmnistError(f"--keep-checkpoints must be >= 0, got {cfg.keep_checkpoints}")
    if not 0 < cfg.dist_timeout <= MAX_DIST_TIMEOUT_S:
        raise DistmnistError(f"--dist-timeout must be > 0 and at most {MAX_DIST_TIMEOUT_S:g} seconds (7 days), "
                             f"got {cfg.dist_timeout}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise DistmnistError(f"--seed must be between 0 and {MAX_SEED}, got {cfg.seed}")
    for name in ("warmup_steps", "lr_step_size", "log_every"):
        if not 0 <= getattr(cfg, name) <= MAX_EPOCHS * MAX_LIMIT:
            raise DistmnistError(f"--{_flag(name)} must be between 0 and {MAX_EPOCHS * MAX_LIMIT:,}, got "
                                 f"{getattr(cfg, name)}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise DistmnistError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if cfg.nesterov and cfg.momentum == 0:
        raise DistmnistError("--nesterov needs a momentum > 0 (--momentum)")
    if not (math.isfinite(cfg.lr_gamma) and cfg.lr_gamma > 0):
        raise DistmnistError(f"--lr-gamma must be a finite number > 0, got {cfg.lr_gamma}")
    if not 0 <= cfg.min_lr < cfg.lr:
        raise DistmnistError(f"--min-lr must be in [0, --lr), got {cfg.min_lr}")
    if not (math.isfinite(cfg.log_interval) and cfg.log_interval > 0):
        raise DistmnistError(f"--log-interval must be a finite number > 0, got {cfg.log_interval}")
    for name, most in (("val_size", MAX_LIMIT), ("early_stop", MAX_EPOCHS)):
        if not 0 <= getattr(cfg, name) <= most:
            raise DistmnistError(f"--{_flag(name)} must be between 0 and {most:,}, got {getattr(cfg, name)}")
    if cfg.early_stop and not cfg.val_size:
        raise DistmnistError("--early-stop needs a validation set to watch: add --val-size N (e.g. 5000)")
    if cfg.log_every and cfg.log_with is None:
        raise DistmnistError("--log-every needs a tracker to send the steps to: add --log-with (tensorboard, ...)")
    for name, f in FIELDS.items():
        choices = f.metadata["choices"]
        if choices and getattr(cfg, name) not in choices:
            raise DistmnistError(f"--{_flag(name)} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class Interval:
    """--checkpoint-every: a number of optimizer steps, or of seconds (given in minutes)."""

    steps: int | None = None
    seconds: float | None = None

    def describe(self) -> str:
        if self.steps or self.seconds is None:
            return f"every {self.steps:,} steps"
        return f"every {self.seconds / 60:g} minutes"


def checkpoint_interval(text: str | None) -> Interval | None:
    """'500' = every 500 optimizer steps, '10m' = every 10 minutes (a float: '0.5m'); None = not set."""
    if text is None:
        return None
    value = text.strip().lower()
    try:
        if value.endswith(("m", "min")):
            minutes = float(value.removesuffix("min").removesuffix("m"))
            if math.isfinite(minutes) and 0 < minutes <= MAX_DIST_TIMEOUT_S / 60:
                return Interval(seconds=minutes * 60)
        elif value.isdigit() and 1 <= int(value) <= MAX_EPOCHS * MAX_LIMIT:
            return Interval(steps=int(value))
    except ValueError:
        pass
    raise DistmnistError(f"--checkpoint-every must be a number of optimizer steps (e.g. 500) or of minutes (e.g. "
                         f"10m), at least 1 step or a minute above 0, got {text!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Type-check one value from YAML against the dataclass field type."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if isinstance(value, (list, dict, set, tuple)):  # never repr() these: aliases can nest them deeply
        raise DistmnistError(f"{source}: '{name}' must be {kind.split(' |')[0]}, got a {type(value).__name__}")
    if value is None:
        if "None" in kind:
            return None
        raise DistmnistError(f"{source}: '{name}' may not be empty")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif kind.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind.startswith("str"):
        if isinstance(value, str):
            return value
        if name in PATH_FIELDS:
            raise DistmnistError(f"{source}: '{name}' must be a path (a string), got {type(value).__name__} {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # checkpoint_every: 500
            return str(value)
    raise DistmnistError(f"{source}: '{name}' must be {kind.split(' |')[0]}, got {value!r}")


def _parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with limits: few aliases (no exponential "billion laughs"), no duplicate keys."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases = getattr(self, "aliases", 0) + 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise DistmnistError(f"{source}: more than {MAX_YAML_ALIASES} YAML aliases; a config needs none")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                if key in seen:
                    raise DistmnistError(f"{source}: duplicate key '{key}' (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise DistmnistError(f"{source} is not valid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    found = check_file(p, "--config", advice="give a YAML file of option: value lines")
    if found is None:
        raise DistmnistError(f"--config: no such file: {p}")
    if found.st_size > MAX_CONFIG_BYTES:  # before reading it
        raise DistmnistError(f"--config: {p} is {found.st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
    try:
        with open(p, "rb") as fh:
            raw_bytes = fh.read(MAX_CONFIG_BYTES + 1)  # a file that grew since: still no more than this
    except OSError as err:
        raise DistmnistError(f"--config: cannot read {p}: {err.strerror or err}") from None
    if len(raw_bytes) > MAX_CONFIG_BYTES:
        raise DistmnistError(f"--config: {p} is over {MAX_CONFIG_BYTES:,} bytes; a config file is at most that")
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DistmnistError(f"--config: {p} is not UTF-8 text (byte {err.start}: {raw_bytes[err.start]:#04x})") \
            from None
    raw = _parse_yaml(text, f"--config: {p}") or {}
    if not isinstance(raw, dict):
        raise DistmnistError(f"--config: {p} must hold a mapping of option: value")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise DistmnistError(f"--config: unknown key '{key}' in {p}{did_you_mean(name, FIELDS)} "
                                 f"(known: {', '.join(FIELDS)})")
        out[name] = _coerce(name, value, f"--config {p}")
    return out


def build_parser(prog: str = "distmnist train") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Train the classic MNIST CNN on one CPU, one GPU or many (launch with accelerate launch "
        "or torchrun for several processes).",
        argument_default=argparse.SUPPRESS,  # only flags the user gave reach the namespace
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of options (snake_case keys); flags win (default: none)")
    for name, f in FIELDS.items():
        kwargs: dict[str, Any] = {"help": f.metadata["help"] + f" (default: {f.default})"}
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind.startswith("bool"):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata["metavar"]:
                kwargs["metavar"] = f.metadata["metavar"]
        parser.add_argument(f"--{_flag(name)}", **kwargs)
    return parser


# How and where this launch runs, not what the run trains: a resumed run never takes them from its record.
LAUNCH_FIELDS = frozenset({"output_dir", "resume", "overwrite", "cpu", "progress", "log_interval", "dist_timeout",
                           "setup_timeout"})
# Where this machine keeps the data: each process keeps its own when its command gives them (the ranks
# then check that they all read the same images); otherwise it takes the main process's.
MACHINE_FIELDS = frozenset({"data_dir", "no_download"})


@dataclass(frozen=True)
class Request:
    """What one command asks for: its config, and the fields it set itself (on the command line or in
    the --config file it names). A resumed run keeps its recorded recipe; only those fields override it."""

    cfg: TrainConfig
    explicit: frozenset[str] = frozenset()

    def continuing(self, recorded: Mapping[str, Any], source: str) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
        """The config of a resumed run: the recorded one (``source`` names where it comes from), with this
        request's explicit fields and launch fields over it; and {field: (recorded, now)} for each explicit
        field that changes the recorded value."""
        taken = {}
        for name, value in recorded.items():
            if name in FIELDS and name not in LAUNCH_FIELDS and name not in self.explicit:
                taken[name] = _coerce(name, value, source)
        cfg = dataclasses.replace(self.cfg, **taken)
        _check(cfg)
        changes = {name: (recorded[name], getattr(cfg, name)) for name in FIELDS
                   if name in self.explicit and name not in LAUNCH_FIELDS and name in recorded
                   and recorded[name] != getattr(cfg, name)}
        return cfg, changes

    def on_this_machine(self, cfg: TrainConfig) -> TrainConfig:
        """The main process's config for this run, with this process's own data location where it gave one."""
        return dataclasses.replace(cfg, **{name: getattr(self.cfg, name) for name in MACHINE_FIELDS
                                          if name in self.explicit})


def parse_request(argv: Sequence[str] | None = None, prog: str = "distmnist train") -> Request:
    """Defaults, then the YAML file of --config, then the command line; validated, with what was set."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in args:
        values.update(load_yaml(args.pop("config")))
    values.update(args)
    cfg = TrainConfig(**values)
    _check(cfg)
    return Request(cfg, frozenset(values))


def parse_config(argv: Sequence[str] | None = None, prog: str = "distmnist train") -> TrainConfig:
    """Defaults, then the YAML file of --config, then the command line; validated."""
    return parse_request(argv, prog).cfg


def config_from(options: Mapping[str, Any], source: str = "distmnist.train()") -> TrainConfig:
    """The Python API's parse_config (see request_from)."""
    return request_from(options, source).cfg


def request_from(options: Mapping[str, Any], source: str = "distmnist.train()") -> Request:
    """The Python API's parse_request: defaults, then the YAML file of ``config``, then the other
    options (the field names: ``data_dir``, ``epochs`` ...); each value type-checked as a config file's
    are, and the whole validated with the command line's checks and messages."""
    options = dict(options)
    values: dict[str, Any] = {}
    config_file = options.pop("config", None)
    if config_file is not None:
        values.update(load_yaml(os.fspath(config_file)))
    for name, value in options.items():
        if name not in FIELDS:
            raise DistmnistError(f"{source}: unknown option '{name}'{did_you_mean(name, [*FIELDS, 'config'])} "
                                 f"(the options are config and the flags' names in snake_case: {', '.join(FIELDS)})")
        if isinstance(value, os.PathLike):  # data_dir=Path(...), output_dir=..., resume=...
            value = os.fspath(value)
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy integers
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int)):  # numpy floats
            value = float(value)
        values[name] = _coerce(name, value, source)
    cfg = TrainConfig(**values)
    _check(cfg)
    return Request(cfg, frozenset(values))
