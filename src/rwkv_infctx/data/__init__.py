"""Data: Hugging Face datasets in, tokenized once into `data.data_path`, padded batches out.

- `config.DataConfig`: the `data:` options; `sources`: what `data.source` names and how to load it;
- `encode`: text to `input_ids` + `loss_mask`; `chat`: conversations, the same with a chat template;
- `binidx`: already-tokenized RWKV-LM/Megatron `.bin` + `.idx` files; `pack`: rechunking and statistics;
- `store`: the prepared folder and its metadata; `build.prepare`: reuse or build;
- `collator.collate`: the batch format; `datamodule.RWKVDataModule`: all of it for Lightning.

`RWKVDataModule` and `collate` are imported on first use, so `preload` does not load Lightning.
"""

from typing import Any

from rwkv_infctx.data.build import Prepared, prepare
from rwkv_infctx.data.config import DataConfig

__all__ = ["DataConfig", "Prepared", "RWKVDataModule", "collate", "prepare"]


def __getattr__(name: str) -> Any:
    if name == "RWKVDataModule":
        from rwkv_infctx.data.datamodule import RWKVDataModule

        return RWKVDataModule
    if name == "collate":
        from rwkv_infctx.data.collator import collate

        return collate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
