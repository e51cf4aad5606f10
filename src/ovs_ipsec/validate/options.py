"""A tunnel's `options:ipsec_*` keys -> typed IKE options, and the keys that have no effect here.

Upstream appended every `ipsec_<key>=<value>` verbatim to the IKE daemon's configuration (a
newline in a value injected directives), and OVN copies every NB_Global `options:ipsec_*` onto
every tunnel. So: a known key's value is parsed strictly into a typed field, and a malformed value
makes the tunnel invalid; an unknown key never does (one option set cluster-wide must not tear
down every tunnel), it is reported as ignored and never reaches the IKE daemon.

Key spellings differ between daemons and deployments (`dpd_delay`, `dpd-delay`, `dpddelay`), so a
key is looked up with `-` and `_` removed; two spellings of one option must agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..model import IkeOptions
from ..text import printable, shown
from . import fields as parse
from .fields import Reject

PREFIX = "ipsec_"
_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
FOREVER = 0  # keyingtries: retry without end


@dataclass(frozen=True)
class _Spec:
    field: str
    parse: Callable[[str, str], Any]


def _keyingtries(value: str, key: str) -> int:
    return FOREVER if value == "%forever" else parse.number(value, key, 0, 1000)


def _fragmentation(value: str, key: str) -> str:
    value = {"true": "yes", "false": "no", "never": "no", "insist": "force"}.get(value, value)
    return parse.choice(value, key, ("yes", "no", "accept", "force"))


def _esn(value: str, key: str) -> str:
    value = {"true": "yes", "false": "no"}.get(value, value)
    return parse.choice(value, key, ("yes", "no", "either"))


def _percent(value: str, key: str) -> int:
    return parse.number(value.removesuffix("%"), key, 0, 1000)


def _lifetime(value: str, key: str) -> int:
    seconds = parse.duration(value, key)
    if not 60 <= seconds <= 86400 * 7:
        raise Reject(f"option '{key}' has an invalid value {shown(value)} (a lifetime from 1m to 7d)")
    return seconds


def _window(value: str, key: str) -> int:
    return parse.number(value, key, 0, 2_147_483_647)


# Options this monitor applies, translated for each IKE daemon (backends/*/render.py), keyed by
# the name with "-" and "_" removed. Names and their spellings: ipsec.conf(5) of strongSwan 5.9
# and LibreSwan 4.10-5.3, and what OVN and upstream documentation use (README: "ipsec_* options").
SPECS: Mapping[str, _Spec] = {
    "ike": _Spec("ike", parse.proposals),
    "esp": _Spec("esp", parse.proposals),
    "phase2alg": _Spec("esp", parse.proposals),  # LibreSwan's older name for esp=
    "pfs": _Spec("pfs", parse.boolean),
    "esn": _Spec("esn", _esn),
    "encapsulation": _Spec("forceencaps", parse.boolean),  # LibreSwan's name, and OVN's ipsec_encapsulation
    "forceencaps": _Spec("forceencaps", parse.boolean),
    "dpddelay": _Spec("dpd_delay", parse.duration),
    "dpdtimeout": _Spec("dpd_timeout", parse.duration),
    "ikev1dpdtimeout": _Spec("dpd_timeout", parse.duration),
    "retransmittimeout": _Spec("retransmit_timeout", parse.duration),
    "ikelifetime": _Spec("ike_lifetime", _lifetime),
    "salifetime": _Spec("sa_lifetime", _lifetime),
    "lifetime": _Spec("sa_lifetime", _lifetime),
    "keylife": _Spec("sa_lifetime", _lifetime),
    "ipseclifetime": _Spec("sa_lifetime", _lifetime),
    "rekeymargin": _Spec("rekey_margin", parse.duration),
    "margintime": _Spec("rekey_margin", parse.duration),
    "rekeyfuzz": _Spec("rekey_fuzz", _percent),
    "replaywindow": _Spec("replay_window", _window),
    "natkeepalive": _Spec("nat_keepalive", parse.boolean),
    "mobike": _Spec("mobike", parse.boolean),
    "fragmentation": _Spec("fragmentation", _fragmentation),
    "keyingtries": _Spec("keyingtries", _keyingtries),
}

# Options whose meaning this monitor decides itself, or that would weaken or bypass the
# encryption it promises: never applied, whatever their value, and said so in status.
_DECIDED_HERE = {
    "ikev2": "this monitor always uses IKEv2",
    "keyexchange": "this monitor always uses IKEv2",
    "type": "refused: tunnels are always encrypted in transport mode",
    "auto": "refused: the monitor decides which end initiates (it never lets traffic out before an SA)",
    "authby": "refused: the authentication method follows options psk, remote_cert and remote_name",
    "dpdaction": "the monitor keeps a dead peer's policies in place (trap), so nothing leaves unencrypted",
    "also": "refused: would pull settings from another section",
    "include": "refused: would read another file",
    "installpolicy": "refused: without policies tunnel traffic would leave unencrypted",
    "failureshunt": "refused: a shunt could let traffic out unencrypted while negotiation fails",
    "negotiationshunt": "refused: a shunt could let traffic out unencrypted while negotiating",
    "ah": "refused: AH does not encrypt",
    "phase2": "refused: the monitor always uses ESP",
    "aggressive": "refused: IKEv1 aggressive mode",
    "aggrmode": "refused: IKEv1 aggressive mode",
    "reqid": "refused: fixed reqids collide between tunnels",
    "priority": "refused: policy priorities are the monitor's and the plaintext guard's",
    "requireidoncertificate": "refused: would weaken the check of the peer's identity",
    "connalias": "refused", "seclabel": "refused", "policylabel": "refused",
    "hostaddrfamily": "derived from the tunnel's addresses", "clientaddrfamily": "derived from the tunnel's addresses",
}
# Prefixes of option families that change endpoints, selectors, identities, marks or interfaces,
# or run commands (updown scripts run as root): refused.
_REFUSED_PREFIXES = {
    "left": "refused: endpoints, selectors and identities come from the tunnel's own options",
    "right": "refused: endpoints, selectors and identities come from the tunnel's own options",
    "updown": "refused: would run a command as root",
    "mark": "refused: marks belong to the plaintext guard (other_config:ipsec_skb_mark)",
    "vti": "refused: route-based (tunnel mode) settings",
    "ipsecinterface": "refused: route-based (tunnel mode) settings",
    "interfaceip": "refused: route-based (tunnel mode) settings",
    "iptfs": "refused: IP-TFS needs tunnel mode",
    "xauth": "refused: remote-access setting", "modecfg": "refused: remote-access setting",
    "eap": "refused: remote-access setting", "aaa": "refused: remote-access setting",
}
NOT_APPLIED = "not an option this monitor applies"


def _why_ignored(lookup: str | None) -> str:
    if lookup is None:
        return NOT_APPLIED
    if lookup in _DECIDED_HERE:
        return _DECIDED_HERE[lookup]
    if "updown" in lookup:
        return _REFUSED_PREFIXES["updown"]
    return next((why for prefix, why in _REFUSED_PREFIXES.items() if lookup.startswith(prefix)), NOT_APPLIED)


def ike_options(options: Mapping[str, str]) -> IkeOptions:
    """Parse every `ipsec_*` key of one Interface's options; raises Reject for a malformed value."""
    chosen: dict[str, tuple[str, Any]] = {}  # field -> (key that set it, value)
    ignored: list[tuple[str, str]] = []
    for key, value in sorted(options.items()):
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        lookup = name.replace("-", "").replace("_", "").lower() if _KEY.fullmatch(name) else None
        spec = SPECS.get(lookup) if lookup is not None else None
        if spec is None:
            ignored.append((printable(key[:64]), _why_ignored(lookup)))  # the key as set, shown escaped
            continue
        parsed = spec.parse(value, key)
        if spec.field in chosen and chosen[spec.field][1] != parsed:
            raise Reject(f"options '{chosen[spec.field][0]}' and '{key}' set the same thing differently")
        chosen[spec.field] = (key, parsed)
    margin = chosen.get("rekey_margin")
    for lifetime in (chosen.get("ike_lifetime"), chosen.get("sa_lifetime")):
        if margin is not None and lifetime is not None and margin[1] >= lifetime[1]:
            raise Reject(f"option '{margin[0]}' must be shorter than '{lifetime[0]}' (it says how long before "
                         "the end of a lifetime to rekey)")
    return IkeOptions(**{field: value for field, (_key, value) in chosen.items()}, ignored=tuple(ignored))
