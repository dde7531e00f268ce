"""`RWKVDataModule`: the `data:` section of the YAML as a LightningDataModule."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from rwkv_infctx.data import store
from rwkv_infctx.data.build import loadable_metadata, make_fingerprint, prepare
from rwkv_infctx.data.collator import collate
from rwkv_infctx.data.config import DataConfig
from rwkv_infctx.data.sampler import MarkedDataset, ResumableSampler, rank_and_world
from rwkv_infctx.data.sources import resolve_source
from rwkv_infctx.data.step_tokens import StepPlan, learnt_tokens
from rwkv_infctx.errors import UserError
from rwkv_infctx.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import datasets


class RWKVDataModule(LightningDataModule):
    """Tokenizes a Hugging Face dataset once into `data_path` and serves padded batches from it.

    Batches are dicts of `input_ids`, `target_ids` (B, T) int64, `loss_mask` (B, T) float32 and
    `lengths` (B,) int64; see `rwkv_infctx.data.collator`. Every option is described in docs/data.md.

    Args:
        source: Hub dataset name; a builder (text, json, csv, parquet, arrow) with source_data_dir or
            data_files; a path to a file or folder; a binidx prefix (NAME.bin + NAME.idx); or pkg://NAME
            for a bundled file. Empty: load data_path.
        source_data_dir: Folder of data files for a builder source.
        data_files: File(s) or glob(s) for a builder source, or a mapping split -> files.
        source_split: Split of the source to use.
        source_dataset_params: Extra keyword arguments for datasets.load_dataset.
        tokenizer: neox, world, a path to a tokenizer.json, or a local HF tokenizer name (default neox).
        data_path: Folder where the tokenized dataset is saved and loaded from.
        text_column: Column holding the text (default text).
        multi_column_keys: Columns joined into one sample, in order.
        multi_column_prefix: Text before each column's value, one per key.
        multi_column_suffix: Text after each column's value, one per key.
        multi_column_separator: Text between columns; masked like the column before it.
        multi_column_train_mask: Per key, true if its tokens are learnt, false if prompt only.
        messages_column: Column of chat turns (a list of {role, content}); set for chat data.
        chat_roles: Role -> prefix that opens its turns (default RWKV World's System:/User:/Assistant:).
        chat_content_prefix: Text before each turn's content, tokenized with it (default a space).
        chat_separator: Text that ends every turn (default a blank line, "\\n\\n").
        chat_learnt_roles: Roles whose content and separator are learnt (default [assistant]).
        chat_collapse_newlines: Strip each content and turn runs of newlines into one newline.
        chat_bad_rows: stop (default) or drop a row with an unknown role, missing content or no learnt turn.
        min_token_size: Drop documents with fewer tokens.
        max_token_size: Drop documents with more tokens.
        test_split: Samples held out for validation (after rechunk): a fraction below 1, else a count.
        test_split_shuffle: Hold out random samples rather than the last ones.
        test_split_seed: Seed for test_split_shuffle.
        rechunk_size: Join documents with end-of-text into samples of this many tokens; -1: one sample.
        num_proc: Processes for tokenization.
        cache_dir: Cache folder for datasets; default HF cache (hub) or a temporary folder (local).
        batch_size: Samples per micro-batch.
        num_workers: DataLoader worker processes.
        shuffle: Shuffle training samples each epoch.

    Training batches come from a `ResumableSampler` (sharded over ranks, order from the run's seed
    and the epoch); its cursor is saved in checkpoints (`state_dict`) and restored on resume. With
    `trainer.accumulate_grad_batches` > 1 they also carry `step_tokens`, the learnt tokens of their
    optimizer step over all ranks (`data.step_tokens`), which the trainer's loss divides by.
    """

    def __init__(
        self,
        source: str | None = None,
        source_data_dir: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        source_split: str = "train",
        source_dataset_params: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        data_path: str | None = None,
        text_column: str | None = None,
        multi_column_keys: list[str] | None = None,
        multi_column_prefix: list[str] | None = None,
        multi_column_suffix: list[str] | None = None,
        multi_column_separator: str = "",
        multi_column_train_mask: list[bool] | None = None,
        messages_column: str | None = None,
        chat_roles: dict[str, str] | None = None,
        chat_content_prefix: str = " ",
        chat_separator: str = "\n\n",
        chat_learnt_roles: list[str] | None = None,
        chat_collapse_newlines: bool = True,
        chat_bad_rows: str = "stop",
        min_token_size: int | None = None,
        max_token_size: int | None = None,
        test_split: float = 0.0,
        test_split_shuffle: bool = True,
        test_split_seed: int = 42,
        rechunk_size: int | None = None,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # LightningCLI may add bookkeeping keys (`_class_path`, `_instantiator`) to the hparams
        self.config = DataConfig(**{k: v for k, v in self.hparams.items() if not k.startswith("_")})
        self.metadata: dict[str, Any] | None = None
        self.splits: datasets.DatasetDict | None = None
        self.train_sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, Any] | None = None
        self._learnt: np.ndarray | None = None

    def prepare_data(self) -> None:
        """Build `data_path` unless it already matches the config (runs on one process per node)."""
        done = prepare(self.config)
        self.metadata = done.metadata
        rank_zero_info(done.message(str(self.config.data_path)))

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared splits; refuses a `data_path` that does not match the config."""
        if self.splits is not None:
            return
        self.metadata = self._checked_metadata()
        self.splits = store.load_splits(Path(self.config.data_path or ""))

    def _checked_metadata(self) -> dict[str, Any]:
        meta = loadable_metadata(self.config)
        if self.config.source is not None:
            tokenizer = load_tokenizer(self.config.tokenizer or "neox")
            wanted = make_fingerprint(self.config, resolve_source(self.config), tokenizer)
            if meta["fingerprint"] != wanted:
                changed = ", ".join(store.changed_keys(meta["fingerprint"], wanted))
                raise UserError(
                    f"data.data_path {self.config.data_path}: out of date ({changed}); run prepare_data first"
                )
        return meta

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        ds = self.splits[split].with_format("numpy", columns=["input_ids", "loss_mask"])
        return DataLoader(
            ds,  # type: ignore[arg-type]
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            num_workers=self.config.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Batches from a `ResumableSampler`; they carry `sample_index` (B,) too."""
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        ds = self.splits["train"].with_format("numpy", columns=["input_ids", "loss_mask"])
        trainer = self.trainer
        rank, world = rank_and_world(trainer)
        seed = torch.initial_seed() % 2**31  # the run's seed (seed_everything); rank 0's wins
        if trainer is not None:
            seed = trainer.strategy.broadcast(seed, src=0)
        sampler = ResumableSampler(len(ds), self.config.shuffle, seed, rank, world)
        if self._sampler_state is not None:
            sampler.load_state_dict(self._sampler_state)
        if trainer is not None and int(trainer.accumulate_grad_batches) > 1:
            if self._learnt is None:
                self._learnt = learnt_tokens(self.splits["train"])
            sampler.set_step_plan(self._learnt, lambda: self._step_plan(sampler))
        self.train_sampler = sampler
        return DataLoader(
            MarkedDataset(ds),
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            collate_fn=collate,
            # its own generator: building an epoch's iterator must not draw from the global torch RNG,
            # or a run resumed at an epoch boundary would see dropout masks shifted by one draw
            generator=torch.Generator().manual_seed(seed),
        )

    def _step_plan(self, sampler: ResumableSampler) -> StepPlan:
        """This epoch's grouping of batches into optimizer steps (read when its iteration starts)."""
        b = self.config.batch_size
        batches = -(-len(sampler) // b)
        limit = self.trainer.num_training_batches if self.trainer is not None else float("inf")
        k = int(self.trainer.accumulate_grad_batches) if self.trainer is not None else 1
        return StepPlan(b, k, int(min(batches, limit)))

    def state_dict(self) -> dict[str, Any]:
        """The training data cursor, for checkpoints: which sample comes next in which epoch."""
        trainer = self.trainer
        if self.train_sampler is None or trainer is None:
            return {}
        # batches this rank has taken this epoch (the batch being checkpointed included)
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        consumed = min(batches * self.config.batch_size, len(self.train_sampler))
        return {"sampler": self.train_sampler.state_dict(consumed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the cursor; the next `train_dataloader()` resumes from it."""
        self._sampler_state = state_dict.get("sampler")

    def val_dataloader(self) -> DataLoader | list:
        """Batches of the `test` split; an empty list when `test_split` is 0."""
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        return self._loader("test", False) if "test" in self.splits else []

    def test_dataloader(self) -> DataLoader | list:
        """The held-out split again (`rwkv-infctx test` reports its loss); empty when test_split is 0."""
        return self.val_dataloader()

    def _meta(self) -> dict[str, Any]:
        if self.metadata is None:
            self.metadata = self._checked_metadata()
        return self.metadata

    def vocab_size_needed(self) -> int:
        """Largest token id in any prepared split, plus one: the smallest model vocab that fits."""
        return max(s["max_token_id"] for s in self._meta()["splits"].values()) + 1

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise `UserError` if a token id would not fit a model vocabulary of `vocab_size`."""
        needed = self.vocab_size_needed()
        if needed > vocab_size:
            raise UserError(
                f"model.vocab_size: {vocab_size}, but data_path {self.config.data_path} holds token id "
                f"{needed - 1} (tokenizer {self.tokenizer_spec!r}); expected at least {needed}"
            )

    @property
    def tokenizer_spec(self) -> str:
        """The tokenizer the prepared data was built with (`neox`, `world`, a path or a name)."""
        return self._meta()["tokenizer"]["spec"]

    @property
    def eot_id(self) -> int:
        """End-of-text token id of that tokenizer."""
        return self._meta()["tokenizer"]["eot_id"]

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per split: samples, tokens, learnt_tokens, longest, max_token_id."""
        return self._meta()["splits"]
