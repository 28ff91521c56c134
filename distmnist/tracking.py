"""What the trackers of --log-with receive step by step, and where each one keeps its logs.

Every record goes to Accelerate's trackers on one axis, the optimizer step counted over the run:
the epoch records at the step that ends their epoch and, with --log-every N, the loss and learning
rate of every Nth step. Step losses reach the host once per epoch, in the same read as the epoch's
totals (engine.py), so logging them adds no host sync to the step.
"""

from __future__ import annotations

from pathlib import Path

from .schedule import ScheduleSpec

RUN_NAME = "distmnist"  # accelerator.init_trackers(RUN_NAME): the project / run name every tracker sees

# where trackers that do not write under the output folder keep their logs, by Accelerate's name
ELSEWHERE = {
    "wandb": "the W&B project 'distmnist' (offline with WANDB_MODE=offline: ./wandb)",
    "mlflow": "the MLflow experiment 'distmnist' (MLFLOW_TRACKING_URI, else ./mlruns)",
    "comet_ml": "the Comet project 'distmnist'",
    "clearml": "the ClearML project 'distmnist'",
    "dvclive": "./dvclive",
    "trackio": "the Trackio project 'distmnist'",
    "swanlab": "the SwanLab project 'distmnist'",
}


def destination(name: str, project_dir: str) -> str:
    """Where tracker `name` writes, in words: Accelerate gives file-based trackers project_dir."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    if name == "all":
        return "; ".join(f"{t}: {destination(str(t), project_dir)}" for t in map(str, get_available_trackers()))
    tracker = LOGGER_TYPE_TO_CLASS.get(name)
    if tracker is not None and getattr(tracker, "requires_logging_directory", False):
        # tensorboard writes to project_dir/RUN_NAME, aim keeps its repository in project_dir
        return str(Path(project_dir) / RUN_NAME) if name == "tensorboard" else str(project_dir)
    return ELSEWHERE.get(name, f"{name}'s own store, run '{RUN_NAME}'")


def what(log_every: int) -> str:
    if log_every:
        return f"every epoch's metrics; step_loss and lr every {log_every} steps"
    return "every epoch's metrics"


def log_steps(accelerator, losses: list[float], first_step: int, every: int, spec: ScheduleSpec | None) -> int:
    """Send {step_loss, lr} for each optimizer step g (1-based over the run) with g % every == 0.

    losses[i] is the loss of step first_step + i + 1; the lr is the schedule's at that step (a pure
    function, evaluated here on the host). Main process only, like every accelerator.log call.
    Returns how many steps were logged.
    """
    sent = 0
    for i, loss in enumerate(losses):
        step = first_step + i + 1
        if every and step % every == 0:
            values = {"step_loss": loss}
            if spec is not None:
                values["lr"] = spec.value_at(step - 1)
            accelerator.log(values, step=step)
            sent += 1
    return sent
