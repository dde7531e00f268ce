"""`PositionLossCallback` in a real (tiny, CPU) Lightning fit: logs the same numbers as `evaluate`."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from rwkv_infctx.data.collator import collate
from rwkv_infctx.evaluation import PositionLossCallback
from rwkv_infctx.evaluation.callback import bounded_batches
from rwkv_infctx.evaluation.positions import evaluate
from tests.evaluation.conftest import tiny_model


class TinyModule(pl.LightningModule):
    """Only what the callback relies on: `.model` (an RWKV4) and a validation loop."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_model(seed=4)

    def training_step(self, batch, batch_idx):
        logits, _ = self.model(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten())

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.0)  # weights stay put: compare after fit


def loader(seed: int, n: int = 3, length: int = 200) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(0, 97, (length,), generator=gen).numpy()} for _ in range(n)]
    return DataLoader(rows, batch_size=2, collate_fn=collate)


def test_bounded_batches_cut_to_the_budget():
    got = list(bounded_batches(loader(0), max_tokens=500))  # batches of 2 rows × 199 positions
    assert [tuple(b["input_ids"].shape) for b in got] == [(2, 199), (1, 102)]


class CountingCallback(PositionLossCallback):
    runs = 0

    def _run(self, trainer, pl_module) -> None:
        self.runs += 1
        super()._run(trainer, pl_module)


@pytest.mark.parametrize(("every_n_steps", "runs"), [(None, 1), (2, 2)])
def test_callback_logs_per_bucket_validation_loss(tmp_path, every_n_steps, runs):
    callback = CountingCallback(max_tokens=500, segment_len=50, every_n_steps=every_n_steps)
    module = TinyModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=loader(1, length=16), val_dataloaders=loader(2))
    assert callback.runs == runs
    expected = evaluate(module.model, bounded_batches(loader(2), 500), 4096).rows()
    assert [(r.start, r.end) for r in expected] == [(1, 128), (128, 256)]
    for row in expected:
        logged = trainer.callback_metrics[f"val_pos_loss/{row.start}-{row.end}"]
        assert float(logged) == pytest.approx(row.mean_loss, abs=1e-5)
    assert module.model.training  # the callback restores the mode it found
