"""The models: plain nn.Module code, no Lightning. One package or module per RWKV version; the
registry (`model.registry`) is how everything else finds a version's config, state and rules."""

from typing import TypeAlias

from rwkv_infctx.model.config import RWKV4Config
from rwkv_infctx.model.rwkv4 import RWKV4
from rwkv_infctx.model.rwkv7 import RWKV7, RWKV7Config, RWKV7State
from rwkv_infctx.model.state import RWKV4State

RWKVModel: TypeAlias = RWKV4 | RWKV7
"""Any model of a known family: `fresh_state`, `hidden`, `head`, `forward`, `cfg`."""

__all__ = ["RWKV4", "RWKV7", "RWKV4Config", "RWKV4State", "RWKV7Config", "RWKV7State", "RWKVModel"]
