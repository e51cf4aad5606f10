"""charon's VICI replies -> observed values. Pure: VICI values arrive as bytes, leave as str/int."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ...model import ObservedSA
from ..base import SaEvent
from ..naming import OWNER_PREFIX


def text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def owned_secrets(reply: Mapping) -> frozenset[str]:
    """Our shared secret ids from a get-shared reply ({"keys": [...]})."""
    names = (text(name) for name in reply.get("keys", ()))
    return frozenset(name for name in names if name.startswith(OWNER_PREFIX))


def owned_conns(list_conn_events: Iterable[Mapping]) -> dict[str, frozenset[str]]:
    """list-conns streams {conn name: {..., children: {child name: {...}}}}; keep ours."""
    conns = {}
    for event in list_conn_events:
        for name, details in event.items():
            name = text(name)
            if name.startswith(OWNER_PREFIX):
                conns[name] = frozenset(text(child) for child in (details.get("children") or {}))
    return conns


def ike_sas(list_sa_events: Iterable[Mapping]) -> dict[str, tuple[ObservedSA, ...]]:
    """list-sas streams one event per IKE SA: {conn name: {uniqueid, state, child-sas, ...}}."""
    by_conn: dict[str, list[ObservedSA]] = {}
    for event in list_sa_events:
        for name, details in event.items():
            name = text(name)
            if not name.startswith(OWNER_PREFIX):
                continue
            by_conn.setdefault(name, []).append(_ike_sa(name, details))
    return {name: tuple(sas) for name, sas in by_conn.items()}


def _ike_sa(name: str, details: Mapping) -> ObservedSA:
    children = details.get("child-sas", {}) or {}
    installed = tuple(sorted(text(child.get("name", b"")) for child in children.values()
                             if text(child.get("state", b"")) == "INSTALLED"))
    established = details.get("established")
    return ObservedSA(
        conn_name=name,
        unique_id=text(details.get("uniqueid", b"")),
        state=text(details.get("state", b"")),
        established_seconds=int(text(established)) if established is not None else None,
        installed_children=installed,
    )


def event_sas(kind: str, message: Mapping) -> tuple[SaEvent, ...]:
    """What an ike-updown or child-updown event says for certain about our IKE SAs. Its payload
    is the IKE SA as list-sas shows it, without its children (child-updown: with the one child
    only). An SA up, an SA gone, a child installed: each is whole in the event. A child going
    down and the rekey events are left to a look (two instances of one child can be installed
    during a rekey, and one going down does not say the other did)."""
    up = message.get("up") == b"yes"
    events = []
    for name, details in message.items():
        name = text(name)
        if not isinstance(details, Mapping) or not name.startswith(OWNER_PREFIX):
            continue
        unique_id = text(details.get("uniqueid", b""))
        if kind == "ike-updown":
            events.append(SaEvent(name, unique_id, up=_ike_sa(name, details) if up else None))
        elif kind == "child-updown" and up:
            for child in (details.get("child-sas") or {}).values():
                if text(child.get("state", b"")) == "INSTALLED":
                    events.append(SaEvent(name, unique_id, up=_ike_sa(name, details),
                                          installed_child=text(child.get("name", b""))))
    return tuple(events)


def event_conn_names(message: Mapping) -> frozenset[str]:
    """Connection names an ike-updown/child-updown/rekey event is about (the dict-valued keys)."""
    return frozenset(text(key) for key, value in message.items() if isinstance(value, Mapping))


def load_key_id(reply: Mapping) -> str | None:
    key_id = reply.get("id")
    return text(key_id) if key_id is not None else None
