"""Which tunnels stay encrypted: the valid ones, and the last good form of those that became invalid.

A mistake in an edit (a typo in a PSK option, a certificate file missing for a moment during a
copy, a malformed value) must not turn encryption off. Encryption stops only when the tunnel is
deleted or its IPsec options are removed: then the row is no longer an IPsec interface and
validation does not mention it at all. Pure: the previous pass's tunnels in, this pass's out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .model import Invalid, Tunnel, TunnelState, ValidatedState
from .text import shown


def keep_last_good(validated: ValidatedState, previous: Mapping[str, Tunnel], kept_before: Mapping[str, float],
                   now: float) -> ValidatedState:
    """`validated` with the previous form of each newly invalid tunnel kept in force.

    In the state returned, `tunnels` are the ones in force (valid, then kept), and `kept` says since
    when each kept tunnel's last good configuration has been kept. A kept tunnel keeps the traffic it
    claimed: a valid tunnel that now claims the same traffic is refused, as it would have been
    before the other one became invalid.
    """
    kept: dict[str, Tunnel] = {}
    for invalid in validated.invalid:
        if invalid.state is TunnelState.UNPROTECTED:
            continue  # moved to the userspace datapath: no kernel SA can encrypt it any more
        last_good = previous.get(invalid.name)
        if last_good is not None:
            kept[invalid.name] = last_good
    if not kept:
        return validated
    claimed = {(t.local_ip, t.remote_ip, t.selectors): t.name for t in kept.values()}
    valid: list[Tunnel] = []
    refused: list[Invalid] = []
    for tunnel in validated.tunnels:
        owner = claimed.get((tunnel.local_ip, tunnel.remote_ip, tunnel.selectors))
        if owner is None:
            valid.append(tunnel)
        else:
            refused.append(Invalid(tunnel.name, f"tunnel {shown(owner)} already encrypts the same traffic (its last "
                                   "good configuration is kept while it is invalid)", tunnel.type.value,
                                   tunnel.local_ip, tunnel.remote_ip, tunnel.auth))
    return replace(validated, tunnels=tuple(valid) + tuple(kept.values()), invalid=validated.invalid + tuple(refused),
                   kept={name: kept_before.get(name, now) for name in kept})
