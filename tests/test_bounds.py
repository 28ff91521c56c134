"""Every number a run takes has bounds that fail with one line naming the flag and its range, and the
resume rule's pieces: which fields a command sets, which it takes from a run's record."""

from __future__ import annotations

import pytest

from distmnist.config import (
    LAUNCH_FIELDS,
    MACHINE_FIELDS,
    Interval,
    Request,
    TrainConfig,
    checkpoint_interval,
    config_from,
    parse_config,
    parse_request,
)
from distmnist.errors import DistmnistError


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "9223372036854775808"], "--batch-size must be between 1 and 1,000,000, got 9223372036854775808"),
    (["--epochs", "1000001"], "--epochs must be between 1 and 1,000,000, got 1000001"),
    (["--global-batch-size", "0"], "--global-batch-size must be between 1 and 1,000,000, got 0"),
    (["--test-batch-size", "10000000000"], "--test-batch-size must be between 1 and 1,000,000"),
    (["--limit-train", "0"], "--limit-train must be between 1 and 1,000,000,000, got 0"),
    (["--val-size", "-1"], "--val-size must be between 0 and 1,000,000,000, got -1"),
    (["--warmup-steps", "10" + "0" * 18], "--warmup-steps must be between 0 and"),
    (["--setup-timeout", "0"], "--setup-timeout must be > 0 and at most 604800 seconds (7 days), got 0.0"),
    (["--checkpoint-every", "10x"], "--checkpoint-every must be a number of optimizer steps (e.g. 500)"),
])
def test_numbers_out_of_range_name_the_flag_and_its_range(argv, message):
    with pytest.raises(DistmnistError) as raised:
        parse_config(argv)
    assert message in str(raised.value)


def test_checkpoint_every_reads_steps_or_minutes():
    assert checkpoint_interval("500") == Interval(steps=500)
    assert checkpoint_interval("10m") == Interval(seconds=600.0)
    assert checkpoint_interval("0.5min") == Interval(seconds=30.0)
    assert checkpoint_interval(None) is None
    assert Interval(steps=500).describe() == "every 500 steps" and Interval(seconds=90).describe() == \
        "every 1.5 minutes"
    assert config_from({"checkpoint_every": 200}).checkpoint_every == "200"  # a number from YAML or Python


def test_a_request_knows_what_it_set():
    request = parse_request(["--lr", "0.5", "--output-dir", "x"])
    assert request.explicit == {"lr", "output_dir"}
    assert config_from({"epochs": 3}).epochs == 3


def test_a_resumed_config_is_the_record_with_the_commands_own_fields_over_it():
    recorded = TrainConfig(data_dir="D", lr=0.05, batch_size=50, limit_train=2000, epochs=1, output_dir="old",
                           progress="plain", cpu=True, seed=9).to_dict()
    request = parse_request(["--output-dir", "new", "--epochs", "2", "--lr", "0.05"])
    cfg, changes = request.continuing(recorded, "state.json")
    assert (cfg.data_dir, cfg.lr, cfg.batch_size, cfg.limit_train, cfg.seed) == ("D", 0.05, 50, 2000, 9)
    assert cfg.epochs == 2 and changes == {"epochs": (1, 2)}  # lr given but equal: no change to announce
    # how and where this launch runs is its own, never the record's
    assert cfg.output_dir == "new" and cfg.progress == "auto" and cfg.cpu is False
    assert {"output_dir", "progress", "cpu", "resume", "overwrite"} <= LAUNCH_FIELDS


def test_a_record_with_impossible_values_is_refused_naming_it():
    with pytest.raises(DistmnistError, match="state.json: 'lr' must be float, got 'fast'"):
        Request(TrainConfig()).continuing({"lr": "fast"}, "state.json")


def test_each_machine_keeps_its_own_data_folder_when_it_gives_one():
    main = TrainConfig(data_dir="/shared/mnist", lr=0.1)
    assert parse_request(["--data-dir", "/local/mnist"]).on_this_machine(main).data_dir == "/local/mnist"
    assert parse_request(["--lr", "0.2"]).on_this_machine(main) == main  # the main process's, lr included
    assert MACHINE_FIELDS == {"data_dir", "no_download"}


@pytest.mark.parametrize("value", [123, 1.5, True])
def test_a_path_option_must_be_a_path(value):
    with pytest.raises(DistmnistError, match="'data_dir' must be a path"):
        config_from({"data_dir": value})
