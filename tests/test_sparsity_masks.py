"""The masks file format, atomic writes, the layer rule and ``sparsity-overlap`` on masks with known intersections."""

from __future__ import annotations

import errno
import json
import math
import zipfile

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_power.files import atomic_write
from lightning_power.sparsity import UpdateSparsityMonitor, overlap
from lightning_power.sparsity.layers import group_by_layer, layer_of
from lightning_power.sparsity.masks import MaskFile, pack_bits, popcount
from lightning_power.sparsity.overlap import main
from lightning_power.sparsity.snapshot import Layout, Snapshot
from tests.helpers.masks import write_raw_masks_file


def write_masks_file(path, masks: dict[str, np.ndarray], **metadata) -> None:
    """A masks file of these boolean masks, written from the documented format alone (numpy.savez)."""
    parameters = [{"name": n, "shape": list(m.shape), "changed": int(m.sum())} for n, m in masks.items()]
    arrays = {n: np.packbits(m.reshape(-1), bitorder="big") for n, m in masks.items()}
    write_raw_masks_file(path, arrays, parameters, **metadata)


def mask(shape, changed_indices) -> np.ndarray:
    m = np.zeros(math.prod(shape), dtype=bool)
    m[list(changed_indices)] = True
    return m.reshape(shape)


def test_pack_bits_matches_numpy_and_popcount():
    bits = torch.rand(8 * 37, generator=torch.Generator().manual_seed(0)) > 0.6
    packed = pack_bits(bits).numpy()
    assert np.array_equal(packed, np.packbits(bits.numpy(), bitorder="big"))
    assert popcount(packed) == int(bits.sum())
    other = np.packbits(np.arange(8 * 37) % 3 == 0)
    assert popcount(packed, other) == int((bits.numpy() & (np.arange(8 * 37) % 3 == 0)).sum())


def test_overlap_with_known_intersection(tmp_path):
    # blocks.0 (100 elements): A changes 0..39, B changes 20..69 -> |A∩B| = 20.
    # head (12 elements, 3x4): A changes 0..5, B changes 3..11 -> |A∩B| = 3.
    a = {"blocks.0.w": mask((10, 10), range(0, 40)), "head.weight": mask((3, 4), range(0, 6))}
    b = {"blocks.0.w": mask((10, 10), range(20, 70)), "head.weight": mask((3, 4), range(3, 12))}
    write_masks_file(tmp_path / "a.npz", a)
    write_masks_file(tmp_path / "b.npz", b)
    report = overlap(tmp_path / "a.npz", tmp_path / "b.npz")
    n, size_a, size_b, both = 112, 46, 59, 23
    assert (report.numel, report.changed_a, report.changed_b, report.intersection) == (n, size_a, size_b, both)
    assert report.observed.overlap_a == pytest.approx(both / size_a)
    assert report.observed.overlap_b == pytest.approx(both / size_b)
    assert report.observed.iou == pytest.approx(both / (size_a + size_b - both))
    # Chance: global E|A∩B| = |A||B|/n; per layer sum |A_l||B_l|/n_l.
    assert report.chance_global.overlap_a == pytest.approx(size_b / n)
    assert report.chance_global.overlap_b == pytest.approx(size_a / n)
    expected = 40 * 50 / 100 + 6 * 9 / 12
    assert report.chance_per_layer.overlap_a == pytest.approx(expected / size_a)
    assert report.chance_per_layer.iou == pytest.approx(expected / (size_a + size_b - expected))
    assert report.layers["head"].intersection == 3 and report.layers["blocks.0"].observed.iou == pytest.approx(20 / 70)


def test_overlap_of_masks_that_list_the_parameters_in_different_orders(tmp_path):
    # Same model, modules declared in another order: B's counts must be matched to A's parameters by name.
    a = {"first.w": mask((4, 4), range(0, 16)), "second.w": mask((2, 4), [0])}
    b = {"second.w": mask((2, 4), [0, 1]), "first.w": mask((4, 4), range(0, 8))}
    write_masks_file(tmp_path / "a.npz", a)
    write_masks_file(tmp_path / "b.npz", b)
    report = overlap(tmp_path / "a.npz", tmp_path / "b.npz")
    first, second = report.layers["first"], report.layers["second"]
    assert (first.changed_a, first.changed_b, first.intersection) == (16, 8, 8)
    assert (second.changed_a, second.changed_b, second.intersection) == (1, 2, 1)
    assert (first.observed.overlap_b, second.observed.overlap_b) == (1.0, 0.5)
    assert report.chance_per_layer.overlap_a == pytest.approx((16 * 8 / 16 + 1 * 2 / 8) / 17)


def test_cli_prints_table_and_json(tmp_path, capsys):
    a = {"w": mask((4, 4), range(0, 8))}
    write_masks_file(tmp_path / "a.npz", a)
    write_masks_file(tmp_path / "b.npz", {"w": mask((4, 4), range(4, 16))})
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["intersection"] == 4 and report["observed"]["overlap_a"] == 0.5
    assert report["chance_global"]["overlap_a"] == 12 / 16
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    table = capsys.readouterr().out
    assert "|A∩B|/|A|" in table and "50.00%" in table and "75.00%" in table


def test_console_script_dispatches_to_the_overlap_tool(tmp_path, capsys):
    from lightning_power.cli import main as console

    write_masks_file(tmp_path / "a.npz", {"w": mask((4,), [0, 1])})
    assert console(["sparsity-overlap", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["observed"]["iou"] == 1.0


def test_empty_changed_set_reports_undefined_ratios(tmp_path):
    write_masks_file(tmp_path / "a.npz", {"w": mask((8,), [])})
    write_masks_file(tmp_path / "b.npz", {"w": mask((8,), [1, 2])})
    report = overlap(tmp_path / "a.npz", tmp_path / "b.npz")
    assert report.observed.overlap_a is None and report.observed.overlap_b == 0.0


def test_masks_of_another_model_are_a_clear_error(tmp_path, capsys):
    write_masks_file(tmp_path / "a.npz", {"w": mask((4, 4), [1]), "b": mask((4,), [0])})
    write_masks_file(tmp_path / "b.npz", {"w": mask((4, 5), [1]), "c": mask((4,), [0])})
    expected = r"(?s)different models.*'b' only in.*'c' only in.*'w': shape \[4, 4\] vs \[4, 5\]"
    with pytest.raises(ValueError, match=expected):
        overlap(tmp_path / "a.npz", tmp_path / "b.npz")
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 2
    assert "different models" in capsys.readouterr().err


def test_not_a_masks_file(tmp_path):
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for name in ("plain.npz", "text.npz", "missing.npz"):
        with pytest.raises(ValueError, match="is not an update-masks file"):
            MaskFile.open(tmp_path / name)


def test_masks_file_of_another_format_version_is_refused(tmp_path):
    write_masks_file(tmp_path / "v2.npz", {"w": mask((8,), [1])}, version=2)
    with pytest.raises(ValueError, match=r"has format 'lightning-power/update-masks' version 2; expected .* version 1"):
        MaskFile.open(tmp_path / "v2.npz")


def test_a_damaged_masks_file_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    write_masks_file(tmp_path / "a.npz", {"w": mask((64,), [1, 5]), "v": mask((8,), [0])})
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:  # the same archive, one listed parameter left out
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(tmp_path / "missing.npz", "w") as archive:
        for name, data in entries.items():
            if name != "v.npy":
                archive.writestr(name, data)
    with pytest.raises(ValueError, match=r"is damaged: its metadata lists parameters it does not hold: \['v'\]"):
        MaskFile.open(tmp_path / "missing.npz")
    damaged = bytearray((tmp_path / "a.npz").read_bytes())
    start = damaged.find(b"w.npy") + len(b"w.npy")  # inside w's local entry: flip a data byte, the CRC no longer fits
    damaged[start + 100] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(damaged))
    assert main([str(tmp_path / "crc.npz"), str(tmp_path / "a.npz")]) == 2
    assert "is damaged: cannot read 'w'" in capsys.readouterr().err


def test_different_settings_warn(tmp_path):
    write_masks_file(tmp_path / "a.npz", {"w": mask((8,), [1])})
    write_masks_file(tmp_path / "b.npz", {"w": mask((8,), [1])}, compare_as="bfloat16")
    with pytest.warns(UserWarning, match="different compare_as"):
        assert overlap(tmp_path / "a.npz", tmp_path / "b.npz").observed.iou == 1.0


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write '.*out.bin': \[Errno 28\] No space left"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_snapshot_file_of_another_layout_lists_the_differences(tmp_path):
    tensors = [torch.zeros(6), torch.ones(4)]
    snapshot = Snapshot(Layout.build(["a", "b"], tensors, [0, 0], None), torch.device("cpu"))
    snapshot.capture(tensors)
    snapshot.save(tmp_path / "s.pt", {"run_id": "x", "step": 3})
    other = Snapshot(Layout.build(["a", "c"], [torch.zeros(5), torch.ones(4)], [0, 0], None), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"(?s)missing parameter 'c'.*unexpected parameter 'b'.*'a': file has"):
        other.load(tmp_path / "s.pt", {"run_id": "x", "step": 3})
    same = Snapshot(snapshot.layout, torch.device("cpu"))
    with pytest.raises(ValueError, match="step: file has 3, expected 4"):
        same.load(tmp_path / "s.pt", {"run_id": "x", "step": 4})
    same.load(tmp_path / "s.pt", {"run_id": "x", "step": 3})
    assert all(torch.equal(x, y) for x, y in zip(same.buffers, snapshot.buffers))


def test_snapshot_file_with_the_parameters_in_another_order_is_refused(tmp_path):
    tensors = [torch.zeros(6), torch.ones(6)]
    snapshot = Snapshot(Layout.build(["a", "b"], tensors, [0, 0], None), torch.device("cpu"))
    snapshot.capture(tensors)
    snapshot.save(tmp_path / "s.pt", {"run_id": "x", "step": 3})
    swapped = Snapshot(Layout.build(["b", "a"], tensors, [0, 0], None), torch.device("cpu"))
    with pytest.raises(ValueError, match="parameters are in a different order"):
        swapped.load(tmp_path / "s.pt", {"run_id": "x", "step": 3})


def test_layer_rule():
    assert layer_of("blocks.3.attn.qkv.weight") == "blocks.3"
    assert layer_of("model.layers.12.mlp.w1") == "model.layers.12"
    assert layer_of("final_norm.weight") == "final_norm"
    assert layer_of("encoder.embed.weight") == "encoder.embed"
    assert layer_of("weight") == "weight"
    assert group_by_layer(["a.0.w", "b.w", "a.0.b", "a.1.w"]) == {"a.0": [0, 2], "b": [1], "a.1": [3]}


def test_a_submodule_called_module_gets_its_own_mask(tmp_path):
    """``block.module.weight`` (a user's attribute named ``module``) and ``block.weight`` are two members."""

    class Gated(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Module()
            self.block.module = nn.Linear(4, 4, bias=False)  # always changes
            self.block.weight = nn.Parameter(torch.ones(4), requires_grad=False)  # never changes

        def training_step(self, batch, batch_idx):
            return (self.block.module(torch.randn(8, 4)) * self.block.weight).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.block.module.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(range(2), batch_size=1)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[UpdateSparsityMonitor(every_n_steps=2, save_masks=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(Gated(), data)
    masks = MaskFile.open(next(tmp_path.rglob("masks-*.npz")))
    assert [(p["name"], p["shape"], p["changed"]) for p in masks.parameters] == [
        ("block.weight", [4], 0),
        ("block.module.weight", [4, 4], 16),
    ]
