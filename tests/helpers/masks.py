"""Masks files written from the documented format alone (``numpy.savez``), as a third party would, not by our writer."""

from __future__ import annotations

import json

import numpy as np

MASKS_HEADER = {
    "format": "lightning-power/update-masks",
    "version": 1,
    "bit_order": "big",
    "compare_as": None,
    "atol": 0.0,
    "reference": "fit_start",
    "reference_step": 0,
    "step": 10,
}


def write_raw_masks_file(path, members: dict[str, np.ndarray], parameters, **header) -> None:
    """A masks file with exactly these members and metadata (``header`` overrides the defaults), consistent or not."""
    metadata = {**MASKS_HEADER, "parameters": parameters, **header}
    np.savez(path, __metadata__=np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8), **members)
