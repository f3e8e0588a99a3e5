import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_power.demo import GPT, ByteCorpus
from lightning_power.demo import data as data_module
from lightning_power.demo.data import ByteWindows, ResumableShuffleSampler, read_split, stdlib_source_files
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
    """DataLoader workers read the sampler as soon as the iterator exists, before Lightning sets the next epoch."""
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


def test_a_checkpoint_saved_after_a_step_records_that_steps_batch_as_consumed(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(GPT(**TINY_MODEL), ByteCorpus(**TINY_DATA))
    saved = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)["ByteCorpus"]
    assert saved == {"epoch": 0, "batches": 2, "batch_size": 8, "world_size": 1}  # resumes at the 3rd batch
