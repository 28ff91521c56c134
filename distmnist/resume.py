"""A checkpoint applied to a new launch: weights, optimizer, fp16 scaler, random streams, and the exact
step where an interrupted epoch resumes, or why it cannot (then it restarts from its first step).

The rule: a mid-epoch checkpoint resumes at its exact step only if this launch would cut the epoch
into the same batches. The checkpoint records a digest of its epoch's order (batches.TrainOrder)
and the settings behind it; a different digest is announced with the settings that changed.
With a global batch the order does not depend on the world size, so a checkpoint of N processes
resumes exactly on M; with per-process batches it does only at the same world size.
"""

from __future__ import annotations

from typing import Any

from .batches import TrainOrder
from .checkpoint import Checkpoint, unflatten_optimizer
from .config import TrainConfig
from .distributed import restore_rng
from .engine import Carry, match_param_layout
from .masks import GlobalDropout
from .state import DataOrder


def load_training_state(ckpt: Checkpoint, cfg: TrainConfig, accelerator, model, optimizer, scaler) -> list[str]:
    """Weights are loaded before prepare(); this restores the rest on every rank. Returns notices."""
    state = unflatten_optimizer(ckpt.optimizer, ckpt.state.optimizer_param_groups)
    kernel = {k: optimizer.param_groups[0][k] for k in ("fused", "foreach")}
    for group in state["param_groups"]:
        # the kernel choice belongs to this device, and the run's config (its overrides included) wins
        group.update(kernel, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    optimizer.load_state_dict(state)
    match_param_layout(optimizer)
    notices = []
    if scaler is not None and ckpt.state.scaler is not None:
        scaler.load_state_dict(ckpt.state.scaler)
    elif scaler is not None:
        notices.append(f"the checkpoint holds no fp16 loss scale (it was trained with --mixed-precision "
                       f"{ckpt.state.config.get('mixed_precision', 'no')}): the scale starts over at "
                       f"{scaler.get_scale():g}")
    notices += restore_rng(accelerator, ckpt.rng, ckpt.state.random.device, cfg.seed, ckpt.state.step,
                           dropout_from_them=cfg.global_batch_size is None)
    return notices


def resume_point(ckpt: Checkpoint, order: TrainOrder, cfg: TrainConfig, rank: int) -> tuple[Carry | None, str]:
    """Where a mid-epoch checkpoint resumes: its exact step with this rank's running sums, or (None, why not)."""
    mid, saved = ckpt.state.mid_epoch, ckpt.state.data
    assert mid is not None and ckpt.progress is not None
    order.set_epoch(ckpt.epoch)
    changed = order_changes(saved, order, cfg)
    if changed:
        return None, f"the batches of this launch differ ({changed})"
    if saved.digest is not None and saved.digest != order.digest():
        return None, "the training images differ (another data folder or file?)"
    sums, counts = ckpt.progress["loss_sum"].double(), ckpt.progress["samples"]
    if saved.world_size == order.world:  # every rank continues its own sums
        loss_sum, samples = float(sums[rank]), int(counts[rank])
    else:  # a global batch on another world size: the first rank carries the epoch's totals so far
        loss_sum, samples = (float(sums.sum()), int(counts.sum())) if rank == 0 else (0.0, 0)
    return Carry(step=mid.step, loss_sum=loss_sum, samples=samples, seconds=mid.train_seconds), ""


def order_changes(saved: DataOrder, order: TrainOrder, cfg: TrainConfig) -> str:
    """The settings behind the batches that differ between a checkpoint and this launch, as 'name old -> new'."""
    now: dict[str, Any] = {"seed": cfg.seed, "val_size": cfg.val_size, "limit_train": cfg.limit_train,
                           "global_batch_size": order.global_batch, "training images": order.n}
    before: dict[str, Any] = {"seed": saved.seed, "val_size": saved.val_size, "limit_train": saved.limit_train,
                              "global_batch_size": saved.global_batch_size, "training images": saved.train_images}
    if order.global_batch is None:  # per-process batches: the order depends on both
        now.update(batch_size=order.batch_size, processes=order.world)
        before.update(batch_size=saved.batch_size, processes=saved.world_size)
    unknown = {k for k, v in before.items() if v is None and k == "training images"}  # not in format 1
    return ", ".join(f"{k} {before[k]} -> {now[k]}" for k in now if k not in unknown and before[k] != now[k])


def restore_dropout(ckpt: Checkpoint, dropout: GlobalDropout, cfg: TrainConfig, carry: Carry | None) -> str | None:
    """The global batch's dropout generator as the checkpoint left it, or, where it cannot be (a checkpoint
    of per-process batches, of another device type, or an epoch that restarts), masks keyed by (seed,
    step) from here on; then a notice says so."""
    state = ckpt.state
    step = state.step if carry or not state.mid_epoch else state.step - state.mid_epoch.step
    if state.random.dropout and state.random.device == dropout.generator.device.type and (carry or not state.mid_epoch):
        dropout.load_state_dict(ckpt.rng)
        return None
    dropout.start_at(cfg.seed, step)
    if not state.random.dropout:
        why = "it holds no global-batch dropout generator (trained with per-process batches)"
    elif state.random.device != dropout.generator.device.type:
        why = f"its dropout generator is a {state.random.device} one and this run is on {dropout.generator.device.type}"
    else:
        return None  # the epoch restarts: masks keyed by (seed, step), as the restart is announced already
    return f"the checkpoint's dropout masks cannot continue here ({why}): they continue keyed by (seed, step {step})"
