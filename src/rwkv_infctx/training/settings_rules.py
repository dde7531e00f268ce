"""The accepted range of every numeric and enumerated setting of `fit`, `validate` and `test`: one table.

`check_settings(get)` runs right after the command line and YAML are parsed, before any data is
prepared, any logger, checkpoint folder or model exists (`training.cli`); the first setting out of
range raises `UserError` with one line: the key, the value given and what is accepted.

The table covers the project's own options (`model.*`, `data.*`, `target_batch_size`) and what is
passed on to Lightning (`trainer.*`, `seed_everything`) and DeepSpeed (the `deepspeed_stage_*`
strategy names, a DeepSpeed strategy object's `stage`). Free text and paths (data sources, folders,
file names, logger and callback objects) have no range; they are checked where they are used.
The classes themselves keep their own checks (`OptimConfig`, `DataConfig`, ...) for the Python API.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rwkv_infctx.errors import UserError

Getter = Callable[[str], Any]
"""Looks a dotted key (`model.beta1`) up in the parsed config (None when absent)."""

STRATEGIES = (
    "auto",
    "ddp",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
)
"""trainer.strategy names this trainer runs and tests (docs/distributed.md); a strategy object
(`class_path`) is passed to Lightning as is."""

SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "64-true")
"""trainer.precision values that are tested end to end (tests/training/test_precision.py); fp16 is
refused: its GradScaler skips steps on overflow, which model.nan_policy stops on."""
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "bf16": "bf16-mixed", "16": "16-mixed"}

ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
TIME_LIMIT = re.compile(r"^\d+:\d{1,2}:\d{1,2}:\d{1,2}$")  # DD:HH:MM:SS
DEVICE_STRING = re.compile(r"-1|[1-9]\d*|\d+(\s*,\s*\d+)*\s*,|\d+(\s*,\s*\d+)+")  # count, or ids "0,1"
TIME_UNITS = ("days", "hours", "minutes", "seconds", "milliseconds", "microseconds", "weeks")


@dataclass(frozen=True)
class Rule:
    """One setting: `accepts(value, get)` is true for every value in range; `expected` says which.

    `when(get)`, if given, limits the rule to configs where it holds (e.g. a decay shape)."""

    key: str
    accepts: Callable[[Any, Getter], bool]
    expected: str
    when: Callable[[Getter], bool] | None = None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _object(value: Any) -> bool:
    """A `class_path` object (Lightning instantiates and checks it)."""
    return hasattr(value, "class_path") or (isinstance(value, dict) and "class_path" in value)


def integer(
    key: str, low: int, null: bool = False, also: tuple[int, ...] = (), high: int | None = None
) -> Rule:
    """An integer ≥ low (and ≤ high), or one of `also`, or null when allowed."""
    top = f" and ≤ {high}" if high is not None else ""
    words = [f"an integer ≥ {low}{top}", *map(str, also), *(["null"] if null else [])]

    def accepts(v: Any, _: Getter) -> bool:
        if v is None:
            return null
        return _int(v) and (v in also or (v >= low and (high is None or v <= high)))

    return Rule(key, accepts, " or ".join(words))


def number(key: str, low: float, low_open: bool, high: float | None = None, high_open: bool = False,
           null: bool = False) -> Rule:  # fmt: skip
    """A finite number in the interval (or null when allowed)."""
    if high is None:
        span = f"a number {'>' if low_open else '≥'} {low:g}"
    else:
        span = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def accepts(v: Any, _: Getter) -> bool:
        if v is None:
            return null
        if not _num(v) or v < low or (low_open and v == low):
            return False
        return high is None or v < high or (v == high and not high_open)

    return Rule(key, accepts, span + (" or null" if null else ""))


def choice(key: str, *values: Any, null: bool = False, objects: bool = False) -> Rule:
    """One of `values` (or null; or a `class_path` object when `objects`)."""
    words = [*map(str, values), *(["null"] if null else []), *(["a class_path object"] if objects else [])]

    def accepts(v: Any, _: Getter) -> bool:
        if v is None:
            return null
        if objects and _object(v):
            return True
        return not isinstance(v, bool) and v in values

    return Rule(key, accepts, "one of " + ", ".join(words))


def boolean(key: str, null: bool = False) -> Rule:
    return Rule(
        key,
        lambda v, _: isinstance(v, bool) or (null and v is None),
        "true or false" + (" or null" if null else ""),
    )


def batches(key: str, null: bool = True) -> Rule:
    """Lightning's limit_*_batches / overfit_batches: a count ≥ 0 or a fraction in [0, 1]."""

    def accepts(v: Any, _: Getter) -> bool:
        if v is None:
            return null
        return (_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)

    return Rule(
        key, accepts, "an integer count ≥ 0 or a fraction in [0.0, 1.0]" + (" or null" if null else "")
    )


def _time_limit(v: Any) -> bool:
    """DD:HH:MM:SS, or a mapping of timedelta units to counts ≥ 0."""
    if isinstance(v, str):
        return bool(TIME_LIMIT.match(v))
    if isinstance(v, dict):
        return bool(v) and all(k in TIME_UNITS and _num(n) and n >= 0 for k, n in v.items())
    return hasattr(v, "total_seconds") and v.total_seconds() >= 0


def _val_check_interval(v: Any, _: Getter) -> bool:
    if v is None or (_int(v) and v >= 1):
        return True
    if isinstance(v, float):
        return 0.0 < v <= 1.0
    return not isinstance(v, bool) and _time_limit(v)


def _devices(v: Any, _: Getter) -> bool:
    if _int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):
        s = v.strip()
        return s == "auto" or bool(DEVICE_STRING.fullmatch(s))
    return isinstance(v, (list, tuple)) and bool(v) and all(_int(i) and i >= 0 for i in v)


def _precision(v: Any, _: Getter) -> bool:
    return v is None or PRECISION_ALIASES.get(str(v), str(v)) in SUPPORTED_PRECISIONS


def _vocab_size(v: Any, _: Getter) -> bool:
    return v is None or v in ("neox", "world") or (_int(v) and v >= 1)


def _test_split(v: Any, _: Getter) -> bool:
    return _num(v) and v >= 0 and (v < 1 or float(v).is_integer())


def _deepspeed_stage(v: Any, get: Getter) -> bool:
    return v is None or (v in (0, 1, 2, 3) and _int(v))


def _is_deepspeed_object(get: Getter) -> bool:
    return "DeepSpeed" in str(get("trainer.strategy.class_path") or "")


def _exponential(get: Getter) -> bool:
    return get("model.lr_decay") == "exponential"


def _not_below_min(v: Any, get: Getter) -> bool:
    low = get("data.min_token_size")
    return v is None or not _int(low) or not _int(v) or v >= low


def _seed(v: Any, _: Getter) -> bool:
    return isinstance(v, bool) or (_int(v) and 0 <= v <= 2**32 - 1)


RULES: tuple[Rule, ...] = (
    # top level
    Rule("seed_everything", _seed, "true, false or an integer in [0, 4294967295]"),
    integer("target_batch_size", 1, null=True),
    # trainer: passed on to Lightning (and DeepSpeed through the strategy)
    choice("trainer.accelerator", *ACCELERATORS, objects=True),
    choice("trainer.strategy", *STRATEGIES, objects=True),
    Rule("trainer.strategy.init_args.stage", _deepspeed_stage, "0, 1, 2 or 3", when=_is_deepspeed_object),
    Rule("trainer.devices", _devices, "auto, a count ≥ 1, -1 (all), or a list of device ids ≥ 0"),
    integer("trainer.num_nodes", 1),
    Rule(
        "trainer.precision", _precision, f"null or one of {', '.join(SUPPORTED_PRECISIONS)} (or 32, 64, bf16)"
    ),
    Rule(
        "trainer.fast_dev_run",
        lambda v, _: isinstance(v, bool) or (_int(v) and v >= 0),
        "true, false or an integer ≥ 0",
    ),
    integer("trainer.max_epochs", 1, null=True, also=(-1,)),
    integer("trainer.min_epochs", 0, null=True),
    integer("trainer.max_steps", 1, also=(-1,)),
    integer("trainer.min_steps", 0, null=True),
    Rule(
        "trainer.max_time",
        lambda v, _: v is None or _time_limit(v),
        "null, DD:HH:MM:SS or a mapping such as {hours: 12}",
    ),
    batches("trainer.limit_train_batches"),
    batches("trainer.limit_val_batches"),
    batches("trainer.limit_test_batches"),
    batches("trainer.limit_predict_batches"),
    batches("trainer.overfit_batches", null=False),
    Rule(
        "trainer.val_check_interval",
        _val_check_interval,
        "null, an integer ≥ 1 (batches), a fraction in (0.0, 1.0] of an epoch, or a time DD:HH:MM:SS",
    ),
    integer("trainer.check_val_every_n_epoch", 1, null=True),
    integer("trainer.num_sanity_val_steps", 0, null=True, also=(-1,)),
    integer("trainer.log_every_n_steps", 1, null=True),
    boolean("trainer.enable_checkpointing", null=True),
    boolean("trainer.enable_progress_bar", null=True),
    boolean("trainer.enable_model_summary", null=True),
    integer("trainer.accumulate_grad_batches", 1),
    number("trainer.gradient_clip_val", 0.0, low_open=False, null=True),
    choice("trainer.gradient_clip_algorithm", "norm", "value", null=True),
    Rule(
        "trainer.deterministic",
        lambda v, _: v is None or isinstance(v, bool) or v == "warn",
        "true, false, warn or null",
    ),
    boolean("trainer.benchmark", null=True),
    boolean("trainer.inference_mode"),
    boolean("trainer.use_distributed_sampler"),
    choice("trainer.profiler", "simple", "advanced", "pytorch", "xla", null=True, objects=True),
    boolean("trainer.detect_anomaly"),
    boolean("trainer.barebones"),
    boolean("trainer.sync_batchnorm"),
    integer("trainer.reload_dataloaders_every_n_epochs", 0),
    boolean("trainer.enable_autolog_hparams"),
    # model: the network, segmentation and optimizer
    choice("model.arch", "auto", "rwkv4", "rwkv7"),
    integer("model.ctx_len", 1),
    integer("model.ctx_len_cutoff", 1, null=True),
    integer("model.n_layer", 1, null=True),
    integer("model.n_embd", 1, null=True),
    Rule("model.vocab_size", _vocab_size, "an integer ≥ 1, neox, world or null"),
    integer("model.dim_att", 1, null=True),
    integer("model.dim_ffn", 1, null=True),
    integer("model.head_size", 1, null=True),
    integer("model.d_decay_lora", 1, null=True),
    integer("model.d_aaa_lora", 1, null=True),
    integer("model.d_mv_lora", 1, null=True),
    integer("model.d_gate_lora", 1, null=True),
    number("model.lr_init", 0.0, low_open=False),
    number("model.lr_final", 0.0, low_open=False),
    Rule(
        "model.lr_init",
        lambda v, _: _num(v) and v > 0,
        "a number > 0 with lr_decay exponential",
        _exponential,
    ),
    Rule(
        "model.lr_final",
        lambda v, _: _num(v) and v > 0,
        "a number > 0 with lr_decay exponential",
        _exponential,
    ),
    integer("model.warmup_steps", 0),
    choice("model.lr_decay", "cosine", "linear", "exponential"),
    choice("model.optimizer", "adamw", "adam", "sgd"),
    number("model.beta1", 0.0, low_open=False, high=1.0, high_open=True),
    number("model.beta2", 0.0, low_open=False, high=1.0, high_open=True),
    number("model.adam_eps", 0.0, low_open=True),
    number("model.weight_decay", 0.0, low_open=False),
    boolean("model.layerwise_lr"),
    choice("model.bptt", "full", "truncated"),
    choice("model.boundary_states", "device", "cpu"),
    boolean("model.grad_cp"),
    choice("model.grad_accum_dtype", "float32", "param"),
    integer("model.loss_chunk", 1),
    boolean("model.compile"),
    number("model.dropout", 0.0, low_open=False, high=1.0, high_open=True),
    integer("model.seed", 0, high=2**63 - 1),
    choice("model.wkv_backend", "auto", "reference", "triton", "chunked", "fla"),
    choice("model.wkv_self_check", "warn", "error", "off"),
    choice("model.export_dtype", "bf16", "fp32"),
    number("model.peak_tflops", 0.0, low_open=True, null=True),
    choice("model.nan_policy", "stop", "skip"),
    choice("model.loss_normalization", "step_tokens", "micro_batch_tokens"),
    choice("model.train_mode", "full", "lora", "state"),
    integer("model.lora_r", 1),
    number("model.lora_alpha", 0.0, low_open=True),
    number("model.lora_dropout", 0.0, low_open=False, high=1.0, high_open=True),
    choice("model.lora_init", "default", "pissa"),
    number("model.state_lr", 0.0, low_open=True),
    # data: what to learn
    integer("data.min_token_size", 1, null=True),
    integer("data.max_token_size", 1, null=True),
    Rule("data.max_token_size", _not_below_min, "null or an integer ≥ data.min_token_size"),
    Rule("data.test_split", _test_split, "a fraction in [0, 1) or a whole count of samples"),
    boolean("data.test_split_shuffle"),
    integer("data.test_split_seed", 0, high=2**63 - 1),
    integer("data.rechunk_size", 0, null=True, also=(-1,)),
    integer("data.num_proc", 1, null=True),
    integer("data.batch_size", 1),
    integer("data.num_workers", 0),
    boolean("data.shuffle"),
    boolean("data.chat_collapse_newlines"),
    choice("data.chat_bad_rows", "stop", "drop"),
    boolean("weights_only", null=True),
)

RULED_KEYS = frozenset(rule.key for rule in RULES)


def check_settings(get: Getter, present: Callable[[str], bool] | None = None) -> None:
    """UserError for the first setting of `RULES` out of range (keys not `present` are skipped)."""
    for rule in RULES:
        if present is not None and not present(rule.key):
            continue
        if rule.when is not None and not rule.when(get):
            continue
        value = get(rule.key)
        if not rule.accepts(value, get):
            raise UserError(f"{rule.key}: {_shown(value)} is out of range (expected {rule.expected})")


def refusal(key: str, given: str) -> str | None:
    """The table's line for a value the parser refused (wrong type), or None for a key not in it."""
    rules = [r for r in RULES if r.key == key and r.when is None]
    return f"{key}: {given} is out of range (expected {rules[0].expected})" if rules else None


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if hasattr(value, "class_path"):
        return str(value.class_path)
    return repr(value) if isinstance(value, str) else str(value)
