"""The benchmark's cases compute what they claim: on CPU (reference kernels), each case's op, its unfused chain and
the eager expression Inductor is given agree, so a GPU table compares like with like. The unfused chain gives our
op's bits; the expression of a norm case sums its squares in Inductor's order (``native_rms_norm``, as a serving
engine writes it), so it may land one rounding step of the output's dtype away."""

from __future__ import annotations

import pytest
import torch

from fusiontune.harness.bench_kernels import cases

# one rounding step of each output dtype, relative: what another summation order of the norm can move a value by
ONE_STEP = {torch.bfloat16: 2.0 ** -7, torch.float8_e4m3fn: 2.0 ** -3, torch.float32: 2.0 ** -20}


def flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in flat(r)]


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_case_peers_agree(case):
    hidden = next(h for h in (512, 2880) if case.applies_to(h))
    runs = {"ours": case.fused, "expression": case.expression, "unfused": case.unfused}
    results = {}
    for name, fn in runs.items():
        if fn is None:
            continue
        inputs = case.make_inputs(7, hidden, torch.bfloat16, seed=1, device="cpu")
        results[name] = flat(fn(inputs))
        if case.residual and name != "expression":  # our ops update the residual in place; the expression returns it
            results[name].append(inputs["residual"])
    reference = results.pop("ours")
    for name, got in results.items():
        assert len(got) == len(reference), name
        for a, b in zip(got, reference):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            if name == "expression" and "norm" in case.name:
                assert torch.allclose(a.float(), b.float(), rtol=ONE_STEP[a.dtype], atol=0), \
                    f"{case.name}: the expression differs from ours by more than one rounding"
            else:
                assert torch.equal(a.float(), b.float()), f"{case.name}: {name} differs from ours"
    read, written = case.traffic(7, hidden, torch.bfloat16)
    assert read > 0 and written > 0 and case.bytes_moved(7, hidden, torch.bfloat16) == read + written


def test_the_memory_limit_is_the_copy_for_a_balanced_kernel_and_lower_for_one_that_mostly_reads():
    """A kernel that reads as many bytes as it writes is held to the copy; one that reads 2 bytes per byte out
    (SiLU-and-mul) gets a shorter limit when reads run faster than a copy, and the same one when they do not."""
    from fusiontune.harness.bench_kernels import MemoryLimit

    memory = MemoryLimit(copy_gbs=4000.0, read_gbs=5000.0, ways={})
    balanced = memory.limit_us(10**9, 10**9)
    assert balanced == pytest.approx(2e9 / 4000.0 / 1e3)  # 2 GB at the copy's 4000 GB/s: 500 us
    mostly_reads = memory.limit_us(2 * 10**9, 10**9)
    assert mostly_reads < 3e9 / 4000.0 / 1e3
    assert mostly_reads == pytest.approx((2e9 / 5000.0 + 1e9 / memory.write_gbs) / 1e3)
    assert memory.percent(10**9, 10**9, balanced) == pytest.approx(100.0)
    flat = MemoryLimit(copy_gbs=4000.0, read_gbs=3900.0, ways={})  # a read no faster than a copy: the copy
    assert flat.limit_us(2 * 10**9, 10**9) == pytest.approx(3e9 / 4000.0 / 1e3)
