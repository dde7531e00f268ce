"""`DataConfig`: every option of the `data:` section, checked once, with what each one means.

The same names are the keyword arguments of `RWKVDataModule` (LightningCLI reads those). The options
marked "result" change the prepared dataset and are part of its fingerprint; the others do not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rwkv_infctx.errors import UserError

BUILDERS = ("text", "json", "csv", "parquet", "arrow")
"""The `datasets` builders a local source may name."""

WORLD_CHAT_ROLES = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
"""The turn prefixes of RWKV World's chat form (see docs/data.md, "Chat conversations")."""

RESULT_OPTIONS = (
    "source",
    "source_data_dir",
    "data_files",
    "source_split",
    "source_dataset_params",
    "text_column",
    "multi_column_keys",
    "multi_column_prefix",
    "multi_column_suffix",
    "multi_column_separator",
    "multi_column_train_mask",
    "min_token_size",
    "max_token_size",
    "test_split",
    "test_split_shuffle",
    "test_split_seed",
    "rechunk_size",
)
"""Options that change the prepared dataset (the tokenizer is fingerprinted by its vocabulary)."""

CHAT_OPTIONS = (
    "messages_column",
    "chat_roles",
    "chat_content_prefix",
    "chat_separator",
    "chat_learnt_roles",
    "chat_collapse_newlines",
    "chat_bad_rows",
)
"""Options of chat data; part of the fingerprint only when `messages_column` is set, so data built
before they existed keeps its fingerprint."""

CHAT_BAD_ROWS = ("stop", "drop")


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section. See docs/data.md for examples of each option."""

    source: str | None = None
    """Hub dataset name; a builder (text, json, csv, parquet, arrow) used with `source_data_dir` or
    `data_files`; a path to a file or folder (format inferred); a binidx pair (`NAME`, `NAME.bin` or
    `NAME.idx` for `NAME.bin` + `NAME.idx`: token ids, no tokenizer run); or `pkg://NAME` for a bundled file.
    Empty: load the already prepared `data_path`."""
    source_data_dir: str | None = None
    """Folder of data files for a builder `source` (result)."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """File(s) or glob(s) for a builder `source`, or a mapping split -> files (result)."""
    source_split: str = "train"
    """Split of the source to use (result)."""
    source_dataset_params: dict[str, Any] | None = None
    """Extra keyword arguments for `datasets.load_dataset`, e.g. `{sample_by: line}` (result)."""
    tokenizer: str | None = None
    """`neox`, `world`, a path to a tokenizer.json, or a local HF tokenizer name. Empty: `neox` when
    building; when only loading `data_path`, whatever it was built with. For a binidx source, the
    vocabulary its token ids are in."""
    data_path: str | None = None
    """Folder where the tokenized dataset is saved and loaded from."""
    text_column: str | None = None
    """Column holding the text; `text` when empty (result)."""
    multi_column_keys: list[str] | None = None
    """Columns joined into one sample, in order, for instruction data (result)."""
    multi_column_prefix: list[str] | None = None
    """Text put before each column's value; one per key (result)."""
    multi_column_suffix: list[str] | None = None
    """Text put after each column's value; one per key (result)."""
    multi_column_separator: str = ""
    """Text put between two columns; its tokens share the mask of the column before it (result)."""
    multi_column_train_mask: list[bool] | None = None
    """Per key: whether its tokens are learnt (true) or only read as prompt (false). Default all true
    (result)."""
    messages_column: str | None = None
    """Column holding a chat: a list of `{role, content}` turns, rendered with the chat template below.
    Empty: not chat data (result)."""
    chat_roles: dict[str, str] | None = None
    """Role -> the prompt text that opens its turns. Empty: RWKV World's `{system: "System:", user:
    "User:", assistant: "Assistant:"}` (result)."""
    chat_content_prefix: str = " "
    """Text put before each turn's content and tokenized with it (result)."""
    chat_separator: str = "\n\n"
    """Text that ends every turn (result)."""
    chat_learnt_roles: list[str] | None = None
    """Roles whose content and separator are learnt; all else is prompt. Empty: `[assistant]` (result)."""
    chat_collapse_newlines: bool = True
    """Clean each content as RWKV's chat runtimes do: CRLF to LF, strip, runs of newlines to one
    newline, so no blank line appears inside a turn (result)."""
    chat_bad_rows: str = "stop"
    """A row with an unknown role, a missing content or no learnt turn: `stop` the build, or `drop`
    it and count it in the summary (result)."""
    min_token_size: int | None = None
    """Drop documents with fewer tokens than this (result)."""
    max_token_size: int | None = None
    """Drop documents with more tokens than this (result)."""
    test_split: float = 0.0
    """Samples held out for validation (after rechunk): a fraction if below 1, else a count. 0: none
    (result)."""
    test_split_shuffle: bool = True
    """Pick the held-out samples at random rather than the last ones (result)."""
    test_split_seed: int = 42
    """Seed for `test_split_shuffle` (result)."""
    rechunk_size: int | None = None
    """Join documents, each followed by the end-of-text token, and cut into samples of this many
    tokens. -1: the whole split becomes one sample. 0 or empty: keep one sample per document (result)."""
    num_proc: int | None = None
    """Processes for tokenization. Empty: one."""
    cache_dir: str | None = None
    """Cache for `datasets` downloads and intermediate files. Empty: the HF cache for hub sources and a
    temporary folder (deleted after the build) for local ones."""
    batch_size: int = 1
    """Samples per micro-batch."""
    num_workers: int = 0
    """DataLoader worker processes."""
    shuffle: bool = True
    """Shuffle the training samples each epoch."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.source is None and self.data_path is None:
            raise UserError("data.data_path: required (where the tokenized dataset is saved and loaded)")
        if self.source is not None and self.data_path is None:
            raise UserError(f"data.data_path: required to prepare data.source {self.source!r}")
        if self.multi_column_keys is not None:
            self._check_multi_column()
        if self.messages_column is not None:
            self._check_chat()
        else:
            defaults = {f.name: f.default for f in fields(self)}
            for key in CHAT_OPTIONS[1:]:
                if getattr(self, key) != defaults[key]:
                    raise UserError(
                        f"data.{key}: set without data.messages_column (the column of chat turns)"
                    )
        if self.test_split < 0 or (self.test_split >= 1 and not float(self.test_split).is_integer()):
            raise UserError(f"data.test_split: {self.test_split} (expected a fraction below 1 or a count)")
        if self.rechunk_size is not None and self.rechunk_size < -1:
            raise UserError(f"data.rechunk_size: {self.rechunk_size} (expected -1, 0 or a token count)")
        for key in ("batch_size", "num_proc"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"data.{key}: {value} (expected at least 1)")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers: {self.num_workers} (expected 0 or more)")

    def _check_multi_column(self) -> None:
        keys = self.multi_column_keys or []
        if not keys:
            raise UserError("data.multi_column_keys: empty list (expected column names)")
        for key in ("multi_column_prefix", "multi_column_suffix", "multi_column_train_mask"):
            value = getattr(self, key)
            if value is not None and len(value) != len(keys):
                raise UserError(
                    f"data.{key}: {len(value)} entries for {len(keys)} multi_column_keys "
                    "(expected one per key)"
                )

    def _check_chat(self) -> None:
        for key in ("text_column", "multi_column_keys"):
            if getattr(self, key) is not None:
                raise UserError(f"data.{key}: set together with data.messages_column (expected one of them)")
        if self.chat_bad_rows not in CHAT_BAD_ROWS:
            raise UserError(f"data.chat_bad_rows: {self.chat_bad_rows!r} (expected stop or drop)")
        roles = self.roles
        if not roles or not all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items()):
            raise UserError(f"data.chat_roles: {roles!r} (expected a mapping of role name to prefix text)")
        unknown = [r for r in self.learnt_roles if r not in roles]
        if unknown or not self.learnt_roles:
            raise UserError(
                f"data.chat_learnt_roles: {self.learnt_roles!r} (expected some of {', '.join(roles)})"
            )

    @property
    def roles(self) -> dict[str, str]:
        """Role -> prefix of the chat template (RWKV World's unless `chat_roles` is set)."""
        return dict(self.chat_roles) if self.chat_roles is not None else dict(WORLD_CHAT_ROLES)

    @property
    def learnt_roles(self) -> list[str]:
        """Roles whose turns are learnt (`[assistant]` unless `chat_learnt_roles` is set)."""
        return list(self.chat_learnt_roles) if self.chat_learnt_roles is not None else ["assistant"]

    def result_options(self) -> dict[str, Any]:
        """The options that change the prepared dataset, for its fingerprint."""
        values = asdict(self)
        keys = RESULT_OPTIONS + (CHAT_OPTIONS if self.messages_column is not None else ())
        return {key: values[key] for key in keys}

    @property
    def rechunk(self) -> int:
        """Target sample length in tokens; -1 for the whole split, 0 for no concatenation."""
        return self.rechunk_size or 0

    def test_size(self, num_docs: int) -> int:
        """How many of `num_docs` documents `test_split` holds out."""
        if self.test_split < 1:
            return math.ceil(self.test_split * num_docs) if self.test_split > 0 else 0
        return int(self.test_split)


_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "source_data_dir": (str,),
    "data_files": (str, list, dict),
    "source_split": (str,),
    "source_dataset_params": (dict,),
    "tokenizer": (str,),
    "data_path": (str,),
    "text_column": (str,),
    "multi_column_keys": (list,),
    "multi_column_prefix": (list,),
    "multi_column_suffix": (list,),
    "multi_column_separator": (str,),
    "multi_column_train_mask": (list,),
    "messages_column": (str,),
    "chat_roles": (dict,),
    "chat_content_prefix": (str,),
    "chat_separator": (str,),
    "chat_learnt_roles": (list,),
    "chat_collapse_newlines": (bool,),
    "chat_bad_rows": (str,),
    "min_token_size": (int,),
    "max_token_size": (int,),
    "test_split": (int, float),
    "test_split_shuffle": (bool,),
    "test_split_seed": (int,),
    "rechunk_size": (int,),
    "num_proc": (int,),
    "cache_dir": (str,),
    "batch_size": (int,),
    "num_workers": (int,),
    "shuffle": (bool,),
}


def _check_types(config: DataConfig) -> None:
    """Catch YAML values of the wrong kind (LightningCLI does this too; `preload` reads YAML directly)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None and f.default is None:
            continue
        expected = _TYPES[f.name]
        is_bool = isinstance(value, bool)
        if not isinstance(value, expected) or (is_bool and bool not in expected):
            names = " or ".join(t.__name__ for t in expected)
            raise UserError(f"data.{f.name}: {value!r} (expected {names})")


def known_options() -> list[str]:
    """Names of every `data:` option."""
    return [f.name for f in fields(DataConfig)]


def config_from_yaml(path: str, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """The `data:` section of a training YAML (other sections ignored), with `fit`'s command-line
    overrides of it (`--data.rechunk_size 300`, `--data.test_split=2`) applied, checked.

    Accepts the section flat (`data: {source: ...}`) or in LightningCLI's `init_args` form.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"config {path}: file not found")
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a 'data:' section (a mapping of data options)")
    if "init_args" in data:
        data = data["init_args"] or {}
    known = set(known_options())
    for key in data:
        if key not in known and key != "class_path":
            raise UserError(f"config {path}: unknown key data.{key} (known: {', '.join(sorted(known))})")
    data = {k: v for k, v in data.items() if k != "class_path"} | parse_overrides(overrides)
    from rwkv_infctx.training.settings_rules import check_settings  # the table fit checks too

    values = {f"data.{f.name}": data.get(f.name, f.default) for f in fields(DataConfig)}
    check_settings(values.get, values.__contains__)
    return DataConfig(**data)


def parse_overrides(argv: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--data.KEY VALUE` / `--data.KEY=VALUE` pairs as {KEY: value}; values read as YAML, as `fit`
    reads them (a text option keeps its text: `--data.source_split 2023` is the string "2023")."""
    import yaml

    out: dict[str, Any] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, eq, raw = arg.partition("=")
        if not key.startswith("--data.") or (not eq and not args):
            raise UserError(f"{arg}: unexpected argument (expected --data.KEY VALUE, as for fit)")
        raw = raw if eq else args.pop(0)
        name = key.removeprefix("--data.")
        if name not in _TYPES:
            raise UserError(f"{key}: unknown data option (known: {', '.join(sorted(_TYPES))})")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if value is not None and not isinstance(value, _TYPES[name]) and str in _TYPES[name]:
            value = raw
        out[name] = value
    return out
