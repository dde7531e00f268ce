"""Data: Hugging Face datasets in, tokenized once into `data.data_path`, padded batches out.

- `config.DataConfig`: the `data:` options; `sources`: what `data.source` names and how to load it;
- `encode`: text to `input_ids` + `loss_mask`; `pack`: rechunking and statistics;
- `store`: the prepared folder and its metadata; `build.prepare`: reuse or build;
- `collate.collate`: the batch format; `datamodule.RWKVDataModule`: all of it for Lightning.
"""

from rwkv_infctx.data.build import Prepared, prepare
from rwkv_infctx.data.collate import collate
from rwkv_infctx.data.config import DataConfig
from rwkv_infctx.data.datamodule import RWKVDataModule

__all__ = ["DataConfig", "Prepared", "RWKVDataModule", "collate", "prepare"]
