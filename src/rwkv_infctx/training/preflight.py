"""`CheckedLightningCLI`: LightningCLI that refuses bad input before anything is written.

Right after parsing (before the seed, any class or file exists), every setting is checked against
the table of `training.settings_rules`. Then, before `fit`, `validate` or `test` starts (so before
any log folder, checkpoint or data_path):
- Trainer arguments Lightning rejects (an unknown strategy, accelerator, precision) become one line;
- trainer.precision must be one this trainer supports (`SUPPORTED_PRECISIONS`; docs/training.md);
- `ckpt_path: auto` is resolved to the complete checkpoint with the highest global step, an explicit
  one must exist (`training.checkpointing.resolve_ckpt_path`);
- the output folders (default_root_dir, the loggers' save_dir, checkpoint dirpaths, model.export's
  folder) must be creatable;
- a prepared data_path whose token ids do not fit model.vocab_size is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.checkpointing import (
    UNREADABLE_CHECKPOINT,
    check_output_folder,
    resolve_ckpt_path,
)
from rwkv_infctx.training.settings_rules import PRECISION_ALIASES, SUPPORTED_PRECISIONS, check_settings


def check_precision(value: Any) -> None:
    """UserError unless `value` (null, an int or a Lightning precision string) is supported.

    fp16 is refused: its GradScaler skips steps on overflow, which model.nan_policy stops on, and
    Adam's eps (1e-8) is below fp16's range for fp16 weights.
    """
    if value is None:
        return
    name = PRECISION_ALIASES.get(str(value), str(value))
    if name not in SUPPORTED_PRECISIONS:
        supported = ", ".join(SUPPORTED_PRECISIONS)
        raise UserError(f"trainer.precision: {value!r} is not supported (expected null, {supported})")


class CheckedLightningCLI(LightningCLI):
    """LightningCLI with the checks of the module doc: the settings table right after parsing, the
    rest in `before_<subcommand>`."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        config = self.config[self.config.subcommand] if "subcommand" in self.config else self.config
        check_settings(lambda key: config.get(key), lambda key: key in config)

    def instantiate_trainer(self, **kwargs: Any):
        check_precision({**self._get(self.config_init, "trainer", default={}), **kwargs}.get("precision"))
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError) as e:  # MisconfigurationException is a ValueError
            raise UserError(f"trainer: {_first_sentences(str(e))}") from None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hparams here (torch.load, weights_only=True)
        try:
            super()._parse_ckpt_path()
        except Exception:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise UserError(f"ckpt_path {path}: {UNREADABLE_CHECKPOINT}") from None

    def before_fit(self) -> None:
        self._preflight()

    def before_validate(self) -> None:
        self._preflight()

    def before_test(self) -> None:
        self._preflight()

    def _preflight(self) -> None:
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), self.trainer)
        self._check_outputs()
        self._check_vocab()

    def _check_outputs(self) -> None:
        trainer = self.trainer
        check_output_folder(trainer.default_root_dir, "trainer.default_root_dir")
        for logger in trainer.loggers:
            if getattr(logger, "save_dir", None):
                check_output_folder(logger.save_dir, f"trainer.logger ({type(logger).__name__}) save_dir")
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                check_output_folder(cb.dirpath, "ModelCheckpoint dirpath")
        export = getattr(self.model.hparams, "export", None) if self.subcommand == "fit" else None
        if export:
            if Path(export).is_dir():
                raise UserError(f"model.export {export}: is a folder (expected a model file name)")
            check_output_folder(Path(export).parent, f"model.export {export}: folder")

    def _check_vocab(self) -> None:
        """Only when data_path is already prepared; otherwise `RWKVModule.setup` checks it."""
        datamodule, model = self.datamodule, self.model
        if not hasattr(datamodule, "vocab_size_needed") or not hasattr(model, "model"):
            return
        try:
            datamodule.vocab_size_needed()
        except UserError:
            return  # not built yet (or out of date): prepare_data builds it, setup checks it
        datamodule.check_vocab_size(model.model.cfg.vocab_size)


def _first_sentences(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
