"""`target_batch_size`: samples per optimizer step across all ranks sets accumulate_grad_batches."""

from __future__ import annotations

import pytest

from rwkv_infctx.cli import main
from rwkv_infctx.data import RWKVDataModule
from rwkv_infctx.errors import UserError
from rwkv_infctx.training.cli import _cli_class
from rwkv_infctx.training.distributed import accumulation_for
from rwkv_infctx.training.module import RWKVModule


@pytest.fixture
def base(tmp_path) -> list[str]:
    """A tiny model on the CPU; data_path is never built (the trainer is only instantiated, or refused)."""
    model = ["--model.arch=rwkv4", "--model.n_layer=1", "--model.n_embd=16", "--model.vocab_size=50"]
    return [*model, "--trainer.accelerator=cpu", f"--data.data_path={tmp_path / 'data'}"]


def test_accumulation_is_target_over_nodes_devices_and_batch():
    assert accumulation_for(64, num_nodes=2, devices=4, batch_size=2) == 4
    assert accumulation_for(8, 1, 1, 8) == 1
    with pytest.raises(UserError, match=r"not a multiple of .* 2 × 4 × 3 = 24"):
        accumulation_for(64, 2, 4, 3)
    with pytest.raises(UserError, match="positive"):
        accumulation_for(0, 1, 1, 1)


@pytest.mark.parametrize(("devices", "batch_size", "expected"), [(1, 2, 4), (2, 2, 2), (2, 4, 1)])
def test_cli_derives_accumulate_grad_batches(base, devices, batch_size, expected):
    args = [*base, f"--trainer.devices={devices}", f"--data.batch_size={batch_size}", "--target_batch_size=8"]
    cli = _cli_class()(RWKVModule, RWKVDataModule, args=args, run=False)
    assert cli.trainer.accumulate_grad_batches == expected


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_setting_both_is_one_line_error(base, capsys):
    args = ["fit", *base, "--target_batch_size=8", "--trainer.accumulate_grad_batches=2"]
    assert main(args) != 0
    assert "target_batch_size: 8 and trainer.accumulate_grad_batches: 2 are both set" in last_error_line(
        capsys
    )


def test_indivisible_target_is_one_line_error(base, capsys):
    assert main(["fit", *base, "--target_batch_size=7", "--data.batch_size=2"]) != 0
    assert "target_batch_size: 7 is not a multiple of" in last_error_line(capsys)
