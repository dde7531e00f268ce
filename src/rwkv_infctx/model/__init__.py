"""The RWKV-4 model: plain nn.Module code, no Lightning."""

from rwkv_infctx.model.config import RWKV4Config
from rwkv_infctx.model.rwkv4 import RWKV4
from rwkv_infctx.model.state import RWKV4State

__all__ = ["RWKV4", "RWKV4Config", "RWKV4State"]
