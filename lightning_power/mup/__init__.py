"""muP for any LightningModule: a name-keyed plan, the ``MuP`` callback and a coordinate check."""

from lightning_power.mup.callback import MuP
from lightning_power.mup.coord_check import CoordCheckResult, coord_check
from lightning_power.mup.plan import MuPPlan, ParamSpec, detect_optimizer_family
from lightning_power.mup.readout import ReadoutMultiplier, attach_readout_multiplier, attention_scale

__all__ = [
    "CoordCheckResult",
    "MuP",
    "MuPPlan",
    "ParamSpec",
    "ReadoutMultiplier",
    "attach_readout_multiplier",
    "attention_scale",
    "coord_check",
    "detect_optimizer_family",
]
