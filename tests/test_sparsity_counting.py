"""Bit-exact counting: hand-computed cases, the fused Triton kernel against the torch path, streamed snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from lightning_power.distributed import ShardLayout, shard_layout
from lightning_power.sparsity import counting, fused
from lightning_power.sparsity.checker import UpdateChecker
from lightning_power.sparsity.counting import CHANGED, CHANGED_EXACT, CHANGED_SINCE_LAST, NAN, Piece

NAN_BITS_F32 = 0x7FC00000
SPECIALS = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40, 1.0, 1.0 + 2**-23, 3.0e38]


def counts_of(current, reference, last=None, compare_as=None, atol=0.0):
    """Counts of one flat parameter through the torch path."""
    counts = torch.zeros(1, counting.N_COLUMNS, dtype=torch.int64)
    pieces = [Piece(0, 0, 0, current.numel())]
    counting.count_pieces([current], pieces, reference, last, counts, compare_as=compare_as, atol=atol)
    return counts[0].tolist()


def test_bit_exact_rules_for_nan_signed_zero_subnormal_and_inf():
    before = torch.tensor([0.0, -0.0, 1.0, float("nan"), 1e-40, float("inf"), 2.0, 5.0])
    after = torch.tensor([-0.0, -0.0, 1.0, float("nan"), 2e-40, float("inf"), float("nan"), 5.0 + 2**-21])
    reference = counting.representation_bits(before, None).clone()
    changed, exact, since, nans = counts_of(after, reference)
    # +0 -> -0 changed (bits), same NaN unchanged, subnormal moved, NaN from 2.0 changed, 1-ulp move changed.
    assert (changed, exact, nans) == (4, 4, 2)
    # With a tolerance, +0/-0 and the subnormal move are within 1e-30; NaN never is.
    changed, exact, _, _ = counts_of(after, reference, atol=1e-30)
    assert (changed, exact) == (2, 4)


def test_bfloat16_cast_is_round_to_nearest_even_with_one_nan_pattern():
    values = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, float("nan"), -float("nan"), 1e-40, -0.0]).float()
    bits = counting.representation_bits(values, "bfloat16")
    assert bits.dtype == torch.int16
    # 1 + 2^-8 is a tie between 1.0 (even) and 1 + 2^-7; 1 + 3*2^-8 rounds up to 1 + 2^-6 (even).
    assert bits[0].item() == 0x3F80 and bits[1].item() == 0x3F82
    assert bits[2].item() == bits[3].item() == counting.BF16_CANONICAL_NAN
    assert bits[4].item() == torch.tensor(1e-40).to(torch.bfloat16).view(torch.int16).item() != 0  # subnormal kept
    assert bits[5].item() == -0x8000


def test_fp32_update_below_bfloat16_resolution():
    """An fp32 step smaller than half a bf16 ulp is a change in fp32 and no change in bf16 (the paper's caveat)."""
    weights = torch.tensor([1.0, 0.5, 2.0, 0.01])
    stepped = weights + torch.tensor([1e-3, 1e-3, 1e-3, 1e-3])  # half-ulp of bf16 at 1.0 is 2^-8 ~ 3.9e-3
    for compare_as, expected in ((None, 4), ("bfloat16", 1)):  # only 0.01 (ulp 6.1e-5) moves in bf16
        reference = counting.representation_bits(weights, compare_as).clone()
        assert counts_of(stepped, reference, compare_as=compare_as)[CHANGED] == expected


def test_float16_parameters_are_compared_as_their_bfloat16_casts():
    weights = torch.tensor([1.0, 0.5, 2.0, 0.01], dtype=torch.float16)
    stepped = weights + 1e-3  # a float16 step of about one ulp at 1.0, well below bfloat16's half-ulp
    assert counting.snapshot_dtype(torch.float16, "bfloat16") == torch.bfloat16
    bits = counting.representation_bits(stepped, "bfloat16")
    assert torch.equal(bits, stepped.to(torch.bfloat16).view(torch.int16))
    for compare_as, expected in ((None, 4), ("bfloat16", 1)):  # only 0.01 moves in bfloat16
        reference = counting.representation_bits(weights, compare_as).clone()
        assert counts_of(stepped, reference, compare_as=compare_as)[CHANGED] == expected


def test_since_last_refresh_and_tolerance_columns():
    start = torch.zeros(6)
    reference = counting.representation_bits(start, None).clone()
    last = reference.clone()
    step1 = torch.tensor([0.0, 1e-6, 1.0, 0.0, 0.0, 0.0])
    assert counts_of(step1, reference, last, atol=1e-5) == [1, 2, 1, 0]
    assert torch.equal(last, step1.view(torch.int32))  # refreshed to the bits of step 1
    step2 = torch.tensor([0.0, 1e-6, 1.0, 2.0, 0.0, 0.0])
    assert counts_of(step2, reference, last, atol=1e-5) == [2, 3, 1, 0]


def random_bits(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (every class: normal, subnormal, zero, inf, NaN), plus the specials."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(
        -(2 ** (8 * dtype.itemsize - 1)), 2 ** (8 * dtype.itemsize - 1), (n,), generator=generator, dtype=torch.int64
    ).to(counting.bits_dtype(dtype))
    values = bits.view(dtype).clone()
    specials = torch.tensor(SPECIALS).to(dtype)[:n]
    values[: len(specials)] = specials
    return values


def perturbed(values: torch.Tensor, seed: int) -> torch.Tensor:
    """A copy where a third of the elements moved by tiny or large steps and some became NaN, +-0 or subnormal."""
    generator = torch.Generator().manual_seed(seed)
    out = values.clone()
    pick = torch.rand(values.numel(), generator=generator)
    out[pick < 0.1] = (out[pick < 0.1].float() * (1 + 2**-9)).to(values.dtype)
    out[(pick >= 0.1) & (pick < 0.2)] = float("nan")
    out[(pick >= 0.2) & (pick < 0.25)] = -0.0
    out[(pick >= 0.25) & (pick < 0.3)] = 1e-41
    out[(pick >= 0.3) & (pick < 0.33)] += 1e-3
    return out


# Triton's interpreter must be chosen before Triton is first imported, so the kernel tests on CPU run in a subprocess
# (test_triton_kernel_on_cpu) that sets TRITON_INTERPRET=1; in the main process they skip.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs inside test_triton_kernel_on_cpu's subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this is the driver")
def test_triton_kernel_on_cpu():
    triton = pytest.importorskip("triton")
    if Version(triton.__version__) < Version("3.7"):
        pytest.skip("Triton < 3.7's interpreter calls int() on 1-element arrays, which NumPy 2.4 refuses")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "interpreted"]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1]
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout and " passed" in result.stdout, result.stdout[-2000:]


def fused_vs_torch(tensors, compare_as, atol, device, tile=fused.TILE):
    """Counts and refreshed snapshots from both paths, for several flat tensors of one dtype.

    Snapshot offsets are padded to 16 elements as in ``Layout`` (the aligned launch); the last tensor is a view at an
    odd offset (the scalar launch), and lengths that are not multiples of 16 leave tails.
    """
    dtype = tensors[0].dtype
    moved = [perturbed(t.cpu(), seed=i).to(device) for i, t in enumerate(tensors)]
    odd = torch.cat([torch.zeros(3, dtype=dtype), perturbed(tensors[-1].cpu(), seed=99)]).to(device)
    moved.append(odd[3:])  # same values region, 3 elements off alignment
    tensors = [*tensors, tensors[-1]]
    pieces, offset = [], 0
    for index, t in enumerate(tensors):
        pieces.append(Piece(index, 0, offset, t.numel()))
        offset += -(-t.numel() // 16) * 16
    reference = torch.zeros(
        offset, dtype=counting.bits_dtype(counting.snapshot_dtype(dtype, compare_as)), device=device
    )
    for piece, t in zip(pieces, tensors):
        window = slice(piece.snapshot_start, piece.snapshot_start + piece.length)
        reference[window] = counting.representation_bits(t, compare_as)
    results = []
    for use_fused in (False, True):
        last = reference.clone()
        counts = torch.zeros(len(tensors), counting.N_COLUMNS, dtype=torch.int64, device=device)
        if use_fused:
            plan = fused.Plan.build(moved, pieces, torch.device(device), tile=tile)
            assert plan.aligned.shape[1] > 0 and plan.unaligned.shape[1] > 0
            fused.count(plan, reference, last, counts, compare_as=compare_as, atol=atol)
        else:
            counting.count_pieces(moved, pieces, reference, last, counts, compare_as=compare_as, atol=atol)
        results.append((counts.cpu(), last.cpu()))
    return results


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("compare_as", "atol"), [(None, 0.0), ("bfloat16", 0.0), (None, 1e-3), ("bfloat16", 1e-5)])
def test_interpreted_kernel_matches_torch_path(dtype, compare_as, atol):
    # Sizes: empty, tiny, and over two tiles (small tiles here: the interpreter is slow) so a parameter spans programs.
    tile = 2 * fused.BLOCK
    tensors = [random_bits(n, dtype, seed=n) for n in (0, 37, 2 * tile + 1000)]
    (counts_torch, last_torch), (counts_fused, last_fused) = fused_vs_torch(tensors, compare_as, atol, "cpu", tile)
    assert torch.equal(counts_fused, counts_torch)
    assert torch.equal(last_fused, last_torch)
    assert counts_torch[2, NAN] > 0 and counts_torch[2, CHANGED_EXACT] > counts_torch[2, CHANGED] - 1


@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernel")
@pytest.mark.parametrize(
    ("cur", "snap", "has_last", "has_tol", "aligned"),
    [
        ("float32", "bfloat16", True, True, True),
        ("float32", "float32", True, False, True),
        ("bfloat16", "bfloat16", False, False, True),
        ("float16", "bfloat16", True, True, False),
    ],
)
def test_kernel_compiles_for_hopper(cur, snap, has_last, has_tol, aligned):
    """Compile (no GPU needed) for sm_90: catches what the interpreter accepts but the compiler does not, and checks
    that the aligned launch gets 16-byte vector loads."""
    triton = pytest.importorskip("triton", minversion="3.3")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    dtypes = {
        "float32": (tl.float32, "fp32", tl.int32, "i32"),
        "bfloat16": (tl.bfloat16, "bf16", tl.int16, "i16"),
        "float16": (tl.float16, "fp16", tl.int16, "i16"),
    }
    cur_tl, cur_name, _, _ = dtypes[cur]
    snap_tl, _, snap_bits, snap_name = dtypes[snap]
    signature = {
        "base": f"*{cur_name}",
        "table": "*i64",
        "n_programs": "i32",
        "reference": f"*{snap_name}",
        "last": f"*{snap_name}",
        "partial": "*i32",
        "tol": "fp32",
    }
    constants = {
        "CUR": cur_tl,
        "SNAP": snap_tl,
        "SNAP_BITS": snap_bits,
        "CAST": cur != snap,
        "HAS_LAST": has_last,
        "HAS_TOL": has_tol,
        "ALIGNED": aligned,
        "ALIGN": 16,
        "BLOCK": fused.BLOCK,
    }
    signature.update(dict.fromkeys(constants, "constexpr"))
    sixteen_byte_aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4, 5)}
    source = triton.compiler.ASTSource(
        fn=fused._count_kernel, signature=signature, constexprs=constants, attrs=sixteen_byte_aligned
    )
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": fused.NUM_WARPS}).asm["ptx"]
    assert ("ld.global.v4.b32" in ptx) == aligned


def two_parameter_layout(device="cpu") -> tuple[torch.nn.Module, ShardLayout]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 3)).to(device)
    return model, shard_layout(model)


def step_model(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator).to(p.device)
            p.add_(torch.where(noise > 1.0, noise * 1e-3, torch.zeros_like(noise)))


@pytest.mark.parametrize("compare_as", [None, "bfloat16"])
def test_streamed_snapshots_count_like_resident_ones(compare_as):
    """Chunk buffers that split parameters anywhere give the same counts and since-last snapshots."""
    model, layout = two_parameter_layout()
    cpu = torch.device("cpu")
    resident = UpdateChecker(layout, compare_as=compare_as, atol=0.0, since_last=True, snapshot_device=cpu)
    streamed = UpdateChecker(
        layout,
        compare_as=compare_as,
        atol=0.0,
        since_last=True,
        snapshot_device=torch.device("cpu"),
        streamed=True,
        chunk_bytes=4096,
    )
    assert len(streamed._segments) > 20  # many chunks, most of them across parameter boundaries
    for checker in (resident, streamed):
        checker.reference.capture(checker.local_tensors())
        checker.last.capture(checker.local_tensors())
    for seed in range(3):
        step_model(model, seed)
        assert torch.equal(streamed.count(), resident.count())
        assert all(torch.equal(a, b) for a, b in zip(streamed.last.buffers, resident.last.buffers))


@interpreted
def test_interpreted_checker_against_independent_reference():
    """The checker (fused kernel, streamed) against element-wise comparisons written out in the test."""
    model, layout = two_parameter_layout()
    before = [p.detach().clone() for p in model.parameters()]
    checker = UpdateChecker(
        layout,
        compare_as=None,
        atol=0.0,
        since_last=True,
        snapshot_device=torch.device("cpu"),
        fused_kernel=True,
        streamed=True,
        chunk_bytes=8192,
    )
    checker.reference.capture(checker.local_tensors())
    checker.last.capture(checker.local_tensors())
    step_model(model, 0)
    counts = checker.count()
    expected = [
        int((p.detach().view(torch.int32) != b.view(torch.int32)).sum()) for p, b in zip(model.parameters(), before)
    ]
    assert counts[:, CHANGED].tolist() == expected == counts[:, CHANGED_SINCE_LAST].tolist()
    assert 0 < sum(expected) < sum(p.numel() for p in before)


cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("compare_as", "atol"), [(None, 0.0), ("bfloat16", 0.0), ("bfloat16", 1e-5)])
def test_cuda_fused_kernel_matches_torch_path(dtype, compare_as, atol):
    tensors = [random_bits(n, dtype, seed=n).cuda() for n in (0, 5, 3 * fused.TILE + 17, 100_003)]
    (counts_torch, last_torch), (counts_fused, last_fused) = fused_vs_torch(tensors, compare_as, atol, "cuda")
    assert torch.equal(counts_fused, counts_torch)
    assert torch.equal(last_fused, last_torch)


@cuda
@pytest.mark.parametrize("compare_as", [None, "bfloat16"])
def test_cuda_streamed_cpu_snapshot_matches_device_snapshot(compare_as):
    model, layout = two_parameter_layout("cuda")
    on_device = UpdateChecker(
        layout, compare_as=compare_as, atol=0.0, since_last=True, snapshot_device=torch.device("cuda")
    )
    on_host = UpdateChecker(
        layout, compare_as=compare_as, atol=0.0, since_last=True, snapshot_device=torch.device("cpu"), chunk_bytes=4096
    )
    assert on_host.streamed and on_host.reference.buffers[0].is_pinned()
    for checker in (on_device, on_host):
        checker.reference.capture(checker.local_tensors())
        checker.last.capture(checker.local_tensors())
    for seed in range(3):
        step_model(model, seed)
        assert torch.equal(on_host.count().cpu(), on_device.count().cpu())
        torch.cuda.synchronize()
        assert all(torch.equal(a.cpu(), b) for a, b in zip(on_device.last.buffers, on_host.last.buffers))
