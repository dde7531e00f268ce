"""The `rwkv-infctx` command: one entry point, one module per subcommand.

`fit`, `validate` and `test` go to LightningCLI (see `training/cli.py`); every other subcommand is
a module in `rwkv_infctx.commands` with `add_arguments(parser)` and `run(args)`.

Bad input raises `UserError`; it is printed as one line on stderr and the exit code is 2.
`--debug` anywhere on the command line shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rwkv_infctx.errors import UserError

COMMANDS = {
    "init": "Create a new RWKV-4 or RWKV-7 model file with RWKV-LM's initialisation.",
    "generate": "Generate text from a model file (the dragon test).",
    "export-hf": "Write a Hugging Face transformers folder (RwkvForCausalLM) from a model file.",
    "eval-positions": "Mean loss and perplexity by token position for one or more models (table, CSV, PNG).",
    "export": "Turn a Lightning checkpoint from `fit` into an RWKV-LM model file (.pth).",
    "preload": "Tokenize the data: section's source into data.data_path (no training).",
}
LIGHTNING_COMMANDS = {"fit", "validate", "test"}


def _usage() -> str:
    lines = ["usage: rwkv-infctx COMMAND [options]   (--debug shows tracebacks)", "", "commands:"]
    lines += [f"  {name:<16}{doc}" for name, doc in COMMANDS.items()]
    return "\n".join(lines)


def _run_command(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"rwkv_infctx.commands.{name.replace('-', '_')}")
    parser = argparse.ArgumentParser(prog=f"rwkv-infctx {name}", description=COMMANDS[name])
    module.add_arguments(parser)
    if getattr(module, "TAKES_OVERRIDES", False):  # `--data.KEY VALUE` pairs, checked by the command
        args, args.overrides = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    return module.run(args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS and name not in LIGHTNING_COMMANDS:
        print(f"rwkv-infctx: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        if name in LIGHTNING_COMMANDS:
            from rwkv_infctx.training.cli import run_lightning_cli

            return run_lightning_cli(argv)
        return _run_command(name, rest)
    except UserError as e:
        if debug:
            raise
        print(f"rwkv-infctx {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rwkv-infctx {name}: interrupted", file=sys.stderr)
        return 130
