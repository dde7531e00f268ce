"""bench/gpu (`python -m bench.gpu`): the pieces that need no GPU, and its quick mode on the CPU."""

from __future__ import annotations

import pytest
import torch
from bench.gpu import __main__ as gpu_main
from bench.gpu import models
from bench.gpu.bptt_rows import wkv_used
from bench.gpu.table import COLUMNS, Row, guarded, render

from rwkv_infctx.model import RWKV7, RWKV4Config, RWKV7Config
from rwkv_infctx.model.rwkv7.family import FAMILY as RWKV7_FAMILY
from rwkv_infctx.model.rwkv7.init import init_weights
from rwkv_infctx.ops import self_check
from rwkv_infctx.training.throughput import peak_tflops_for_name

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_nominal_peak_by_device_name(name, peak):
    assert peak_tflops_for_name(name) == peak


def test_mfu_is_three_forwards_per_token_over_the_peak():
    model = models.build_model(models.config("rwkv7", True, "chunked"), CPU, torch.float32)
    forward = RWKV7_FAMILY.forward_flops_per_token(model.cfg)
    assert models.mfu(model, 5e4, 600.0) == pytest.approx(3 * forward * 5e4 / 6e14)
    assert models.mfu(model, 5e4, None) is None


def test_grad_errors_global_worst_and_non_finite():
    ref = {"a": torch.tensor([10.0, -10.0]), "b": torch.tensor([0.1, 0.0]), "c": torch.ones(2)}
    got = {
        "a": torch.tensor([10.5, -10.0]),
        "b": torch.tensor([0.2, 0.0]),
        "c": torch.tensor([1.0, float("nan")]),
    }
    glob, worst, worst_name, bad = models.grad_errors(got, ref)
    assert glob == pytest.approx(0.5 / 10)  # max |diff| over max |ref|, over all parameters
    assert (worst, worst_name) == (pytest.approx(1.0), "b")  # 0.1 / 0.1
    assert bad == ["c"]
    del got["a"]
    assert models.grad_errors(got, ref)[3] == ["a", "c"]


def test_cheap_init_rwkv4_fills_every_parameter_in_range():
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=50, wkv_backend="chunked")
    model = models.build_model(cfg, CPU, torch.bfloat16, seed=3)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), name
        if name.endswith("time_decay"):
            assert p.min() >= -5 and p.max() <= 3 and p.std() > 0.5
        elif name.endswith("time_first"):
            assert p.min() >= -2 and p.max() <= 1
        elif name.endswith("ln1.weight"):
            assert (p == 1).all()
        elif name.endswith("key.weight"):
            assert p.std() > 0.01
    again = models.build_model(cfg, CPU, torch.bfloat16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_cheap_init_rwkv7_vectors_are_train_temps():
    """The per-layer vectors equal the trainer's own init (init_weights); the matrices are random."""
    cfg = RWKV7Config(n_layer=3, n_embd=128, vocab_size=64)
    cheap = dict(models.build_model(cfg, CPU, torch.float32).named_parameters())
    ref = dict(init_weights(RWKV7(cfg)).named_parameters())
    for name in ("att.w0", "att.a0", "att.k_k", "att.r_k", "att.x_w", "att.ln_x.weight", "ffn.x_k"):
        for layer in range(3):
            key = f"blocks.{layer}.{name}"
            assert torch.allclose(cheap[key], ref[key]), key
    assert cheap["blocks.1.att.output.weight"].std() > 0.01  # not train_temp's zero matrix


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_whole_step_has_bptt_steps_objective(family):
    """The correctness rows' oracle: plain autograd gives bptt_step's loss and gradients (fp32)."""
    model = models.build_model(models.config(family, True, "chunked"), CPU, torch.float32, seed=1)
    batch = models.random_batch(model.cfg.vocab_size, 24, CPU, seed=1)
    loss_w = models.whole_step(model, batch)
    ref = models.grads(model)
    model.zero_grad(set_to_none=True)
    loss_s, nbytes = models.segmented_step(model, batch, ctx_len=8, boundary="cpu")
    glob, _, _, bad = models.grad_errors(models.grads(model), ref)
    assert loss_s == pytest.approx(loss_w, rel=1e-5)
    assert not bad and glob < 1e-5 and nbytes > 0


def test_guarded_turns_any_failure_into_one_row():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    (row,) = guarded("bptt step bf16", "RWKV-7 1.5B", oom)
    assert (
        row.failed and row.status == "ERROR OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert guarded("p", "c", lambda: [Row("p", "c", status="ok")]) == [Row("p", "c", status="ok")]


def test_render_one_markdown_table():
    text = render([Row("kernel", "a|b", status="ok", time="1.00 ms")])
    lines = text.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert lines[1].count("---") == len(COLUMNS)
    assert lines[2] == "| kernel | a/b | ok |  | 1.00 ms |  |  |  |  |"


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")][1:]  # header dropped
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows (skipped kernels)")
def test_quick_mode_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert gpu_main.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    rows = _table_rows(printed)
    assert all(len(r) == len(COLUMNS) for r in rows)
    by_part: dict[str, list[list[str]]] = {}
    for r in rows:
        by_part.setdefault(r[0], []).append(r)
    assert [len(by_part[p]) for p in ("self-check", "kernel f+b bf16", "bptt grads", "bptt step bf16")] == [
        3,
        3,
        2,
        8,
    ]
    for r in by_part["self-check"] + by_part["kernel f+b bf16"]:
        assert r[2] == "skipped: no CUDA"
    for r in by_part["bptt grads"]:
        assert r[2] == "ok" and float(r[3].split()[0]) <= 1e-4
    for r in by_part["bptt step bf16"]:
        assert r[2] == "ok" and r[4].endswith("tok/s") and float(r[4][:-7]) > 0, r
    assert {r[1].split(" boundary_states ")[1] for r in by_part["bptt step bf16"]} == {"device", "cpu"}
    assert "no row failed" in printed


def test_parts_are_checked():
    with pytest.raises(SystemExit):
        gpu_main.parse_args(["--parts", "kernels,bogus"])


def test_bptt_rows_name_the_wkv_op_that_ran():
    """A kernel that failed its self-check is reported as the chunked op it fell back to."""
    cuda = torch.device("cuda")  # only its type is read: no CUDA needed
    self_check.reset()
    try:
        assert wkv_used("rwkv4", "auto", cuda) == "triton"
        assert wkv_used("rwkv4", "chunked", cuda) == "chunked"
        assert wkv_used("rwkv4", "auto", CPU) == "auto"
        key = self_check.CheckKey("WKV-4", "triton", torch.bfloat16, "cuda:0", 2048)
        with pytest.warns(self_check.SelfCheckWarning):
            assert not self_check.use_fast_kernel(key, "warn", lambda: "y differs")
        assert wkv_used("rwkv4", "auto", cuda) == "chunked (triton failed its self-check)"
        assert wkv_used("rwkv7", "auto", cuda) in ("fla", "chunked (fla not installed)")
    finally:
        self_check.reset()
