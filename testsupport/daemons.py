"""What the functional tests need to know about each IKE daemon: how to list its objects, and how an
operator adds a connection of their own (which the monitor must never touch)."""

from __future__ import annotations

import os

from ovs_ipsec.backends.libreswan import parse, render

from .pluto import LIBRESWAN_ROOT
from .tunnels import charon_conns, charon_secrets, ike_sa_ids


class StrongSwan:
    name = "strongswan"
    other_ike = "aes128gcm16-prfsha256-ecp256"

    def ike_sa_ids(self, host):
        return ike_sa_ids(host)

    def conns(self, host):
        return charon_conns(host)

    def secrets(self, host):
        return charon_secrets(host)

    def children(self, host, conn):
        return {c.split("-")[0] for event in host.vici().list_conns({"ike": conn}) for c in event[conn]["children"]}

    def add_foreign(self, host):
        session = host.vici()
        session.load_conn({"myvpn-2": {"remote_addrs": ["10.231.0.99"], "local": {"auth": "psk"},
                                       "remote": {"auth": "psk"}, "children": {"net": {}}}})
        session.load_shared({"id": "myvpn", "type": "IKE", "data": "foreign", "owners": ["10.231.0.99"]})


class LibreSwan:
    name = "libreswan"
    other_ike = "aes_gcm128-sha2_256"

    def ike_sa_ids(self, host):
        """{peering (or foreign connection): serial of its established IKE SA} straight from pluto."""
        ids = {}
        for state in parse.states(host.whack("--showstates")):
            if not state.child and state.established:
                ids[_peering(state.conn)] = f"#{state.serial}"
        return ids

    def conns(self, host):
        return {_peering(name) for name in parse.loaded_conns(host.whack("--status"))}

    def secrets(self, host):
        return {path.stem for path in (host.lsw_root / "etc/ipsec.d").glob("*.secrets")}

    def children(self, host, conn):
        return {name.split("_", 1)[1].split("-")[0] for name in parse.loaded_conns(host.whack("--status"))
                if render.split_name(name) and render.split_name(name)[0] == conn
                and render.split_name(name)[1] != render.ANCHOR}

    def add_foreign(self, host):
        """A hand-made connection and secret, in the place an operator would put them."""
        folder = host.lsw_root / "etc/ipsec.d"
        (folder / "myvpn.conf").write_text("conn myvpn-2\n    left=10.231.0.1\n    right=10.231.0.99\n"
                                           "    authby=secret\n    auto=add\n")
        (folder / "myvpn.secrets").write_text('10.231.0.1 10.231.0.99 : PSK "foreign-foreign"\n')
        host.ipsec("addconn", "--ctlsocket", host.pluto_ctl, "--config", str(folder / "myvpn.conf"), "myvpn-2")
        host.whack("--rereadsecrets")


def _peering(pluto_name):
    parts = render.split_name(pluto_name)
    return parts[0] if parts else pluto_name


def libreswan_missing():
    if not os.path.exists(f"{LIBRESWAN_ROOT}/usr/libexec/ipsec/pluto"):
        return f"LibreSwan is not extracted in {LIBRESWAN_ROOT} (run scripts/setup-libreswan.sh)"
    if not os.path.exists("/usr/bin/certutil"):
        return "certutil is missing (libnss3-tools; run scripts/setup-libreswan.sh)"
    return None
