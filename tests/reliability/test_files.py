"""What is written is complete or absent; what is read runs no code and fetches nothing."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.data import DataConfig, prepare
from rwkv_infctx.data.store import work_dir
from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import save_state_dict
from rwkv_infctx.training.checkpointing import AtomicCheckpointIO, checkpoint_candidates, read_checkpoint
from tests.reliability.conftest import fit_config, write_config

EVERY_STEP = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"every_n_train_steps": 1, "save_top_k": -1},
}


def ckpt(step: int) -> dict:
    return {"state_dict": {"w": torch.full((3,), float(step))}, "loops": {}, "global_step": step}


def full_disk_after(monkeypatch, good_saves: int) -> None:
    """torch.save works `good_saves` times, then writes half a file and raises ENOSPC."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= good_saves:
            return real(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def test_enospc_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(ckpt(1), path)
    full_disk_after(monkeypatch, 0)
    with pytest.raises(UserError, match=r"last.ckpt: save failed \(disk full\)"):
        AtomicCheckpointIO().save_checkpoint(ckpt(2), path)
    monkeypatch.undo()
    assert read_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left


def test_enospc_during_fit_stops_with_one_line(corpus, run_root, monkeypatch, capsys):
    cfg = fit_config(run_root, *corpus, **{"trainer.callbacks": [EVERY_STEP]})
    full_disk_after(monkeypatch, 2)
    assert main(["fit", "-c", str(write_config(run_root / "c.yaml", cfg))]) == 2
    monkeypatch.undo()
    assert "save failed (disk full)" in capsys.readouterr().err.strip().splitlines()[-1]
    files = sorted(p.name for p in run_root.rglob("*ckpt*"))
    assert files == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    assert all(read_checkpoint(p) is not None for p in run_root.rglob("*.ckpt"))


def test_auto_picks_the_newest_complete_checkpoint(tmp_path):
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (1, 2, 3):
        AtomicCheckpointIO().save_checkpoint(ckpt(step), folder / f"step={step}.ckpt")
        time.sleep(0.01)
    data = (folder / "step=3.ckpt").read_bytes()
    (folder / "step=3.ckpt").write_bytes(data[: len(data) // 2])  # truncated (not by us: we rename)
    (folder / ".step=4.ckpt.abc.tmp").write_bytes(data)  # a temporary of a killed save

    class Trainer:
        checkpoint_callbacks, loggers, default_root_dir = [], [], str(tmp_path)

    from rwkv_infctx.training.checkpointing import resolve_ckpt_path

    assert [p.name for p in checkpoint_candidates(Trainer())] == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert Path(resolve_ckpt_path("auto", Trainer())).name == "step=2.ckpt"
    assert (
        resolve_ckpt_path("auto", type("Empty", (Trainer,), {"default_root_dir": str(tmp_path / "x")})())
        is None
    )


def test_exported_model_is_atomic_and_readable(tmp_path, monkeypatch):
    out = tmp_path / "m.pth"
    save_state_dict({"w": torch.ones(2)}, out, "fp32")
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # a normal file's mode, not mkstemp's
    full_disk_after(monkeypatch, 0)
    with pytest.raises(OSError):
        save_state_dict({"w": torch.zeros(2)}, out, "fp32")
    monkeypatch.undo()
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_half_built_data_path_is_rebuilt_and_stale_builds_removed(corpus, tmp_path):
    source, tokenizer = corpus
    config = DataConfig(source=str(source), tokenizer=str(tokenizer), data_path=str(tmp_path / "d"))
    assert prepare(config).action == "built"
    arrow = next((tmp_path / "d" / "train").glob("*.arrow"))
    arrow.unlink()
    with pytest.raises(UserError, match="incomplete"):
        prepare(DataConfig(tokenizer=str(tokenizer), data_path=str(tmp_path / "d")))
    done = prepare(config)
    assert done.action == "built" and done.reason.startswith("incomplete")
    # a build folder of a killed process (pid not alive) is removed by the next build
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".d.building-{socket.gethostname()}-{dead.pid}-deadbeef"
    other_host = tmp_path / ".d.building-elsewhere-1-cafebabe"
    stale.mkdir()
    other_host.mkdir()
    shutil.rmtree(work_dir(tmp_path / "d"))
    assert not stale.exists() and other_host.exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(corpus, run_root, capsys):
    marker = run_root / "pwned"
    Evil.marker = marker
    evil = run_root / "evil.ckpt"
    torch.save({**ckpt(1), "x": Evil()}, evil)
    cfg = write_config(run_root / "c.yaml", fit_config(run_root, *corpus))
    assert main(["fit", "-c", str(cfg), "--ckpt_path", str(evil)]) == 2
    assert "pickled code" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not marker.exists()
    # Lightning's own loading (ckpt_path: last/best bypass our check) uses torch's weights_only default
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        torch.load(evil)
    assert not marker.exists()


def test_yaml_python_tags_are_refused(corpus, run_root, capsys):
    marker = run_root / "pwned"
    cfg = write_config(run_root / "c.yaml", fit_config(run_root, *corpus))
    evil = run_root / "evil.yaml"
    evil.write_text(cfg.read_text() + f'\nckpt_path: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["fit", "-c", str(evil)]) != 0
    assert not marker.exists()
    assert main(["preload", "-c", str(evil)]) == 2
    assert not marker.exists()


def test_offline_nothing_is_fetched(corpus, run_root, monkeypatch, capsys):
    """With the hub's offline variables set, a fit on local data opens no connection, and a hub
    source fails with one line instead of trying the network."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = write_config(run_root / "c.yaml", fit_config(run_root, *corpus, **{"trainer.max_steps": 1}))
    assert main(["fit", "-c", str(cfg)]) == 0
    with pytest.raises(UserError, match="owner/nothing-here"):
        prepare(DataConfig(source="owner/nothing-here", data_path=str(run_root / "hub")))
    assert attempts == []
