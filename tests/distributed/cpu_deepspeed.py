"""TEST ONLY: Lightning's DeepSpeedStrategy on the CPU, over gloo.

Lightning refuses DeepSpeed without CUDA. This subclass skips that check, gives the CPU device an
index (DeepSpeed's engine reads `device_rank` from it) and lets `deepspeed.init_distributed` start
the gloo backend. It is for tests of the strategy's logic, not for training.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy(stage=..., offload_optimizer=..., ...)` that runs on `accelerator="cpu"`."""

    strategy_name = "cpu_deepspeed"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        # as DeepSpeedStrategy.setup_distributed, without the check that device indices are ranks
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)

    def _get_process_group_backend(self) -> str:
        return "gloo"
