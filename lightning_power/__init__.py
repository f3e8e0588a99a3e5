"""lightning-power: Power and WSD schedulers, muP and update-sparsity monitoring for any LightningModule."""

__version__ = "0.1.0.dev0"
