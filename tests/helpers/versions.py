"""Skips for torch releases with a known fault outside this project. The strategies refuse the two CPU setups
(tested in ``tests/test_distributed_fit.py``), so a user gets an error, never a crash or a wrong gradient."""

import pytest
import torch

from lightning_power.strategies import CPU_FSDP1_FULL_CHECKPOINT_TORCH, CPU_FSDP2_TORCH

cpu_fsdp2 = pytest.mark.skipif(
    torch.__version__ < CPU_FSDP2_TORCH,
    reason="FSDP2 over several CPU processes needs torch >= 2.9 (older torch sums the gradients over gloo)",
)
cpu_fsdp1_full_checkpoint = pytest.mark.skipif(
    torch.__version__ < CPU_FSDP1_FULL_CHECKPOINT_TORCH,
    reason="FSDP1's full checkpoint on CPU needs torch >= 2.14 (older torch crashes while saving it)",
)
compiled_module_logging = pytest.mark.skipif(
    (2, 12) <= torch.__version__ < (2, 14),
    reason="torch 2.12-2.13: a compiled LightningModule that calls self.log fails in Dynamo (Lightning issue #21836)",
)
