"""The desired side of a pass: OVSDB snapshot -> validated tunnels in force -> peerings.

Each step reuses what did not change: validation results per row (while the global configuration,
the certificate facts and the hour are the same), backend names per tunnel, and peerings per pair
of endpoints. So a change to one row among thousands validates one row and regroups one peering.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..inforce import keep_last_good
from ..model import DesiredState, InterfaceRow, Invalid, Tunnel, ValidatedState
from ..pki.inspect import CertificateInspector
from ..planner import Naming, Peering, group_peerings
from ..validate import CertificateFacts, certificate_paths, validate


class DesiredPeerings:
    def __init__(self, naming: Naming, inspector: CertificateInspector) -> None:
        self._inspector = inspector
        self._memo: dict[InterfaceRow, Tunnel | Invalid] = {}
        self._memo_context: object = None
        self.naming_cache = NamingCache(naming)
        self._grouped: dict[str, Tunnel] = {}  # the tunnels the current peerings were built from
        self._conflicts: tuple[Invalid, ...] = ()  # tunnels refused by group_peerings
        self.facts = CertificateFacts()
        self.validated = ValidatedState((), ())
        self.peerings: dict[str, Peering] = {}

    def update(self, desired: DesiredState, now: float) -> set[str]:
        """Validate the desired state; return the connections whose desired form changed.

        Certificate files are looked at again each time (the inspector re-reads a file only
        when its inode, size or mtime changed), which is how in-place rotation is noticed.
        """
        facts = self.facts = self._certificate_facts(desired)
        context = (desired.global_config, facts, int(now // 3600))  # hourly: expiry depends on time
        if context != self._memo_context:
            self._memo, self._memo_context = {}, context
        validated = validate(desired, facts, now, memo=self._memo)
        previous = self.validated
        validated = keep_last_good(validated, {t.name: t for t in previous.tunnels}, previous.kept, now)
        peerings, conflicts = self._regroup(validated.tunnels)
        if conflicts:
            clashing = {invalid.name for invalid in conflicts}
            validated = ValidatedState(tuple(t for t in validated.tunnels if t.name not in clashing),
                                       validated.invalid + conflicts, validated.global_problem, validated.guard,
                                       {name: since for name, since in validated.kept.items() if name not in clashing})
        changed = {name for name in peerings.keys() | self.peerings.keys()
                   if peerings.get(name) is not self.peerings.get(name)
                   and peerings.get(name) != self.peerings.get(name)}
        self.validated, self.peerings = validated, peerings
        return changed

    def unprotected_invalid(self) -> frozenset[str]:
        """Invalid tunnels with no configuration in force (for instance after a restart of the
        monitor): their connections in the IKE daemon must be left alone, not removed."""
        kept = self.validated.kept
        return frozenset(invalid.name for invalid in self.validated.invalid if invalid.name not in kept)

    def _regroup(self, tunnels: tuple[Tunnel, ...]) -> tuple[dict[str, Peering], tuple[Invalid, ...]]:
        """Group tunnels into peerings, redoing only the endpoints whose tunnels changed.

        Validation hands back the very same Tunnel object for an unchanged row, so a change to
        one tunnel among thousands regroups one endpoint pair and reuses every other Peering.
        """
        current = {tunnel.name: tunnel for tunnel in tunnels}
        previous = self._grouped
        touched = {(t.local_ip, t.remote_ip) for name in current.keys() | previous.keys()
                   if current.get(name) is not previous.get(name)
                   for t in (current.get(name), previous.get(name)) if t is not None}
        self._grouped = current
        self.naming_cache.prune(current.values())
        if not touched:
            return self.peerings, self._conflicts
        regrouped, conflicts = group_peerings([t for t in tunnels if (t.local_ip, t.remote_ip) in touched],
                                              self.naming_cache.naming)
        peerings = {name: peering for name, peering in self.peerings.items()
                    if (peering.tunnels[0].local_ip, peering.tunnels[0].remote_ip) not in touched}
        peerings.update(regrouped)
        self._conflicts = tuple(c for c in self._conflicts if (c.local_ip, c.remote_ip) not in touched) + conflicts
        return peerings, self._conflicts

    def _certificate_facts(self, desired: DesiredState) -> CertificateFacts:
        certs, keys, chains = certificate_paths(desired)
        self._inspector.retain(certs | keys)  # the cache holds only the files in use
        return CertificateFacts(
            certs={path: self._inspector.cert(path) for path in certs},
            keys={path: self._inspector.key(path) for path in keys},
            chains={pair: self._inspector.verify_chain(*pair) for pair in chains},
        )


class NamingCache:
    """Backend names per tunnel, computed once per distinct tunnel.

    Names are digests of the rendered parameters; recomputing them for every tunnel on every
    OVSDB change would make a one-tunnel change cost O(N) hashes. Tunnels are frozen, so a
    tunnel seen before has the same names. Keyed by identity (validation reuses the Tunnel object
    of an unchanged row): hashing every field of thousands of tunnels would cost more than it saves.
    """

    def __init__(self, naming: Naming) -> None:
        self._naming = naming
        self._names: dict[int, tuple[Tunnel, tuple[str, str | None, tuple[str, ...]]]] = {}
        self.naming = Naming(conn_name=lambda t: self.names(t)[0], secret_id=lambda t: self.names(t)[1],
                             child_names=lambda t: self.names(t)[2], child_owner=naming.child_owner)

    def names(self, tunnel: Tunnel) -> tuple[str, str | None, tuple[str, ...]]:
        entry = self._names.get(id(tunnel))
        if entry is None or entry[0] is not tunnel:
            entry = (tunnel, (self._naming.conn_name(tunnel), self._naming.secret_id(tunnel),
                              self._naming.child_names(tunnel)))
            self._names[id(tunnel)] = entry
        return entry[1]

    def prune(self, current: Iterable[Tunnel]) -> None:
        """Forget tunnels that are gone, once the cache has grown well past the current set."""
        current = list(current)
        if len(self._names) > 2 * len(current) + 64:
            self._names = {id(t): self._names[id(t)] for t in current
                           if id(t) in self._names and self._names[id(t)][0] is t}
