"""Update sparsity: the fraction of parameters an optimizer left unchanged, exactly, per layer, on sharded models.

- :class:`UpdateSparsityMonitor` (``callback.py``): the Lightning callback.
- :func:`overlap` (``overlap.py``): overlap of two runs' change masks, with chance baselines; also the
  ``lightning-power sparsity-overlap A B`` command.
- :class:`MaskFile` (``masks.py``): read a masks file; the format is documented there and in ``docs/sparsity.md``.
"""

from lightning_power.sparsity.callback import UpdateSparsityMonitor
from lightning_power.sparsity.masks import MaskFile
from lightning_power.sparsity.overlap import Overlap, overlap

__all__ = ["MaskFile", "Overlap", "UpdateSparsityMonitor", "overlap"]
