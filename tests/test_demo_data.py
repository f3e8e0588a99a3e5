import os
import shutil
import sysconfig
import zlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_power.demo import GPT, ByteCorpus
from lightning_power.demo import data as data_module
from lightning_power.demo.data import (
    ByteWindows,
    ResumableShuffleSampler,
    read_split,
    stdlib_source_files,
    text_files,
)
from tests.helpers.tiny import TINY_DATA, TINY_MODEL


def _first_batches(corpus, n=3):
    iterator = iter(corpus.train_dataloader())
    return [next(iterator) for _ in range(n)]


def test_default_corpus_is_the_stdlib_without_site_packages():
    files = stdlib_source_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and len(files) > 100
    assert all(f.suffix == ".py" and stdlib in f.parents for f in files)
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)


def test_corpus_is_deterministic():
    a, b = ByteCorpus(**TINY_DATA), ByteCorpus(**TINY_DATA)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.train_set.data, b.train_set.data) and torch.equal(a.val_set.data, b.val_set.data)
    for (xa, ya), (xb, yb) in zip(_first_batches(a), _first_batches(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = _first_batches(a, 1)[0]
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one byte


def test_split_is_by_file(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text(f"file number {i} " * 50)
    corpus = ByteCorpus(str(tmp_path), context_length=8, batch_size=2, val_every=5)
    corpus.setup("fit")
    train, val = bytes(corpus.train_set.data.tolist()), bytes(corpus.val_set.data.tolist())
    for i in range(10):
        held_out = i % 5 == 0
        assert (f"file number {i} ".encode() in val) == held_out
        assert (f"file number {i} ".encode() in train) != held_out


def test_single_file_is_split_by_position_and_binary_files_are_skipped(tmp_path):
    text = tmp_path / "book.txt"
    text.write_bytes(bytes(range(32, 127)) * 40)
    corpus = ByteCorpus(str(text), context_length=8, batch_size=2, val_every=10)
    corpus.setup("fit")
    assert len(corpus.train_set.data) + len(corpus.val_set.data) == 95 * 40
    assert len(corpus.val_set.data) == 95 * 40 // 10

    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 500)
    (tmp_path / "notes.txt").write_bytes(b"plain text " * 100)
    folder = ByteCorpus(str(tmp_path), context_length=8, batch_size=2, val_every=2)
    folder.setup("fit")
    assert 0 not in folder.train_set.data.tolist() and 0 not in folder.val_set.data.tolist()


def test_bad_corpus_paths(tmp_path):
    with pytest.raises(ValueError, match="path .* does not exist"):
        ByteCorpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds too little text"):
        ByteCorpus(str(tmp_path / "empty")).setup("fit")
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        ByteCorpus(context_length=1)


def test_ranks_split_each_global_batch_and_resume_at_the_exact_sample():
    dataset = ByteWindows(bytes(range(256)) * 8, context_length=4)
    single = list(ResumableShuffleSampler(dataset, num_replicas=1, rank=0, seed=3))
    per_rank = [list(ResumableShuffleSampler(dataset, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    batch = 4  # global batch 8 = 2 ranks x 4
    for step in range(len(per_rank[0]) // batch):
        union = sorted(per_rank[0][step * batch : (step + 1) * batch] + per_rank[1][step * batch : (step + 1) * batch])
        assert union == sorted(single[step * 2 * batch : (step + 1) * 2 * batch])

    resumed = ResumableShuffleSampler(dataset, num_replicas=1, rank=0, seed=3)
    resumed.resume_at(epoch=0, skip=10)
    assert list(resumed) == single[10:] and len(resumed) == len(single)  # len: the whole epoch, as Lightning needs
    resumed.set_epoch(1)  # later epochs are whole again
    assert len(list(resumed)) == len(single)


def test_resume_on_fewer_processes_with_the_same_global_batch_continues_at_the_next_samples():
    corpus = ByteCorpus(**{**TINY_DATA, "batch_size": 8})  # no trainer: one process
    corpus.setup("fit")
    single = list(ResumableShuffleSampler(corpus.train_set, num_replicas=1, rank=0, seed=0))
    # Written by 2 processes x 4 sequences after 3 steps: 24 samples of the epoch's order are consumed.
    corpus.load_state_dict({"epoch": 0, "batches": 3, "batch_size": 4, "world_size": 2})
    inputs, _ = next(iter(corpus.train_dataloader()))
    expected = torch.stack([corpus.train_set[i][0] for i in single[24:32]])
    assert torch.equal(inputs, expected)


def test_a_checkpoint_after_an_epochs_last_batch_resumes_at_the_next_epochs_start():
    """DataLoader workers read the sampler as soon as the iterator exists, before Lightning sets the next epoch. The
    state is one from before ``epoch_done`` was saved: the whole epoch's length tells that the epoch was done."""
    corpus = ByteCorpus(**{**TINY_DATA, "batch_size": 8})
    corpus.setup("fit")
    batches_per_epoch = len(corpus.train_set) // 8
    corpus.load_state_dict({"epoch": 2, "batches": batches_per_epoch, "batch_size": 8, "world_size": 1})
    sampler = corpus.train_dataloader().sampler
    fresh = ResumableShuffleSampler(corpus.train_set, num_replicas=1, rank=0, seed=0)
    fresh.set_epoch(3)
    assert sampler.epoch == 3 and list(sampler) == list(fresh)


@pytest.mark.parametrize(("batch_size", "world_size"), [(4, 1), (8, 2)])
def test_resume_with_another_global_batch_is_refused(batch_size, world_size):
    corpus = ByteCorpus(**{**TINY_DATA, "batch_size": 8})
    corpus.setup("fit")
    corpus.load_state_dict({"epoch": 0, "batches": 3, "batch_size": batch_size, "world_size": world_size})
    with pytest.raises(
        ValueError,
        match=rf"changed global batch \(batch_size x processes\): {batch_size} x "
        rf"{world_size} -> 8 x 1",
    ):
        corpus.train_dataloader()


def test_a_single_file_gives_at_most_max_bytes_of_training_text(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(b"a line of text\n" * 6_000)  # 90 kB
    corpus = ByteCorpus(str(book), context_length=16, batch_size=2, max_bytes=5_000, max_val_bytes=20_000)
    corpus.setup("fit")
    assert len(corpus.train_set.data) == 5_000  # 25 kB read, 1/20 of it held out, the rest cut to max_bytes
    assert len(corpus.val_set.data) == 25_000 // 20


def test_a_file_larger_than_the_whole_file_limit_is_read_only_as_far_as_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "WHOLE_FILE_BYTES", 100)
    late_nul, early_nul = tmp_path / "late.txt", tmp_path / "early.txt"
    late_nul.write_bytes(b"x" * 900 + b"\x00" + b"y" * 99)  # binary only past what is read
    early_nul.write_bytes(b"x" * 10 + b"\x00" + b"y" * 989)
    assert read_split([late_nul], budget=50, seed=0) == b"x" * 50
    assert read_split([early_nul], budget=50, seed=0) == b""  # a NUL in the part read: binary, skipped


def test_every_epoch_draws_a_new_order():
    sampler = ResumableShuffleSampler(ByteWindows(bytes(range(256)) * 8, context_length=4), 1, 0, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize(("size", "windows"), [(64, 3), (65, 4), (16, 0), (17, 1)])
def test_every_window_has_a_full_context_of_inputs_and_targets(size, windows):
    dataset = ByteWindows(bytes(range(size)), context_length=16)
    assert len(dataset) == windows
    assert all(x.shape == y.shape == (16,) for x, y in (dataset[i] for i in range(len(dataset))))


def test_ranks_take_equally_many_distinct_samples_from_an_uneven_dataset():
    dataset = ByteWindows(bytes(7 * 4 + 1), context_length=4)  # 7 windows over 2 ranks
    samplers = [ResumableShuffleSampler(dataset, num_replicas=2, rank=r, seed=0) for r in (0, 1)]
    drawn = [list(sampler) for sampler in samplers]
    assert [len(d) for d in drawn] == [len(s) for s in samplers] == [3, 3]
    assert not set(drawn[0]) & set(drawn[1])


def test_too_little_text_for_one_batch_is_an_error(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(b"a line of text\n" * 20)  # 150 train bytes: 9 windows of 16
    with pytest.raises(ValueError, match="holds too little text .* for batch_size=10 windows of context_length=16"):
        ByteCorpus(str(book), context_length=16, batch_size=10, val_every=2).setup("fit")
    ByteCorpus(str(book), context_length=16, batch_size=9, val_every=2).setup("fit")


def test_max_val_bytes_caps_the_validation_part_of_a_single_file(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(b"a line of text\n" * 1_000)
    corpus = ByteCorpus(str(book), context_length=16, batch_size=2, max_bytes=8_000, max_val_bytes=100, val_every=2)
    corpus.setup("fit")
    assert len(corpus.val_set.data) == 100 and len(corpus.train_set.data) == 8_000


def test_a_small_budget_is_spread_over_the_corpus_not_its_first_files(tmp_path):
    files = []
    for i in range(20):
        files.append(tmp_path / f"f{i:02}.txt")
        files[-1].write_bytes(bytes([65 + i]) * 100)
    read = set()
    for seed in range(3):
        read |= set(read_split(files, budget=300, seed=seed)) - {ord("\n")}
    assert len(read) >= 6 and read != {65, 66, 67}


def test_a_small_file_with_a_nul_past_the_budget_is_skipped_as_binary(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 900 + b"\x00" + b"y" * 99)
    assert read_split([blob], budget=50, seed=0) == b""


def test_a_budget_filled_exactly_by_a_file_ends_the_read(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(name[0].encode() * 100)
    assert read_split(sorted(tmp_path.iterdir()), budget=100, seed=0) in (b"a" * 100, b"b" * 100)


@pytest.mark.parametrize("name", ["batch_size", "max_bytes", "max_val_bytes"])
def test_a_zero_size_is_refused(name):
    with pytest.raises(ValueError, match=rf"{name} must be > 0, got 0"):
        ByteCorpus(**{name: 0})


@pytest.mark.parametrize("val_every", [0, 1])
def test_val_every_below_2_is_refused(val_every):
    with pytest.raises(ValueError, match=rf"val_every must be >= 2, got {val_every}"):
        ByteCorpus(val_every=val_every)


def test_setup_reads_the_corpus_once(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(b"a line of text\n" * 100)
    corpus = ByteCorpus(str(book), context_length=16, batch_size=2)
    corpus.setup("fit")
    train = corpus.train_set
    book.write_bytes(b"other text\n" * 100)  # a later validate or test keeps the split the fit used
    corpus.setup("validate")
    assert corpus.train_set is train
    assert b"other" not in bytes(corpus.train_set.data.tolist()) + bytes(corpus.val_set.data.tolist())


def checkpointing_trainer(checkpoint: ModelCheckpoint) -> pl.Trainer:
    """3 CPU steps without validation or logs, checkpointed by ``checkpoint``."""
    return pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
    )


def test_a_checkpoint_saved_after_a_step_records_that_steps_batch_as_consumed(tmp_path):
    trainer = checkpointing_trainer(ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1))
    corpus = ByteCorpus(**TINY_DATA)
    trainer.fit(GPT(**TINY_MODEL), corpus)
    saved = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)["ByteCorpus"]
    train_text = bytes(corpus.train_set.data.tolist())
    assert saved == {
        "epoch": 0,
        "batches": 2,  # resumes at the 3rd batch
        "epoch_done": False,
        "batch_size": 8,
        "data_parallel_size": 1,
        "seed": 0,
        "context_length": 16,
        "train_windows": (len(train_text) - 1) // 16,
        "train_crc32": zlib.crc32(train_text),
    }


class RecordInputs(pl.Callback):
    def __init__(self):
        self.inputs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].clone())


def _fit(root, corpus, max_steps, checkpoint_every, ckpt_path=None, **trainer_args):
    """Fit the tiny GPT on ``corpus``, with a checkpoint every ``checkpoint_every`` steps; the inputs of each step."""
    record = RecordInputs()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, ModelCheckpoint(root, every_n_train_steps=checkpoint_every, save_top_k=-1)],
        **trainer_args,
    )
    trainer.fit(GPT(**TINY_MODEL), corpus, ckpt_path=ckpt_path)
    return record.inputs


def _epoch_batches(data, epoch):
    """The batches of ``epoch`` of a one-process ByteCorpus(**data), from the sampler's order."""
    corpus = ByteCorpus(**data)
    corpus.setup("fit")
    sampler = ResumableShuffleSampler(corpus.train_set, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(epoch)
    batches = torch.tensor(list(sampler)).split(data["batch_size"])
    return [torch.stack([corpus.train_set[i][0] for i in batch]) for batch in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resume_at_the_end_of_a_limited_epoch_draws_the_next_epochs_order(tmp_path, num_workers):
    """The epoch ends where ``limit_train_batches`` ends it, not where the sampler's whole epoch would."""
    data = {**TINY_DATA, "num_workers": num_workers}
    whole = _fit(tmp_path / "whole", ByteCorpus(**data), 6, 3, limit_train_batches=3)
    _fit(tmp_path / "cut", ByteCorpus(**data), 3, 3, limit_train_batches=3)
    checkpoint = tmp_path / "cut" / "epoch=0-step=3.ckpt"
    resumed = _fit(tmp_path / "cut", ByteCorpus(**data), 6, 3, ckpt_path=checkpoint, limit_train_batches=3)
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(resumed, _epoch_batches(data, epoch=1)))
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[3:]))


def test_an_epoch_end_checkpoint_resumes_with_another_global_batch_at_the_next_epochs_start(tmp_path):
    data = {**TINY_DATA, "max_bytes": 700}  # 43 windows: epochs of 5 batches of 8
    _fit(tmp_path, ByteCorpus(**data), 5, 5)
    smaller = {**data, "batch_size": 4}
    resumed = _fit(tmp_path, ByteCorpus(**smaller), 7, 5, ckpt_path=tmp_path / "epoch=0-step=5.ckpt")
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, _epoch_batches(smaller, epoch=1)))


def test_a_binary_file_beside_a_single_text_file_leaves_the_split_by_position(tmp_path):
    (tmp_path / "input.txt").write_bytes(bytes(range(32, 127)) * 40)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))  # sorts first: it took validation
    corpus = ByteCorpus(str(tmp_path), context_length=8, batch_size=2, val_every=10)
    corpus.setup("fit")
    assert len(corpus.train_set.data) == 95 * 40 - 95 * 4 and len(corpus.val_set.data) == 95 * 4


def test_a_corpus_of_binary_files_only_says_so(tmp_path):
    (tmp_path / "utf16.txt").write_bytes(("some text " * 500).encode("utf-16"))
    with pytest.raises(ValueError, match=r"holds no text: its 1 file\(s\) all hold NUL bytes .* UTF-16"):
        ByteCorpus(str(tmp_path), context_length=8, batch_size=2).setup("fit")


def test_only_regular_files_and_links_to_them_are_read(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_bytes(name[0].encode() * 3000)
    (tmp_path / "to_a.txt").symlink_to(tmp_path / "a.txt")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    os.mkfifo(tmp_path / "pipe")  # reading it would block
    assert text_files(tmp_path) == [tmp_path / name for name in ("a.txt", "b.txt", "c.txt", "to_a.txt")]
    assert text_files(tmp_path / "pipe") == []
    corpus = ByteCorpus(str(tmp_path), context_length=8, batch_size=2, val_every=2)
    corpus.setup("fit")
    assert set(corpus.train_set.data.tolist()) == {ord("b"), ord("\n"), ord("a")}  # b.txt and to_a.txt


@pytest.fixture(scope="module")
def saved_mid_epoch(tmp_path_factory):
    """A book and the ByteCorpus state of a checkpoint written 2 steps into a fit on it."""
    root = tmp_path_factory.mktemp("book")
    (root / "book.txt").write_bytes(b"a line of text\n" * 6_000)
    trainer = checkpointing_trainer(ModelCheckpoint(root, every_n_train_steps=2))
    trainer.fit(GPT(**TINY_MODEL), ByteCorpus(str(root / "book.txt"), **BOOK_DATA))
    return root / "book.txt", torch.load(root / "epoch=0-step=2.ckpt", weights_only=False)["ByteCorpus"]


BOOK_DATA = {"context_length": 16, "batch_size": 8, "max_bytes": 50_000}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, r"data.seed 0 in the checkpoint, 1 now"),
        ({"context_length": 32}, r"data.context_length 16 in the checkpoint, 32 now"),
        ({"max_bytes": 20_000}, r"number of training windows 3124 in the checkpoint, 1249 now.* data.max_bytes"),
        ({"text": b"A line of text\n"}, r"CRC-32 of the training text \d+ in the checkpoint, \d+ now.* the files"),
    ],
)
def test_a_resume_with_another_train_order_is_refused(saved_mid_epoch, tmp_path, change, message):
    book, saved = saved_mid_epoch
    other = tmp_path / "book.txt"
    other.write_bytes(change.pop("text", b"a line of text\n") * 6_000)  # the same size
    corpus = ByteCorpus(str(other), **{**BOOK_DATA, **change})
    corpus.setup("fit")
    corpus.load_state_dict(saved)
    with pytest.raises(ValueError, match=rf"cannot resume with another train order: {message}"):
        corpus.train_dataloader()


def test_a_resume_on_the_same_text_elsewhere_continues(saved_mid_epoch, tmp_path):
    book, saved = saved_mid_epoch
    shutil.copy(book, tmp_path / "moved.txt")
    corpus = ByteCorpus(str(tmp_path / "moved.txt"), **BOOK_DATA)
    corpus.setup("fit")
    corpus.load_state_dict(saved)
    assert list(corpus.train_dataloader().sampler) == list(ResumableShuffleSampler(corpus.train_set, 1, 0, 0))[16:]
