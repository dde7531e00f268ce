"""`rwkv-infctx fit|validate|test`: LightningCLI over `RWKVModule` and `RWKVDataModule`.

Everything a run depends on is in the YAML (`-c config.yaml`) and command-line overrides
(`--model.ctx_len 1024`, `--trainer.max_steps 100`); `--print_config` shows the merged result.
`-c pkg://rwkv7-demo.yaml` names a config bundled with the package (the demo).
"""

from __future__ import annotations

import re
import sys
import warnings
from importlib import resources
from pathlib import Path

from rwkv_infctx.errors import UserError

CSV_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
CONFIG_FLAGS = ("-c", "--config")
SUBCOMMANDS = ("fit", "validate", "test")


def bundled_config(name: str) -> Path:
    """Path of a config shipped in `rwkv_infctx/configs` (`pkg://NAME.yaml` on the command line)."""
    path = Path(str(resources.files("rwkv_infctx") / "configs" / name))
    if not path.is_file():
        available = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise UserError(f"config pkg://{name}: not bundled (available: {', '.join(available) or 'none'})")
    return path


def _resolve_config_args(argv: list[str]) -> list[str]:
    """Replace `pkg://NAME` config values by the bundled file's path; refuse missing config files."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in CONFIG_FLAGS:
            value = out[i + 1]
            if value.startswith("pkg://"):
                out[i + 1] = str(bundled_config(value.removeprefix("pkg://")))
            elif not value.lstrip().startswith(("{", "[")) and not Path(value).is_file():
                raise UserError(f"config {value}: file not found")
            else:
                _check_yaml(out[i + 1])
    return out


def _check_yaml(value: str) -> None:
    """A config file (or inline YAML) must parse with yaml.safe_load: one line naming it otherwise."""
    import yaml

    text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config {value}: not valid YAML ({problem}{where})") from None


def make_cli(argv: list[str]):
    """Build and run the LightningCLI for `argv` (the subcommand first); returns it."""
    from rwkv_infctx.data import RWKVDataModule
    from rwkv_infctx.training.module import RWKVModule

    return _cli_class()(
        RWKVModule,
        RWKVDataModule,
        args=argv,
        trainer_defaults={"logger": CSV_LOGGER},
        auto_configure_optimizers=False,  # model.optimizer & co. configure it
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in SUBCOMMANDS}},
        seed_everything_default=True,
        # hparams are the init arguments only (RWKVModule.load_from_checkpoint works without extras)
        load_from_checkpoint_support=False,
    )


def _cli_class():
    """`CheckedLightningCLI` plus the top-level `target_batch_size` option (built lazily: no Lightning
    import at package import)."""
    from rwkv_infctx.training.distributed import accumulation_for
    from rwkv_infctx.training.preflight import CheckedLightningCLI

    class RWKVLightningCLI(CheckedLightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--target_batch_size",
                type=int | None,
                default=None,
                help="Samples per optimizer step across all ranks; sets trainer.accumulate_grad_batches "
                "to target / (num_nodes × devices × data.batch_size). Null: use accumulate_grad_batches.",
            )

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            target = self._get(self.config_init, "target_batch_size")
            if target is not None:
                if trainer.accumulate_grad_batches != 1:
                    raise UserError(
                        f"target_batch_size: {target} and trainer.accumulate_grad_batches: "
                        f"{trainer.accumulate_grad_batches} are both set (set one; the other is derived)"
                    )
                batch_size = self.datamodule.config.batch_size
                trainer.accumulate_grad_batches = accumulation_for(
                    target, trainer.num_nodes, trainer.num_devices, batch_size
                )
            return trainer

    return RWKVLightningCLI


def run_lightning_cli(argv: list[str]) -> int:
    """Run `fit`, `validate` or `test`; returns the exit code. Bad input raises UserError."""
    argv = _resolve_config_args(argv)
    try:
        with warnings.catch_warnings():
            # we pass args= on purpose (the dispatcher already consumed sys.argv)
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within")
            make_cli(argv)
    except SystemExit as e:  # --help, --print_config
        return int(e.code or 0) if isinstance(e.code, int) else 0
    except Exception as e:
        if type(e).__name__ == "ArgumentError":
            raise UserError(_readable(str(e))) from None
        raise
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Destroy the default process group (DDP, DeepSpeed) before the interpreter exits: left to
    exit-time destructors, a rank's communication threads can abort it after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _readable(message: str) -> str:
    """jsonargparse's (possibly nested, multi-line) error text as one line naming the key."""
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip(" -")]
    key = next((m.group(1) for line in lines if (m := re.match(r'Parser key "([^"]+)"', line))), None)
    detail = lines[-1] if lines else message
    given = re.search(r"(?:Got|Given) value: (.*)$", detail)
    if key and given:  # a wrong type for a key of the settings table: say what it accepts
        from rwkv_infctx.training.settings_rules import refusal

        line = refusal(key, given.group(1).strip())
        if line is not None:
            return line
    detail = detail.replace("<class 'int'>", "int").replace("<class 'float'>", "float").replace("typing.", "")
    return f"{key}: {detail}" if key else f"config: {detail}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_lightning_cli(sys.argv[1:]))
