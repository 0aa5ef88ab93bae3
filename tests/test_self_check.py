"""self_check: one line when every check holds; otherwise an error naming each failed check and what to revisit."""

import numpy as np
import pytest
import torch

from qlora_lab.self_check import SelfCheckError, self_check


def test_all_true_prints_one_line(capsys):
    self_check("NF4 code", {"16 values": True, "numpy bool": np.bool_(True), "torch bool": bool(torch.tensor(1) == 1)},
               revisit="section 2")
    assert capsys.readouterr().out == "self-check 'NF4 code': all 3 checks passed\n"


def test_failed_checks_are_named_with_what_to_revisit():
    with pytest.raises(SelfCheckError) as info:
        self_check("NF4 code", {"16 values": True, "an exact zero": False, "sorted": False},
                   revisit="section 2: the quantiles")
    message = str(info.value)
    assert "2 of 3 checks failed" in message
    assert "an exact zero" in message and "sorted" in message and "16 values" not in message
    assert "Revisit section 2: the quantiles" in message
    assert isinstance(info.value, AssertionError)  # a failing self-check stops the notebook like an assert


def test_a_value_that_is_not_a_condition_is_refused():
    with pytest.raises(TypeError, match="'count' is a int"):
        self_check("x", {"count": 3}, revisit="section 1")
    with pytest.raises(TypeError, match="is a Tensor"):
        self_check("x", {"close": torch.tensor([True, True])}, revisit="section 1")


def test_no_checks_is_an_error():
    with pytest.raises(ValueError, match="no checks"):
        self_check("x", {}, revisit="section 1")
