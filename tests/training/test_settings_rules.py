"""Every setting of configs/example.yaml given an out-of-range value: one stderr line naming the key,
the value and the accepted range (the settings table's), exit code 2, and no file written.

The bad values below are this test's own (not read from the table), so a rule missing from the
table, or one that accepts too much, fails here. Keys whose values have no range (free text,
paths, objects) are listed in FREE_FORM with the reason; a new key in example.yaml must be added to
one of the two. Most cases run `rwkv_infctx.cli.main` in-process (fast); SUBPROCESS_KEYS run the
real command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rwkv_infctx.cli import main
from rwkv_infctx.errors import UserError
from rwkv_infctx.training.settings_rules import RULES, check_settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "example.yaml"

BAD: dict[str, str] = {
    "seed_everything": "-1",
    "target_batch_size": "0",
    "trainer.accelerator": "abacus",
    "trainer.strategy": "fsdp",
    "trainer.devices": "0",
    "trainer.num_nodes": "0",
    "trainer.precision": "16-mixed",
    "trainer.fast_dev_run": "-1",
    "trainer.max_epochs": "-3",
    "trainer.min_epochs": "-1",
    "trainer.max_steps": "-5",
    "trainer.min_steps": "-1",
    "trainer.max_time": "12h",
    "trainer.limit_train_batches": "1.5",
    "trainer.limit_val_batches": "-1",
    "trainer.limit_test_batches": "2.5",
    "trainer.limit_predict_batches": "-0.5",
    "trainer.overfit_batches": "1.5",
    "trainer.val_check_interval": "0",
    "trainer.check_val_every_n_epoch": "0",
    "trainer.num_sanity_val_steps": "-2",
    "trainer.log_every_n_steps": "0",
    "trainer.enable_checkpointing": "maybe",
    "trainer.enable_progress_bar": "maybe",
    "trainer.enable_model_summary": "maybe",
    "trainer.accumulate_grad_batches": "0",
    "trainer.gradient_clip_val": "-1.0",
    "trainer.gradient_clip_algorithm": "median",
    "trainer.deterministic": "maybe",
    "trainer.benchmark": "maybe",
    "trainer.inference_mode": "maybe",
    "trainer.use_distributed_sampler": "maybe",
    "trainer.profiler": "fancy",
    "trainer.detect_anomaly": "maybe",
    "trainer.barebones": "maybe",
    "trainer.sync_batchnorm": "maybe",
    "trainer.reload_dataloaders_every_n_epochs": "-1",
    "trainer.enable_autolog_hparams": "maybe",
    "model.arch": "rwkv5",
    "model.ctx_len": "0",
    "model.ctx_len_cutoff": "0",
    "model.n_layer": "0",
    "model.n_embd": "-4",
    "model.vocab_size": "gpt2",
    "model.dim_att": "0",
    "model.dim_ffn": "0",
    "model.head_size": "0",
    "model.d_decay_lora": "0",
    "model.d_aaa_lora": "-1",
    "model.d_mv_lora": "0",
    "model.d_gate_lora": "0",
    "model.lr_init": "-0.1",
    "model.lr_final": "-0.5",
    "model.warmup_steps": "-1",
    "model.lr_decay": "step",
    "model.optimizer": "lion",
    "model.beta1": "1.5",
    "model.beta2": "1.0",
    "model.adam_eps": "-0.5",
    "model.weight_decay": "-0.1",
    "model.layerwise_lr": "maybe",
    "model.bptt": "partial",
    "model.boundary_states": "disk",
    "model.grad_cp": "maybe",
    "model.grad_accum_dtype": "float16",
    "model.loss_chunk": "0",
    "model.compile": "maybe",
    "model.dropout": "1.0",
    "model.seed": "-1",
    "model.wkv_backend": "cuda",
    "model.wkv_self_check": "maybe",
    "model.export_dtype": "fp16",
    "model.peak_tflops": "0.0",
    "model.nan_policy": "ignore",
    "model.loss_normalization": "per_sample",
    "model.train_mode": "prefix",
    "model.lora_r": "0",
    "model.lora_alpha": "0",
    "model.lora_dropout": "1.0",
    "model.lora_init": "loftq",
    "model.state_lr": "0",
    "data.min_token_size": "0",
    "data.max_token_size": "-3",
    "data.test_split": "1.5",
    "data.test_split_shuffle": "maybe",
    "data.test_split_seed": "-1",
    "data.rechunk_size": "-2",
    "data.num_proc": "0",
    "data.batch_size": "0",
    "data.num_workers": "-1",
    "data.shuffle": "maybe",
    "data.chat_collapse_newlines": "maybe",
    "data.chat_bad_rows": "ignore",
    "weights_only": "maybe",
}

FREE_FORM: dict[str, str] = {
    "trainer.logger": "a Logger object, true/false or null: the parser checks the type, Lightning the object",
    "trainer.callbacks": "Callback objects: the parser checks the type, Lightning the objects",
    "trainer.plugins": "plugin objects: the parser checks the type, Lightning the objects",
    "trainer.default_root_dir": "a folder; preflight checks it can be created",
    "trainer.model_registry": "a free name",
    "model.load_model": "a file; checked when it is loaded (io/model_file.py)",
    "model.export": "a file name; preflight checks its folder",
    "model.lora_targets": "module-name suffixes; checked against the model's linear layers (tuning/lora.py)",
    "model.lora_train_also": "parts of parameter names; each must match one (tuning/lora.py)",
    "model.load_adapter": "a folder; checked when it is read (tuning/lora_files.py)",
    "model.load_state": "a state file; checked when it is read (tuning/state_files.py)",
    "data.source": "a dataset name, builder, path or pkg://NAME; resolved when data is prepared",
    "data.source_data_dir": "a folder",
    "data.data_files": "file names, globs or a split mapping",
    "data.source_split": "a split name of the source",
    "data.source_dataset_params": "free keyword arguments for datasets.load_dataset",
    "data.tokenizer": "neox, world, a file or a name; checked when loaded",
    "data.data_path": "a folder",
    "data.text_column": "a column name; checked against the source's columns",
    "data.multi_column_keys": "column names; checked against the source's columns",
    "data.multi_column_prefix": "free text per column (DataConfig checks the count)",
    "data.multi_column_suffix": "free text per column (DataConfig checks the count)",
    "data.multi_column_separator": "free text",
    "data.multi_column_train_mask": "booleans per column (the parser checks the type, DataConfig the count)",
    "data.cache_dir": "a folder",
    "data.messages_column": "a column name; checked against the source's columns",
    "data.chat_roles": "role -> prefix text (DataConfig checks the mapping)",
    "data.chat_content_prefix": "free text",
    "data.chat_separator": "free text",
    "data.chat_learnt_roles": "role names; DataConfig checks them against chat_roles",
    "ckpt_path": "a file, auto or null; resolved by preflight (must exist, must load)",
}

SUBPROCESS_KEYS = ("trainer.max_steps", "model.beta1", "data.batch_size")


def example_keys() -> list[str]:
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    keys = []
    for name, value in doc.items():
        if name in ("trainer", "model", "data"):
            keys += [f"{name}.{key}" for key in value]
        else:
            keys.append(name)
    return keys


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def check_line(err: str, key: str, bad: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"rwkv-infctx fit: error: {key}: "), line
    assert bad in line, line  # the value given
    expected = [rule.expected for rule in RULES if rule.key == key and rule.when is None]
    assert expected and line.endswith(f"(expected {expected[0]})"), line  # the accepted range
    assert "Traceback" not in err


def test_every_example_key_is_walked():
    keys = set(example_keys())
    assert keys == set(BAD) | set(FREE_FORM), keys ^ (set(BAD) | set(FREE_FORM))
    assert not set(BAD) & set(FREE_FORM)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("key", sorted(set(BAD) - set(SUBPROCESS_KEYS)))
def test_out_of_range_in_process(key, workdir, capsys):
    before = snapshot(workdir)
    code = main(["fit", "-c", str(EXAMPLE), f"--{key}", BAD[key]])
    err = capsys.readouterr().err
    assert code == 2, err
    check_line(err, key, BAD[key])
    assert snapshot(workdir) == before


@pytest.mark.parametrize("key", SUBPROCESS_KEYS)
def test_out_of_range_subprocess(key, workdir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "rwkv_infctx", "fit", "-c", str(EXAMPLE), f"--{key}", BAD[key]]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    check_line(done.stderr, key, BAD[key])
    assert snapshot(workdir) == set()


CROSS = [
    (["--model.lr_decay", "exponential", "--model.lr_final", "0"], "model.lr_final: 0.0",
     "a number > 0 with lr_decay exponential"),
    (["--data.min_token_size", "5", "--data.max_token_size", "3"], "data.max_token_size: 3",
     "null or an integer ≥ data.min_token_size"),
    (["--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", '
      '"init_args": {"stage": 5}}'], "trainer.strategy.init_args.stage: 5", "0, 1, 2 or 3"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "start", "expected"), CROSS)
def test_rules_across_keys(args, start, expected, workdir, capsys):
    code = main(["fit", "-c", str(EXAMPLE), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"rwkv-infctx fit: error: {start} is out of range (expected {expected})"
    assert snapshot(workdir) == set()


def values(config: dict) -> dict:
    flat = {}
    for name, value in config.items():
        if isinstance(value, dict) and name in ("trainer", "model", "data"):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


IN_RANGE = {
    "trainer.max_steps": [-1, 1],
    "trainer.max_epochs": [-1, 1, None],
    "trainer.devices": ["auto", 1, -1, "2", "0,1", "0,", [0, 1]],
    "trainer.precision": ["bf16", "bf16-mixed", 32, "64-true", None],
    "trainer.val_check_interval": [1, 0.25, 1.0, "00:00:10:00", {"minutes": 10}],
    "trainer.limit_val_batches": [0, 0.0, 1.0, 5],
    "trainer.max_time": ["00:12:00:00", {"hours": 12}],
    "trainer.strategy": ["ddp", "deepspeed_stage_3_offload"],
    "model.beta1": [0.0, 0.999],
    "model.adam_eps": [1e-12],
    "model.vocab_size": ["world", 65536],
    "data.test_split": [0.0, 0.5, 3, 3.0],
    "data.rechunk_size": [-1, 0, 512, None],
    "seed_everything": [True, 0, 2**32 - 1],
}


def test_example_and_boundary_values_are_accepted():
    base = values(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    check_settings(base.get)  # every default of example.yaml is in range
    for key, accepted in IN_RANGE.items():
        for value in accepted:
            check_settings({**base, key: value}.get)
    with pytest.raises(UserError, match=r"^model\.beta1: 1\.0 is out of range"):
        check_settings({**base, "model.beta1": 1.0}.get)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_is_in_range(config):
    flat = values(yaml.safe_load(config.read_text(encoding="utf-8")))
    check_settings(flat.get, flat.__contains__)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_check_too(subcommand, workdir, capsys):
    assert main([subcommand, "-c", str(EXAMPLE), "--model.ctx_len", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"rwkv-infctx {subcommand}: error: model.ctx_len: 0 is out of range (expected an integer ≥ 1)"
    )
    assert snapshot(workdir) == set()
