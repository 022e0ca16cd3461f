"""The tolerance a fused config's output is held to against all-off (harness/correctness.py)."""

import torch

from fusiontune.harness.correctness import max_abs_error, tolerance


def test_tolerance_is_ulps_of_the_dtype_at_the_output_magnitude():
    eps = torch.finfo(torch.bfloat16).eps
    assert tolerance(torch.bfloat16, False, 3.0) == 4 * eps * 3.0
    assert tolerance(torch.bfloat16, True, 3.0) == 8 * eps * 3.0  # an FP8 code step in a later layer
    assert tolerance(torch.bfloat16, False, 0.01) == 4 * eps  # magnitudes below 1 count as 1


def test_tp_above_two_allows_the_all_reduce_summation_order():
    """TP = 2 sums two terms: one rounding in every implementation, no extra allowance. TP = N may round N - 1
    times where another implementation rounds once."""
    one = tolerance(torch.bfloat16, True, 2.0)
    assert tolerance(torch.bfloat16, True, 2.0, tp=2) == one
    assert tolerance(torch.bfloat16, True, 2.0, tp=4) == 3 * one
    assert tolerance(torch.bfloat16, True, 2.0, tp=8) == 7 * one


def test_max_abs_error_flags_shape_and_non_finite():
    a = torch.zeros(2, 3)
    assert max_abs_error(a, a) == 0.0
    assert max_abs_error(a, torch.zeros(3, 2)) == float("inf")
    assert max_abs_error(torch.full((2, 3), float("nan")), a) == float("inf")
    assert max_abs_error(a + 0.5, a) == 0.5


def test_an_op_that_rounds_once_more_gets_one_more_rounding_at_every_tp():
    """FlashInfer's fused all-reduce + norm normalises and scales in its own order: one rounding more than the
    chain, on top of the all-reduce's allowance."""
    one = tolerance(torch.bfloat16, True, 2.0)
    assert tolerance(torch.bfloat16, True, 2.0, tp=2, reordered=True) == 2 * one
    assert tolerance(torch.bfloat16, True, 2.0, tp=4, reordered=True) == 4 * one
