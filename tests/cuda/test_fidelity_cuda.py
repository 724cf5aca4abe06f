"""The fidelity battery on a GPU: the graph and native engines against the plain loop, case by case."""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from test_fidelity import CASES, assert_same_weights, slow_path_reasons, train_case  # noqa: E402


@pytest.mark.parametrize("name", sorted(CASES))
def test_auto_on_cuda_equals_the_plain_loop_or_says_why_not(name):
    case = CASES[name]
    reference, _, _ = train_case(case, None, device="cuda")
    model, _, caught = train_case(case, "auto", device="cuda")
    reasons = slow_path_reasons(caught)
    if case.refused is None:
        assert model.hotloop_engine in ("graph", "native"), reasons
    else:
        assert model.hotloop_engine == "python"
        assert re.search(case.refused, reasons[-1]), reasons
    assert_same_weights(model, reference)
