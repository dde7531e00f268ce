"""The registry of model families: detection from a file's keys, the family of a model, `model.arch`
against the file, each family's optimizer rules and its FLOPs per token (against counts made here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import load_model, model_from_state_dict, save_state_dict
from rwkv_infctx.model import RWKV4, RWKV7, RWKV4Config, RWKV7Config
from rwkv_infctx.model.registry import FAMILIES, detect_family, family_named, family_of
from rwkv_infctx.training.build import build_model
from rwkv_infctx.training.optim import OptimConfig, param_groups

V4 = RWKV4Config(n_layer=2, n_embd=32, vocab_size=97, dim_att=24, dim_ffn=80)
V7 = RWKV7Config(
    n_layer=3, n_embd=128, vocab_size=150, dim_ffn=320,
    d_decay_lora=32, d_aaa_lora=48, d_mv_lora=16, d_gate_lora=64, wkv_backend="reference",
)  # fmt: skip


@pytest.fixture(scope="module")
def sd4() -> dict[str, torch.Tensor]:
    return RWKV4(V4).state_dict()


@pytest.fixture(scope="module")
def sd7() -> dict[str, torch.Tensor]:
    return RWKV7(V7).state_dict()


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_each_family_is_detected_from_its_keys(sd4, sd7):
    assert set(FAMILIES) == {"rwkv4", "rwkv7"}
    assert detect_family(sd4).name == "rwkv4" and detect_family(sd7).name == "rwkv7"
    # one marker is enough: a file holding only part of the model is still recognised (and then
    # refused for its missing keys, see test_rwkv7_files)
    assert detect_family({"blocks.0.att.time_first": sd4["blocks.0.att.time_first"]}).name == "rwkv4"
    assert detect_family({"blocks.0.att.k_k": sd7["blocks.0.att.k_k"]}).name == "rwkv7"


def test_a_file_of_neither_family_gets_one_line_naming_what_is_expected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"transformer.wte.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(UserError) as e:
        load_model(path)
    line = one_line(e)
    assert str(path) in line and "not an RWKV model file" in line
    for expected in ("RWKV-4", "blocks.0.att.time_decay", "RWKV-7", "blocks.0.att.w0", "blocks.0.att.r_k"):
        assert expected in line


def test_a_state_dict_with_both_families_markers_is_refused(sd4, sd7, tmp_path):
    mixed = {**sd4, **{k: v for k, v in sd7.items() if k.startswith("blocks.0.att.")}}
    with pytest.raises(UserError) as e:
        detect_family(mixed, "mixed.pth")
    line = one_line(e)
    assert "mixed.pth" in line and "RWKV-4 and RWKV-7" in line
    save_state_dict(mixed, tmp_path / "mixed.pth", "fp32")
    with pytest.raises(UserError, match="RWKV-4 and RWKV-7"):
        load_model(tmp_path / "mixed.pth")


def test_family_of_a_model():
    assert family_of(RWKV4(V4)).name == "rwkv4"
    assert family_of(RWKV7(V7)).name == "rwkv7"
    with pytest.raises(TypeError, match="Linear"):
        family_of(nn.Linear(2, 2))
    assert family_named("rwkv7").title == "RWKV-7"
    with pytest.raises(UserError, match=r"^--arch: 'rwkv6' \(expected one of rwkv4, rwkv7\)$"):
        family_named("rwkv6", "--arch")


def test_arch_that_disagrees_with_the_file_is_one_line(sd4, sd7, tmp_path):
    with pytest.raises(UserError) as e:
        model_from_state_dict(sd7, "x070.pth", arch="rwkv4", wkv_backend="reference")
    line = one_line(e)
    assert "x070.pth" in line and "RWKV-7" in line and "rwkv4" in line
    with pytest.raises(UserError, match=r"RWKV-4 file, but model\.arch is rwkv7"):
        model_from_state_dict(sd4, "v4.pth", arch="rwkv7")
    path = tmp_path / "x070.pth"
    save_state_dict(sd7, path, "fp32")
    with pytest.raises(UserError, match=r"model\.arch is rwkv4"):
        build_model(str(path), {}, wkv_backend="reference", arch="rwkv4")
    for arch in ("auto", "rwkv7"):  # the matching name and auto load the same model
        model = build_model(str(path), {}, wkv_backend="reference", arch=arch)
        assert isinstance(model, RWKV7) and model.cfg == V7


# RWKV-LM train_temp (configure_optimizers): weight decay only on these matrices, att.w0 at 2×
DECAYED_7 = {"emb.weight", "head.weight"} | {
    f"blocks.{i}.{m}.weight"
    for i in range(V7.n_layer)
    for m in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
}


def groups_by_name(model: nn.Module, cfg: OptimConfig) -> dict[str, tuple[float, float]]:
    """Parameter name -> (lr scale, weight decay); every trainable parameter in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[float, float]] = {}
    for g in param_groups(model, cfg):
        assert g["lr"] == cfg.lr_init * g["lr_scale"]
        for p in g["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert out.keys() == set(names.values())
    return out


def test_rwkv7_optimizer_groups():
    model = RWKV7(V7)
    groups = groups_by_name(model, OptimConfig(weight_decay=0.1, lr_init=1.0))
    for name, (scale, decay) in groups.items():
        assert scale == (2.0 if name.endswith(".att.w0") else 1.0), name
        assert decay == (0.1 if name in DECAYED_7 else 0.0), name
    assert groups.keys() >= DECAYED_7
    leaves = {name.rsplit(".", 1)[-1] for name in groups}
    # the undecayed 1× parameters include every kind the rule must leave alone
    assert {"w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2", "r_k", "x_r", "k_k", "k_a", "a0"} <= leaves
    assert [n for n in groups if n.endswith(".att.w0")] == [f"blocks.{i}.att.w0" for i in range(3)]
    # layer 0's value-residual vectors are never read, so never trained
    assert not {f"blocks.0.att.{v}" for v in ("v0", "v1", "v2")} & groups.keys()
    assert "blocks.1.att.v1" in groups
    flat = groups_by_name(model, OptimConfig(weight_decay=0.1, layerwise_lr=False))
    assert {s for s, _ in flat.values()} == {1.0}
    assert {n for n, (_, d) in flat.items() if d} == DECAYED_7


def test_rwkv4_optimizer_groups_are_unchanged():
    model = RWKV4(V4)
    groups = groups_by_name(model, OptimConfig(weight_decay=0.1, lr_init=1.0))
    matrices = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance")
    decayed = {"emb.weight", "head.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(V4.n_layer) for m in (*matrices, "ffn.value")
    }
    for name, (scale, decay) in groups.items():
        want = 2.0 if name.endswith("att.time_decay") else 3.0 if name.endswith("att.time_first") else 1.0
        assert scale == want, name
        assert decay == (0.1 if name in decayed else 0.0), name
    flat = groups_by_name(model, OptimConfig(layerwise_lr=False))
    assert {s for s, _ in flat.values()} == {1.0}


def matmul_weights(model: nn.Module, lora_leaves: tuple[str, ...] = ()) -> int:
    """Multiply-adds per token of every matrix product: the Linear weights (the head included) and
    the LoRA factors that are trainable parameters (layer 0's v1/v2 are buffers: never read)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    lora = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in lora_leaves)
    return linear + lora


def test_rwkv7_flops_per_token():
    model = RWKV7(V7)
    C, N, L = V7.n_embd, V7.head_size, V7.n_layer
    # each head's state update and read: decay N², S·a 2N², its outer product 2N², v·kᵀ 2N², S·r 2N²
    wkv = 9 * N * N * (C // N)
    expected = 2 * matmul_weights(model, ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")) + L * wkv
    assert family_of(model).forward_flops_per_token(V7) == expected
    # by hand for this config: 4 C² + 2 C·F projections, LoRAs, value LoRA from layer 1, head
    by_hand = (
        2 * (L * (4 * C * C + 2 * C * 320 + 2 * C * (32 + 48 + 64)) + (L - 1) * 2 * C * 16 + C * 150)
        + L * 9 * N * C
    )
    assert expected == by_hand


def test_rwkv4_flops_per_token():
    model = RWKV4(V4)
    expected = 2 * matmul_weights(model) + V4.n_layer * 23 * V4.dim_att  # rwkv4_flops: 23 ops/channel
    assert family_of(model).forward_flops_per_token(V4) == expected
