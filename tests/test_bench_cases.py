"""The benchmark's cases compute what they claim: on CPU (reference kernels), each case's op, its unfused chain and
the eager expression Inductor is given agree, so a GPU table compares like with like."""

from __future__ import annotations

import pytest
import torch

from fusiontune.harness.bench_kernels import cases


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
            assert torch.equal(a.float(), b.float()), f"{case.name}: {name} differs from ours"
    assert case.bytes_moved(7, hidden, torch.bfloat16) > 0
