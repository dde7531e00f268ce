"""The RWKV-7 ("x070", Goose) model: plain nn.Module code, no Lightning."""

from rwkv_infctx.model.rwkv7.config import RWKV7Config
from rwkv_infctx.model.rwkv7.model import RWKV7
from rwkv_infctx.model.rwkv7.state import RWKV7State

__all__ = ["RWKV7", "RWKV7Config", "RWKV7State"]
