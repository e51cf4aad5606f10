"""The desired side of a pass: OVSDB snapshot -> validated tunnels in force -> peerings, on what changed.

The whole-state rules are `validate` (each row, then clashing claims), `keep_last_good` and
`group_peerings`. Every interaction between tunnels in those rules is between tunnels with the same
pair of endpoints (a claim covers addresses, protocol and port; a peering is one endpoint pair),
except that a tunnel kept at its last good configuration sits at that configuration's endpoints.
So an update here re-validates only the rows that changed, takes the names they concern, closes
that set over endpoint pairs (every name with a verdict or a tunnel in force at one of those pairs),
and runs the whole-state rules on that subset alone. A change to one row among thousands costs one
row and one endpoint pair; the result is what the whole-state rules give (tests/unit/daemon/
test_desired.py checks it against them on random edit sequences).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

from ..index import add_member, discard_member
from ..inforce import keep_last_good
from ..model import DesiredState, GlobalConfig, GuardConfig, InterfaceRow, Invalid, Tunnel, ValidatedState
from ..pki.inspect import CertificateInspector
from ..planner import Naming, Peering, group_peerings
from ..validate import CertificateFacts, is_ipsec_interface
from ..validate.certificates import global_certificate_paths, local_identity, remote_cert_path
from ..validate.guard import guard_for, traffic_of_row, uncovered_of_row
from ..validate.tunnels import settle_claims, validate_row

Summand = TypeVar("Summand")  # what one row adds to a sum over all rows
Endpoints = tuple[str | None, str]  # (local_ip, remote_ip): the unit every rule works within


class DesiredPeerings:
    def __init__(self, naming: Naming, inspector: CertificateInspector) -> None:
        self._inspector = inspector
        self.naming_cache = NamingCache(naming)
        self.facts = CertificateFacts()
        self.validated = ValidatedState((), ())
        self.peerings: dict[str, Peering] = {}
        # For status and planning, kept in step with `peerings` and `validated`:
        self.peering_of: dict[str, Peering] = {}  # tunnel name -> the peering that carries it
        self.secret_ids: Counter[str] = Counter()  # secret ids the peerings need
        # Tunnel names whose outcome (verdict, tunnel in force, peering) the last update recomputed.
        self.touched_names: frozenset[str] = frozenset()
        self._seen: DesiredState | None = None
        self._context: object = None
        # Per row (by key): the last verdict of each IPsec row, and what every row adds to the
        # inputs that are sums over all rows (the guard's traffic, the peer certificates in use).
        self._verdicts: dict[Hashable, tuple[InterfaceRow, Tunnel | Invalid]] = {}
        # The indexes below map to tuples, not sets: see index.py.
        self._keys_of: dict[str, tuple[Hashable, ...]] = {}  # tunnel name -> keys of its IPsec rows
        self._traffic_of: dict[Hashable, tuple[str, int | None]] = {}
        self._traffic: Counter[tuple[str, int | None]] = Counter()
        self._peer_cert_of: dict[Hashable, str] = {}
        self._peer_certs: Counter[str] = Counter()
        self._uncovered_of: dict[Hashable, str] = {}  # IPsec rows on the userspace datapath
        self._uncovered: Counter[str] = Counter()
        self._guard: GuardConfig | None = None
        self._guard_from: GlobalConfig | None = None
        # Per name, the outcome of the whole-state rules as last settled:
        self._in_force: dict[str, Tunnel] = {}
        self._kept: dict[str, float] = {}
        self._invalid: dict[str, tuple[Invalid, ...]] = {}
        # name -> the pairs of its valid verdicts and of its tunnel in force
        self._endpoints_of: dict[str, tuple[Endpoints, ...]] = {}
        self._touching: dict[Endpoints, tuple[str, ...]] = {}  # the reverse
        self._conns_at: dict[Endpoints, tuple[str, ...]] = {}  # the peerings of each pair
        # Invalid names whose tunnel in force changed in the last update: the next update settles them
        # again, because what is kept for an invalid tunnel is what was in force in the update before.
        self._recheck: set[str] = set()

    # -- the update ------------------------------------------------------------------------------

    def update(self, desired: DesiredState, now: float) -> set[str]:
        """Validate what changed in the desired state; return the connections whose desired form changed.

        Certificate files are looked at again each time (the inspector re-reads a file only
        when its inode, size or mtime changed), which is how in-place rotation is noticed.
        """
        rows = desired.interfaces
        keys = self._changed_keys(desired)
        self._index(rows, keys)
        config = desired.global_config
        facts = self.facts = self._certificate_facts(config)
        local, global_problem = local_identity(config, facts, now)
        # Certificate verdicts depend on the time (expiry); with none in use, nothing does.
        context = (config, facts, int(now // 3600) if facts.certs else None)
        again = context != self._context  # every verdict may differ: judge every row again
        if again:
            self._context = context
            keys = set(rows) | set(self._verdicts)
        names = self._judge(rows, keys, again, config, local, global_problem, facts, now)
        changed = self._settle(names | self._recheck, now)
        self._guard = self._guard_config(config)
        self.validated = ValidatedState(tuple(self._in_force.values()),
                                        tuple(itertools.chain.from_iterable(self._invalid.values())),
                                        global_problem, self._guard, dict(self._kept))
        self._seen = desired
        return changed

    def unprotected_invalid(self) -> frozenset[str]:
        """Invalid tunnels with no configuration in force (for instance after a restart of the
        monitor): their connections in the IKE daemon must be left alone, not removed."""
        return frozenset(name for name in self._invalid if name not in self._kept)

    def invalid_of(self, name: str) -> Invalid | None:
        """Why the tunnel is invalid (the last reason, when several rows share the name)."""
        reasons = self._invalid.get(name)
        return reasons[-1] if reasons else None

    # -- rows ------------------------------------------------------------------------------------

    def _changed_keys(self, desired: DesiredState) -> set[Hashable]:
        seen = self._seen
        if seen is not None:
            known = desired.changes.since(seen.changes)
            if known is not None:
                return set(known)
        before = seen.interfaces if seen is not None else {}
        after = desired.interfaces
        return {key for key in before.keys() | after.keys()
                if before.get(key) is not after.get(key) and before.get(key) != after.get(key)}

    def _index(self, rows: Mapping[Hashable, InterfaceRow], keys: Iterable[Hashable]) -> None:
        """Keep the sums over all rows (guard traffic and what it cannot cover, peer certificates)
        in step with `keys`."""
        for key in keys:
            row = rows.get(key)
            _recount(self._traffic_of, self._traffic, key, traffic_of_row(row) if row is not None else None)
            _recount(self._peer_cert_of, self._peer_certs, key, remote_cert_path(row) if row is not None else None)
            _recount(self._uncovered_of, self._uncovered, key, uncovered_of_row(row) if row is not None else None)

    def _judge(self, rows: Mapping[Hashable, InterfaceRow], keys: Iterable[Hashable], again: bool,
               config: GlobalConfig, local, global_problem: str | None, facts: CertificateFacts,
               now: float) -> set[str]:
        """Validate the rows in `keys` (unless unchanged and not `again`); return the names judged."""
        names: set[str] = set()
        for key in keys:
            old = self._verdicts.pop(key, None)
            row = rows.get(key)
            if old is not None:
                if row is not None and old[0] == row and not again:
                    self._verdicts[key] = old  # the same row in the same context: the same verdict
                    continue
                names.add(old[0].name)
                discard_member(self._keys_of, old[0].name, key)
            if row is None:
                continue
            options = dict(row.options)
            if not is_ipsec_interface(options):
                continue
            self._verdicts[key] = (row, validate_row(row, options, config, local, global_problem, facts, now))
            add_member(self._keys_of, row.name, key)
            names.add(row.name)
        return names

    # -- tunnels ---------------------------------------------------------------------------------

    def _settle(self, names: set[str], now: float) -> set[str]:
        """Run the whole-state rules on `names` closed over endpoint pairs; merge; return the
        connections whose peering changed."""
        subset, pairs = self._closure(names)
        verdicts = [self._verdicts[key] for name in subset for key in self._keys_of.get(name, ())]
        tunnels, invalid = settle_claims(verdicts)
        previous = {name: self._in_force[name] for name in subset if name in self._in_force}
        kept_before = {name: self._kept[name] for name in subset if name in self._kept}
        settled = keep_last_good(ValidatedState(tunnels, invalid), previous, kept_before, now)
        peerings, conflicts = group_peerings(settled.tunnels, self.naming_cache.naming)
        clashing = {conflict.name for conflict in conflicts}

        # Out with the subset's old outcome ...
        for name in subset:
            self._in_force.pop(name, None)
            self._kept.pop(name, None)
            self._invalid.pop(name, None)
            self.peering_of.pop(name, None)
            for pair in self._endpoints_of.pop(name, ()):
                discard_member(self._touching, pair, name)
        old_conns = set().union(*(self._conns_at.pop(pair, ()) for pair in pairs))
        old_peerings = {conn: self.peerings.pop(conn) for conn in old_conns}
        # ... in with the new one.
        for tunnel in settled.tunnels:
            if tunnel.name not in clashing:
                self._in_force[tunnel.name] = tunnel
        for name, since in settled.kept.items():
            if name not in clashing:
                self._kept[name] = since
        for entry in settled.invalid + conflicts:
            self._invalid[entry.name] = self._invalid.get(entry.name, ()) + (entry,)
        for conn, peering in peerings.items():
            self.peerings[conn] = peering
            add_member(self._conns_at, _endpoints(peering.tunnels[0]), conn)
            for tunnel in peering.tunnels:
                self.peering_of[tunnel.name] = peering
        for name in subset:
            pairs_of = {_endpoints(verdict) for key in self._keys_of.get(name, ())
                        if isinstance(verdict := self._verdicts[key][1], Tunnel)}
            if name in self._in_force:
                pairs_of.add(_endpoints(self._in_force[name]))
            if pairs_of:
                self._endpoints_of[name] = tuple(pairs_of)
                for pair in pairs_of:
                    add_member(self._touching, pair, name)
        # What keep_last_good keeps for an invalid tunnel is what was in force before; for a tunnel
        # that stays valid it does not matter. (An unchanged name outside the next subset keeps its
        # verdicts, so only the invalid ones can be affected.)
        claim_invalid = {entry.name for entry in invalid}
        self._recheck = {name for name in subset
                         if name in claim_invalid and previous.get(name) is not self._in_force.get(name)}
        self.touched_names = frozenset(subset)

        changed = {conn for conn in old_conns | peerings.keys()
                   if old_peerings.get(conn) is not peerings.get(conn) and old_peerings.get(conn) != peerings.get(conn)}
        for conn in changed:
            old, new = old_peerings.get(conn), peerings.get(conn)
            if old is not None and old.secret_id:
                self.secret_ids[old.secret_id] -= 1
                if not self.secret_ids[old.secret_id]:
                    del self.secret_ids[old.secret_id]
            if new is not None and new.secret_id:
                self.secret_ids[new.secret_id] += 1
        self.naming_cache.prune(self._in_force.values, len(self._in_force))
        return changed

    def _closure(self, names: set[str]) -> tuple[set[str], set[Endpoints]]:
        """`names` and every name that shares an endpoint pair with them, through their current
        valid verdicts and their tunnels in force, until nothing is added; and those pairs."""
        subset: set[str] = set()
        pairs: set[Endpoints] = set()
        pending = set(names)
        while pending:
            name = pending.pop()
            subset.add(name)
            pairs_of = set(self._endpoints_of.get(name, ()))
            pairs_of.update(_endpoints(verdict) for key in self._keys_of.get(name, ())
                            if isinstance(verdict := self._verdicts[key][1], Tunnel))
            for pair in pairs_of - pairs:
                pairs.add(pair)
                pending.update(other for other in self._touching.get(pair, ()) if other not in subset)
        return subset, pairs

    # -- sums over all rows ----------------------------------------------------------------------

    def _guard_config(self, config: GlobalConfig) -> GuardConfig:
        """The same object while nothing it is made of changed, so comparing it stays cheap."""
        traffic = self._traffic.keys()
        uncovered = tuple(sorted(self._uncovered.elements()))  # one name per row, as validate/guard.py has it
        if self._guard is not None and self._guard.traffic == traffic and self._guard.uncovered == uncovered \
                and self._guard_from == config:
            return self._guard
        self._guard_from = config
        return guard_for(config, frozenset(traffic), uncovered)

    def _certificate_facts(self, config: GlobalConfig) -> CertificateFacts:
        certs, keys, chains = global_certificate_paths(config)
        certs |= self._peer_certs.keys()
        self._inspector.retain(certs | keys)  # the cache holds only the files in use
        return CertificateFacts(
            certs={path: self._inspector.cert(path) for path in certs},
            keys={path: self._inspector.key(path) for path in keys},
            chains={pair: self._inspector.verify_chain(*pair) for pair in chains},
        )


def _recount(of: dict[Hashable, Summand], counter: Counter[Summand], key: Hashable, new: Summand | None) -> None:
    """Row `key` now adds `new` (None: nothing) to the sum `counter` instead of what it added before."""
    old = of.pop(key, None)
    if old is not None:
        counter[old] -= 1
        if not counter[old]:
            del counter[old]
    if new is not None:
        of[key] = new
        counter[new] += 1


def _endpoints(tunnel: Tunnel) -> Endpoints:
    return (tunnel.local_ip, tunnel.remote_ip)


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

    def prune(self, current, count: int) -> None:
        """Forget tunnels that are gone, once the cache has grown well past the `count` current
        ones (`current()` lists them; called only then, so the cost is spread over many updates)."""
        if len(self._names) > 2 * count + 64:
            self._names = {id(t): self._names[id(t)] for t in current()
                           if id(t) in self._names and self._names[id(t)][0] is t}
