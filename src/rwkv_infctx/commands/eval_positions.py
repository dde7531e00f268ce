"""`rwkv-infctx eval-positions MODEL [MODEL ...] (--data CONFIG | --text FILE)`: loss by token position.

Each model reads the same samples segment by segment with the state carried (no gradients; memory
independent of sample length) and gets a mean loss and perplexity per log-spaced position bucket.
Prints a table, and optionally writes a long-format CSV and a PNG plot. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rwkv_infctx.commands.tuning_options import (
    Choice,
    add_tuning_arguments,
    choices_per_model,
    labelled,
    with_additions,
)
from rwkv_infctx.errors import UserError
from rwkv_infctx.evaluation.positions import evaluate
from rwkv_infctx.evaluation.report import Results, format_table, write_csv, write_png
from rwkv_infctx.evaluation.samples import Samples, batches, from_data_config, from_text_file
from rwkv_infctx.io.atomic import check_writable
from rwkv_infctx.io.model_file import load_model
from rwkv_infctx.model import RWKVModel
from rwkv_infctx.tokenizer import default_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL", help="model files to compare")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="CONFIG", help="YAML with a data: section (test split, else train)")
    source.add_argument(
        "--text", type=Path, metavar="FILE", help=".txt (one sample) or .jsonl (a 'text' per line)"
    )
    parser.add_argument(
        "--tokenizer",
        help="for --text: neox, world, or a tokenizer.json path (default: world for 65536-row models, "
        "else neox)",
    )
    parser.add_argument("--max_tokens", type=int, help="evaluate at most this many tokens (default: all)")
    parser.add_argument("--segment_len", type=int, default=4096, help="tokens per forward call")
    parser.add_argument("--batch_size", type=int, default=1, help="samples per forward call")
    parser.add_argument("--labels", nargs="+", help="one name per model (default: file names)")
    parser.add_argument("--out_csv", type=Path, help="write the results here (long format)")
    parser.add_argument("--out_png", type=Path, help="plot loss against position here")
    add_tuning_arguments(parser, per_model=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _check_args(args: argparse.Namespace) -> None:
    for key in ("segment_len", "batch_size"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key}: {getattr(args, key)} (expected at least 1)")
    if args.data is not None and args.tokenizer is not None:
        raise UserError("--tokenizer: not used with --data (the data config's tokenizer is used)")
    if args.labels is not None and len(args.labels) != len(args.models):
        n, m = len(args.labels), len(args.models)
        raise UserError(f"--labels: {n} labels for {m} models (expected one per model)")
    for out in (args.out_csv, args.out_png):
        if out is not None:
            _check_writable(out)


def _check_writable(out: Path) -> None:
    """Fail before the (long) evaluation if an output could not be written."""
    if out.is_dir():
        raise UserError(f"output {out}: is a folder (expected a file name)")
    check_writable(out)


def _labels(args: argparse.Namespace, choices: list[Choice]) -> list[str]:
    if args.labels is not None:
        labels = list(args.labels)
    else:
        stems = [labelled(p.stem, c) for p, c in zip(args.models, choices, strict=True)]
        paths = [labelled(str(p), c) for p, c in zip(args.models, choices, strict=True)]
        labels = stems if len(set(stems)) == len(stems) else paths
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels: {labels} repeat a name (expected one distinct label per model)")
    return labels


def _load_models(paths: list[Path], device: str, choices: list[Choice]) -> list[RWKVModel]:
    """Load every model, with its adapter and state if any (errors before any evaluation), and
    require one vocabulary size."""
    models = [with_additions(load_model(p), c).to(device) for p, c in zip(paths, choices, strict=True)]
    sizes = {str(p): m.cfg.vocab_size for p, m in zip(paths, models, strict=True)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p} {v}" for p, v in sizes.items())
        raise UserError(f"models: vocabulary sizes differ ({listed}); expected models of one tokenizer")
    return models


def _check_samples(data: Samples, paths: list[Path], models: list[RWKVModel]) -> None:
    for path, model in zip(paths, models, strict=True):
        if data.vocab_size > model.cfg.vocab_size:
            raise UserError(
                f"model {path}: vocabulary of {model.cfg.vocab_size}, but tokenizer {data.tokenizer!r} "
                f"has {data.vocab_size} tokens (expected a model trained with that tokenizer)"
            )
    if not any(any(mask[1:]) for _, mask in data.samples):
        raise UserError(f"{data.source}: no tokens to evaluate (no samples, or every target is masked)")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    choices = choices_per_model(args, len(args.models))
    labels = _labels(args, choices)
    models = _load_models(args.models, args.device, choices)
    if args.data is not None:
        data = from_data_config(args.data, args.max_tokens)
    else:
        tokenizer = args.tokenizer or default_tokenizer(models[0].cfg.vocab_size)
        data = from_text_file(args.text, tokenizer, args.max_tokens)
    _check_samples(data, args.models, models)
    results: Results = {}
    for label, model in zip(labels, models, strict=True):
        acc = evaluate(model, batches(data.samples, args.batch_size), args.segment_len)
        results[label] = acc.rows()
    n = sum(r.tokens for r in next(iter(results.values())))
    count = f"{len(data.samples)} sample{'s' if len(data.samples) != 1 else ''}"
    print(f"{data.source}: {count}, {n:,} tokens scored (tokenizer {data.tokenizer})")
    print(format_table(results))
    if args.out_csv is not None:
        write_csv(args.out_csv, results)
        print(f"wrote {args.out_csv}")
    if args.out_png is not None:
        title = f"Loss by position: {Path(data.source.split(' ')[0]).name}, {n:,} tokens"
        write_png(args.out_png, results, title)
        print(f"wrote {args.out_png}")
    return 0
