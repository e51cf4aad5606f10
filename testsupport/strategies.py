"""Hostile OVSDB rows, as an attacker who can write OVSDB would craft them.

Values mix the well-formed (so that rows get through validation and reach the renderers) with
the characters that broke things before: newlines, U+2028, quotes, `%` scope ids, Unicode digits,
terminal escapes, NUL, bidirectional overrides, `#`, `=`, spaces.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ovs_ipsec.model import InterfaceRow

NASTY = ["\n", "\r", "\u2028", "\u2029", "\u0085", '"', "'", "\\", "#", "=", " ", "\t", "%", "\x00", "\x1b[2J",
         "\u202e", "²", "٣", "/", ";", ",", "{", "}", "$(", "`", "..", "@", ":", "!", "+", "\x7f", "\ufeff"]
TYPES = ["geneve", "vxlan", "gre", "ip6gre", "stt", "erspan", "internal", "", "geneve\n"]
IPV4 = [f"10.{a}.{b}.{c}" for a in (0, 1) for b in (0, 7) for c in (1, 2, 3)]
IPV6 = ["fd00::1", "fd00::2", "fe80::1", "fd00:10::2", "::ffff:10.0.0.2"]


def nasty_text(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A value close to `base`, with hostile characters put in, around or instead."""
    return st.one_of(
        base,
        st.builds(lambda b, n, at: b[:at] + n + b[at:], base, st.sampled_from(NASTY), st.integers(0, 40)),
        st.builds(lambda b, ns: b + "".join(ns), base, st.lists(st.sampled_from(NASTY), min_size=1, max_size=3)),
        st.text(min_size=0, max_size=24),
    )


addresses = nasty_text(st.sampled_from(IPV4 + IPV6)) | st.builds(
    lambda ip, scope: f"{ip}%{scope}", st.sampled_from(IPV6), st.text(max_size=30))
ports = st.one_of(st.integers(0, 70000).map(str), nasty_text(st.sampled_from(["4789", "6081", "7000", "500", "4500"])))
names = nasty_text(st.sampled_from(["gnv0", "vx1", "gre0", "ovn-ch2-0", "t.1@x:y+z-w"]))
psks = st.one_of(st.text(min_size=0, max_size=40), nasty_text(st.just("swordfish")))
durations = nasty_text(st.sampled_from(["30", "30s", "5m", "8h", "1d", "0"]))
proposals = nasty_text(st.sampled_from(["aes256gcm16-sha256-modp2048", "aes128-sha256,aes256gcm16",
                                        "aes_gcm256-sha2_256;modp2048", "aes256gcm16!"]))
option_keys = st.sampled_from([
    "ipsec_ike", "ipsec_esp", "ipsec_dpd-delay", "ipsec_dpd_delay", "ipsec_dpdtimeout", "ipsec_ikelifetime",
    "ipsec_salifetime", "ipsec_lifetime", "ipsec_rekeymargin", "ipsec_rekeyfuzz", "ipsec_replay-window",
    "ipsec_encapsulation", "ipsec_forceencaps", "ipsec_pfs", "ipsec_mobike", "ipsec_fragmentation",
    "ipsec_keyingtries", "ipsec_leftupdown", "ipsec_also", "ipsec_type", "ipsec_ikev2",
]) | nasty_text(st.just("ipsec_x"))
option_values = st.one_of(durations, proposals, nasty_text(st.sampled_from(["yes", "no", "true", "128", "%forever"])))


@st.composite
def interface_rows(draw) -> InterfaceRow:
    options: dict[str, str] = {}
    if draw(st.booleans()):
        options["local_ip"] = draw(addresses)
    options["remote_ip"] = draw(addresses)
    auth = draw(st.sampled_from(["psk", "psk", "psk", "remote_name", "remote_cert", "none"]))
    if auth == "psk":
        options["psk"] = draw(psks)
    elif auth == "remote_name":
        options["remote_name"] = draw(names)
    elif auth == "remote_cert":
        options["remote_cert"] = draw(nasty_text(st.sampled_from(["/etc/ipsec/peer.pem", "/proc/kmsg"])))
    if draw(st.booleans()):
        options["dst_port"] = draw(ports)
    for key, value in draw(st.lists(st.tuples(option_keys, option_values), max_size=4)):
        options[key] = value
    return InterfaceRow(draw(names), draw(st.sampled_from(TYPES)), tuple(sorted(options.items())))


def _unicast(address) -> bool:
    return not (address.is_unspecified or address.is_multicast)


# Rows that pass validation, with every field as odd as the rules allow: these are the ones whose
# rendered output the consumers' parsers must read exactly as meant.
valid_names = st.from_regex(r"[A-Za-z0-9_.:@+-]{1,40}", fullmatch=True)
valid_addresses = st.ip_addresses().filter(_unicast).map(str)
valid_psks = st.text(min_size=1, max_size=64).filter(lambda text: "\x00" not in text)
valid_options = st.dictionaries(st.sampled_from([
    "ipsec_ike", "ipsec_esp", "ipsec_dpddelay", "ipsec_ikelifetime", "ipsec_salifetime", "ipsec_replay-window",
    "ipsec_encapsulation", "ipsec_pfs", "ipsec_mobike", "ipsec_keyingtries", "ipsec_rekeyfuzz",
]), st.one_of(st.from_regex(r"[a-z0-9_]{1,12}(-[a-z0-9_]{1,12}){0,3}", fullmatch=True),
              st.from_regex(r"[0-9]{1,5}[smhd]?", fullmatch=True), st.sampled_from(["yes", "no", "true", "false"])),
    max_size=3)


@st.composite
def valid_rows(draw) -> InterfaceRow:
    remote = draw(valid_addresses)
    options = {"remote_ip": remote, "psk": draw(valid_psks), **draw(valid_options)}
    if draw(st.booleans()):
        family = st.ip_addresses(v=6 if ":" in remote else 4).filter(_unicast).map(str)
        options["local_ip"] = draw(family)
    if draw(st.booleans()):
        options["dst_port"] = str(draw(st.integers(1, 65535)))
    return InterfaceRow(draw(valid_names), draw(st.sampled_from(["geneve", "vxlan", "gre", "stt"])),
                        tuple(sorted(options.items())))


rows = st.lists(st.one_of(valid_rows(), valid_rows(), interface_rows()), min_size=1, max_size=6,
                unique_by=lambda r: r.name)
skb_marks = st.one_of(st.none(), nasty_text(st.sampled_from(["0/1", "1/1", "0x2/0x2", "0x10/0x10", "7"])))
