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
from ..text import shown
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
    value = {"true": "yes", "false": "no"}.get(value, value)
    return parse.choice(value, key, ("yes", "no", "accept", "force"))


def _percent(value: str, key: str) -> int:
    return parse.number(value.removesuffix("%"), key, 0, 1000)


# Keyed by the option name with "-" and "_" removed.
SPECS: Mapping[str, _Spec] = {
    "ike": _Spec("ike", parse.proposals),
    "esp": _Spec("esp", parse.proposals),
    "phase2alg": _Spec("esp", parse.proposals),  # LibreSwan's older name for esp=
    "encapsulation": _Spec("forceencaps", parse.boolean),  # LibreSwan's name, and OVN's ipsec_encapsulation
    "forceencaps": _Spec("forceencaps", parse.boolean),
    "dpddelay": _Spec("dpd_delay", parse.duration),
    "dpdtimeout": _Spec("dpd_timeout", parse.duration),
    "ikelifetime": _Spec("ike_lifetime", parse.duration),
    "salifetime": _Spec("sa_lifetime", parse.duration),
    "lifetime": _Spec("sa_lifetime", parse.duration),
    "keylife": _Spec("sa_lifetime", parse.duration),
    "rekeymargin": _Spec("rekey_margin", parse.duration),
    "margintime": _Spec("rekey_margin", parse.duration),
    "rekeyfuzz": _Spec("rekey_fuzz", _percent),
    "replaywindow": _Spec("replay_window", lambda value, key: parse.number(value, key, 0, 2_147_483_647)),
    "pfs": _Spec("pfs", parse.boolean),
    "mobike": _Spec("mobike", parse.boolean),
    "fragmentation": _Spec("fragmentation", _fragmentation),
    "keyingtries": _Spec("keyingtries", _keyingtries),
}

# Keys with a meaning that this monitor decides itself; setting them changes nothing.
_DECIDED_HERE = {
    "ikev2": "this monitor always uses IKEv2",
    "keyexchange": "this monitor always uses IKEv2",
    "type": "tunnels are always encrypted in transport mode",
    "auto": "the monitor decides which end initiates",
    "authby": "the authentication method follows options psk, remote_cert and remote_name",
}


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
            why = _DECIDED_HERE.get(lookup or "", "not an option this monitor applies")
            ignored.append((shown(key, 64)[1:-1], why))
            continue
        parsed = spec.parse(value, key)
        if spec.field in chosen and chosen[spec.field][1] != parsed:
            raise Reject(f"options '{chosen[spec.field][0]}' and '{key}' set the same thing differently")
        chosen[spec.field] = (key, parsed)
    return IkeOptions(**{field: value for field, (_key, value) in chosen.items()}, ignored=tuple(ignored))
