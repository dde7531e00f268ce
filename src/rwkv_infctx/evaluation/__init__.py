"""Evaluation: loss by token position (`positions`), its table/CSV/PNG (`report`), the samples it
reads (`samples`), and a Lightning validation callback (`callback.PositionLossCallback`).

The callback is imported on first use, so `eval-positions` does not load Lightning.
"""

from typing import Any

from rwkv_infctx.evaluation.positions import BucketRow, PositionLoss, bucket_edges, evaluate

__all__ = ["BucketRow", "PositionLoss", "PositionLossCallback", "bucket_edges", "evaluate"]


def __getattr__(name: str) -> Any:
    if name == "PositionLossCallback":
        from rwkv_infctx.evaluation.callback import PositionLossCallback

        return PositionLossCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
