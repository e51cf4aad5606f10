"""Hostile pluto event hints and log lines: what reaches the monitor from `ovs-appctl ipsec/lsw-event`
(anyone who can reach its socket) and from pluto's log (names an operator wrote into ipsec.d, or
pluto's own text around them). Only a name that full-matches our naming may mark a peering, and
what the monitor logs about a hint is one printable line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ovs_ipsec.backends.libreswan.events import peering_of_hint, peerings_named
from ovs_ipsec.backends.libreswan.render import PEERING_NAME, split_name

OURS = st.from_regex(PEERING_NAME, fullmatch=True)
CHILD = st.sampled_from(["ike", "gnv0-in-0a1b2c", "tun_1-out-ffffff", "g.r@e-gre-000000"])
HOSTILE = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["\n", "\r", "\x1b[31m", ";reboot", "$(id)", "`id`", "../../etc/passwd", '"', "\x00", " ", "%s", "-ike"])
ANY_NAME = st.one_of(st.builds(lambda conn, child: f"{conn}_{child}", OURS, CHILD),
                     st.builds(lambda conn, child, junk: f"{conn}_{child}{junk}", OURS, CHILD, HOSTILE),
                     st.builds(lambda junk, conn: f"{junk}{conn}_ike", HOSTILE, OURS), HOSTILE)


@given(argv=st.lists(ANY_NAME | HOSTILE, max_size=4))
def test_a_hint_marks_only_a_peering_of_ours_and_is_logged_as_one_printable_line(count, argv):
    count("lsw-event")
    peering, message = peering_of_hint(argv)
    assert message.isprintable() and "\n" not in message
    if peering is not None:
        parts = split_name(argv[0])
        assert parts is not None and parts[0] == peering and PEERING_NAME.fullmatch(peering)


@given(names=st.lists(ANY_NAME, max_size=6), junk=st.lists(HOSTILE, max_size=4), serial=st.integers(1, 10**6))
def test_only_state_lines_naming_our_connections_mark_their_peerings(count, names, junk, serial):
    count("pluto-log")
    lines = [f'"{name}" #{serial}: STATE_V2_ESTABLISHED_IKE_SA'.encode(errors="surrogatepass")
             for name in names] + [text.encode(errors="surrogatepass") for text in junk]
    found = peerings_named(lines)
    expected = {parts[0] for name in names if (parts := split_name(name)) and '"' not in name
                and not any(char.isspace() for char in name)}
    assert all(PEERING_NAME.fullmatch(peering) for peering in found)
    assert expected <= found  # every well-formed state line of ours is heard
