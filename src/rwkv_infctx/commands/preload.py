"""`rwkv-infctx preload -c config.yaml [--data.KEY VALUE ...]`: tokenize the `data:` section's source
into `data.data_path`.

Reads the same YAML `fit` uses and ignores every section but `data:`; takes the same `--data.*`
overrides as `fit`, so that a following `fit` with that config and those overrides reuses the folder.
Builds `data_path` when it is missing or was built from something else, reuses it otherwise, and
prints a summary.
"""

from __future__ import annotations

import argparse

from rwkv_infctx.data.build import prepare
from rwkv_infctx.data.config import config_from_yaml
from rwkv_infctx.errors import UserError

TAKES_OVERRIDES = True
"""The dispatcher hands the arguments it does not know (`--data.KEY VALUE`) to `run` as `overrides`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        required=True,
        help="YAML file with a data: section (as for fit), or pkg://NAME.yaml",
    )
    parser.epilog = "Then --data.KEY VALUE overrides, as for fit (e.g. --data.rechunk_size 300)."


def run(args: argparse.Namespace) -> int:
    path = args.config
    if path.startswith("pkg://"):  # a bundled config, as fit accepts
        from rwkv_infctx.training.cli import bundled_config

        path = str(bundled_config(path.removeprefix("pkg://")))
    config = config_from_yaml(path, getattr(args, "overrides", []))
    if config.source is None:
        raise UserError(f"config {args.config}: data.source is empty (nothing to preload)")
    done = prepare(config)
    print(done.message(str(config.data_path)))
    meta = done.metadata
    for name, s in meta["splits"].items():
        print(
            f"  {name}: {s['samples']:,} samples, {s['tokens']:,} tokens "
            f"({s['learnt_tokens']:,} learnt), longest {s['longest']:,} tokens"
        )
    largest = max(s["max_token_id"] for s in meta["splits"].values())
    tokenizer = meta["tokenizer"]
    print(f"  tokenizer {tokenizer['spec']}: largest token id {largest}, needs vocab_size >= {largest + 1}")
    dropped = {k: v for k, v in meta.get("dropped", {}).items() if v}
    if dropped:
        print("  dropped: " + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in dropped.items()))
    return 0
