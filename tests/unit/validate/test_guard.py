"""other_config:ipsec_skb_mark: every value/mask pair, decimal or hex; clear messages otherwise."""

from __future__ import annotations

import pytest

from ovs_ipsec.model import SkbMark
from ovs_ipsec.validate import parse_skb_mark


@pytest.mark.parametrize("text, mark", [
    ("0/1", SkbMark(0, 1)),
    ("1/1", SkbMark(1, 1)),
    (" 0x10/0xf0 ", SkbMark(0x10, 0xF0)),
    ("0X10/0XF0", SkbMark(0x10, 0xF0)),
    ("0/0", SkbMark(0, 0)),
    ("4294967295/0xffffffff", SkbMark(0xFFFFFFFF, 0xFFFFFFFF)),
    ("7", SkbMark(7, 0xFFFFFFFF)),
    ("08/0x18", SkbMark(8, 0x18)),  # a leading zero is still decimal, not octal
])
def test_valid_values(text, mark):
    assert parse_skb_mark(text) == mark


@pytest.mark.parametrize("text, message", [
    ("", "value '' is not a number"),
    ("0/x", "mask 'x' is not a number"),
    ("-1/1", "value '-1' is not a number"),
    ("1/1/1", "mask '1/1' is not a number"),
    ("0x1ffffffff/1", "value '0x1ffffffff' is not a number"),
    ("4294967296/1", "does not fit in 32 bits"),
    ("2/1", "value 0x2 has bits outside mask 0x1"),
    ("1.0/1", "is not a number"),
])
def test_malformed_values_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match="ipsec_skb_mark") as caught:
        parse_skb_mark(text)
    assert message in str(caught.value)


def test_canonical_form_is_decimal_when_small_and_hex_otherwise():
    assert [str(SkbMark(0, 1)), str(SkbMark(1, 1)), str(SkbMark(0x100, 0xFF00))] == ["0/1", "1/1", "0x100/0xff00"]
