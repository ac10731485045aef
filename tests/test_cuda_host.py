"""The cuda backend's host-side integer helpers against Triton's own, which they replace in the
launch wrappers (:mod:`seahal.backends.cuda._host`)."""

from __future__ import annotations

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.backends.cuda._host import cdiv, next_power_of_2

VALUES = [*range(4100), 2**31 - 1, 2**31, 2**31 + 1, 2**40 - 1, 2**40 + 3]


def test_cdiv_is_tritons():
    for b in (1, 2, 3, 16, 64, 128, 1000):
        assert [cdiv(a, b) for a in VALUES] == [triton.cdiv(a, b) for a in VALUES], b


def test_next_power_of_2_is_tritons():
    assert [next_power_of_2(n) for n in VALUES] == [triton.next_power_of_2(n) for n in VALUES]
