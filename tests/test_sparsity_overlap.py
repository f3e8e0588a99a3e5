"""Masks files whose members or metadata contradict each other are refused with a clear error, never measured."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_power.sparsity import overlap
from lightning_power.sparsity.masks import MaskFile
from lightning_power.sparsity.overlap import main
from tests.helpers.masks import write_raw_masks_file

EIGHT_OF_64 = np.packbits(np.arange(64) < 8, bitorder="big")  # elements 0..7 changed: bytes ff 00 00 ...


BAD_FILES = {
    "one byte for 64 elements": (
        {"w": np.array([0xFF], np.uint8)},
        [{"name": "w", "shape": [64], "changed": 8}],
        r"member 'w' is a uint8 array of shape \(1,\); a \[64\] mask packs into a 1-D uint8 array of 8 bytes",
    ),
    "unpacked booleans": (
        {"w": np.arange(64) < 8},
        [{"name": "w", "shape": [64], "changed": 8}],
        r"member 'w' is a bool array of shape \(64,\); a \[64\] mask packs into a 1-D uint8 array of 8 bytes",
    ),
    "2-D member": (
        {"w": EIGHT_OF_64.reshape(2, 4)},
        [{"name": "w", "shape": [8, 8], "changed": 8}],
        r"member 'w' is a uint8 array of shape \(2, 4\); a \[8, 8\] mask packs into a 1-D uint8 array of 8 bytes",
    ),
    "changed count not the bits'": (
        {"w": EIGHT_OF_64},
        [{"name": "w", "shape": [64], "changed": 2}],
        r"member 'w' has 8 changed elements \(set bits\), its metadata says 2",
    ),
    "padding bits set": (
        {"w": np.packbits(np.ones(64, bool))},  # 60 elements, 4 padding bits set
        [{"name": "w", "shape": [60], "changed": 60}],
        r"member 'w' sets padding bits after its 60 elements; they must be 0",
    ),
    "no shape": (
        {"w": EIGHT_OF_64},
        [{"name": "w", "changed": 8}],
        r"its metadata is not valid:\n  parameters\[0\] \('w'\) lacks \['shape'\]",
    ),
    "no changed": (
        {"w": EIGHT_OF_64},
        [{"name": "w", "shape": [64]}],
        r"its metadata is not valid:\n  parameters\[0\] \('w'\) lacks \['changed'\]",
    ),
    "changed above numel": (
        {"w": EIGHT_OF_64},
        [{"name": "w", "shape": [64], "changed": 65}],
        r"its metadata is not valid:\n  parameters\[0\] \('w'\): changed 65 is not an integer in \[0, 64\]",
    ),
    "negative size": (
        {"w": EIGHT_OF_64},
        [{"name": "w", "shape": [-64], "changed": 8}],
        r"its metadata is not valid:\n  parameters\[0\] \('w'\): shape \[-64\] is not a list of integers >= 0",
    ),
    "a name twice": (
        {"w": EIGHT_OF_64},
        [{"name": "w", "shape": [64], "changed": 8}, {"name": "w", "shape": [64], "changed": 8}],
        r"its metadata is not valid:\n  parameters\[1\]: name 'w' is not a string unique to one parameter",
    ),
    "parameters not a list": (
        {"w": EIGHT_OF_64},
        {"w": [64]},
        r"its metadata is not valid:\n  parameters is dict, expected a list",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_masks_file_that_contradicts_itself_is_refused_naming_file_member_and_expectation(tmp_path, capsys, case):
    members, parameters, message = BAD_FILES[case]
    shape = parameters[0].get("shape", [64]) if isinstance(parameters, list) else [64]
    shape = [abs(size) for size in shape]
    good = np.packbits(np.arange(np.prod(shape)) < 8, bitorder="big")  # a valid file of the same shape
    write_raw_masks_file(tmp_path / "good.npz", {"w": good}, [{"name": "w", "shape": shape, "changed": 8}])
    write_raw_masks_file(tmp_path / "bad.npz", members, parameters)
    with pytest.raises(ValueError, match=rf"'{tmp_path / 'bad.npz'}' is damaged: {message}"):
        overlap(tmp_path / "good.npz", tmp_path / "bad.npz")
    for files in (["good.npz", "bad.npz"], ["bad.npz", "good.npz"]):
        assert main([str(tmp_path / name) for name in files] + ["--json"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and "bad.npz' is damaged: " in err


def test_another_bit_order_is_refused(tmp_path):
    write_raw_masks_file(
        tmp_path / "little.npz", {"w": EIGHT_OF_64}, [{"name": "w", "shape": [64], "changed": 8}], bit_order="little"
    )
    with pytest.raises(
        ValueError, match=r"is damaged: its metadata is not valid:\n  bit_order is 'little', expected 'big'"
    ):
        MaskFile.open(tmp_path / "little.npz")


def test_reading_checks_every_access_and_unknown_names_are_a_key_error(tmp_path):
    write_raw_masks_file(tmp_path / "b.npz", {"w": EIGHT_OF_64}, [{"name": "w", "shape": [64], "changed": 2}])
    masks = MaskFile.open(tmp_path / "b.npz")  # the metadata alone is valid
    for read in (masks.packed, masks.unpacked, masks.read):
        with pytest.raises(ValueError, match="has 8 changed elements"):
            read("w")
    with pytest.raises(KeyError, match="has no parameter 'v'"):
        masks.unpacked("v")


def test_counts_of_a_valid_file_come_from_its_bits(tmp_path):
    write_raw_masks_file(tmp_path / "a.npz", {"w": EIGHT_OF_64}, [{"name": "w", "shape": [64], "changed": 8}])
    half = np.packbits(np.arange(64) % 2 == 0)  # 32 changed, 4 of them among A's 8
    write_raw_masks_file(tmp_path / "b.npz", {"w": half}, [{"name": "w", "shape": [64], "changed": 32}])
    packed, changed = MaskFile.open(tmp_path / "b.npz").read("w")
    assert changed == 32 and np.array_equal(packed, half)
    report = overlap(tmp_path / "a.npz", tmp_path / "b.npz")
    assert (report.changed_a, report.changed_b, report.intersection) == (8, 32, 4)
    assert (report.observed.overlap_a, report.observed.overlap_b, report.observed.iou) == (4 / 8, 4 / 32, 4 / 36)
