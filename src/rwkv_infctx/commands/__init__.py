"""Subcommands of `rwkv-infctx`: each module has `add_arguments(parser)` and `run(args)`."""
