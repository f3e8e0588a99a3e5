"""lightning-power: Power and WSD schedulers, muP and update-sparsity monitoring for any LightningModule."""

from lightning_power.mup import MuP
from lightning_power.schedulers import PowerScheduler, WSDScheduler
from lightning_power.sparsity import UpdateSparsityMonitor
from lightning_power.tokens import TokenCounter

__version__ = "0.1.0.dev0"

__all__ = ["MuP", "PowerScheduler", "TokenCounter", "UpdateSparsityMonitor", "WSDScheduler"]
