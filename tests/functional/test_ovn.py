"""OVN IPsec across many chassis: real NB/SB ovsdb-servers, ovn-northd and one ovn-controller per
chassis, each chassis a namespace with its own Open_vSwitch ovsdb-server, charon and our monitor,
with certificates from our own `ovs-ipsec pki` (CN = chassis name).

The operator's only switch is `ovn-nbctl set nb_global . ipsec=true|false`: ovn-controller adds
(or removes) `options:remote_name` and `options:local_ip` on the tunnels it made.
"""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations

import pytest

from testsupport.tunnels import charon_conns, charon_secrets
from testsupport.ovn import OvnCluster, ovn_missing
from testsupport.procs import wait_for

SUBNET = "10.233.0"


@pytest.fixture
def ovn(sandbox):
    reason = ovn_missing()
    if reason:
        pytest.skip(reason)
    cluster = OvnCluster(sandbox)
    yield cluster
    cluster.close()


def mesh(ovn, count):
    chassis = [ovn.add_chassis(f"ch{i}", f"{SUBNET}.{i}/24") for i in range(1, count + 1)]
    ovn.wait_for_tunnels(ipsec=False)
    return chassis


def wait_established(ovn, timeout=45):
    """Every chassis reports one established tunnel per other chassis, named after it."""
    def ready():
        for chassis in ovn.chassis:
            tunnels = chassis.host.status()["tunnels"]
            peers = {t["remote_name"] for t in tunnels if t["ike_sas"] > 0}
            if peers != {other.name for other in ovn.chassis if other is not chassis}:
                return None
        return True
    try:
        wait_for(ready, timeout, interval=0.3, what="an established IKE SA for every chassis pair")
    except TimeoutError:
        raise TimeoutError("not every pair is up:\n" + "\n".join(
            f"{c.name}: {[(t['name'], t['state'], t['reason']) for t in c.host.status()['tunnels']]}"
            for c in ovn.chassis)) from None


def established_sas(host) -> dict[str, dict]:
    """{conn name: IKE SA details} for our established IKE SAs, straight from charon."""
    return {name.decode() if isinstance(name, bytes) else name: {k: _text(v) for k, v in sa.items() if k != "child-sas"}
            for event in host.vici().list_sas() for name, sa in event.items()
            if sa["state"] == b"ESTABLISHED"}


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def assert_every_pair_has_an_ike_sa(ovn):
    for a, b in combinations(ovn.chassis, 2):
        for host, peer in ((a, b), (b, a)):
            sas = established_sas(host.host)
            assert any(sa["remote-id"] == peer.name and sa["remote-host"] == peer.encap_ip for sa in sas.values()), \
                f"{host.name} has no established IKE SA with {peer.name}: {sas}"


def xfrm_policies(host) -> str:
    """The namespace's XFRM policies, without charon's per-socket IKE bypass policies."""
    text = subprocess.run(["ip", "-n", host.name, "xfrm", "policy"], capture_output=True, text=True,
                          check=True, timeout=10).stdout
    blocks = [block for block in text.split("src ") if block.strip()]
    return "".join("src " + block for block in blocks if "\tsocket " not in block)


def test_ipsec_true_secures_every_pair_and_false_removes_everything_we_created(ovn):
    chassis = mesh(ovn, 3)
    ovn.central.set_ipsec(True)
    ovn.wait_for_tunnels(ipsec=True)
    wait_established(ovn)
    assert_every_pair_has_an_ike_sa(ovn)

    for one in chassis:
        for tunnel in one.host.status()["tunnels"]:
            assert tunnel["auth"] == "ca-cert" and tunnel["type"] == "geneve" and tunnel["local_ip"] == one.encap_ip
        # The status written back where OVN and operators look: the tunnel's own Interface row.
        def written(one=one):
            rows = one.ovn_tunnels()
            return rows if all(row["external_ids"].get("ipsec_state") == "negotiating" for row in rows.values()) \
                else None
        for row in wait_for(written, 5, what=f"ipsec_state=negotiating on {one.name}'s tunnels").values():
            assert row["external_ids"]["ipsec_since"].endswith("Z") and row["external_ids"]["ipsec_reason"].startswith("the IKE SA is up")

    table = subprocess.run([sys.executable, "-m", "ovs_ipsec.cli.main", "status", f"--unixctl={chassis[0].host.unixctl}"],
                           capture_output=True, text=True, check=True, timeout=30).stdout
    assert "ch2 (10.233.0.2)" in table and "ch3 (10.233.0.3)" in table
    assert "2 tunnels from 10.233.0.1: 2 negotiating" in table

    ovn.central.set_ipsec(False)
    ovn.wait_for_tunnels(ipsec=False)
    for one in chassis:
        wait_for(lambda one=one: not one.host.status()["tunnels"], 20, what=f"no IPsec tunnel left on {one.name}")
        host = one.host
        assert not [c for c in charon_conns(host) if c.startswith("ovsipsec-")]
        assert not [s for s in charon_secrets(host) if s.startswith("ovsipsec-")]
        assert not established_sas(host)
        assert xfrm_policies(host) == ""  # neither trap policies nor (where present) the plaintext guard's
        # The status keys go away with IPsec; the rows themselves stay (they are OVN's tunnels).
        wait_for(lambda one=one: all(not any(k.startswith("ipsec_") for k in row["external_ids"])
                                     for row in one.ovn_tunnels().values()), 5,
                 what=f"our external_ids keys removed on {one.name}")
        # Private keys are credentials too: unloaded at the next full comparison with charon.
        host.appctl("refresh")
        assert host.vici().get_keys()["keys"] == []


def test_a_new_chassis_converges_without_touching_existing_pairs(ovn):
    mesh(ovn, 3)
    ovn.central.set_ipsec(True)
    wait_established(ovn)
    before = {one.name: {name: sa["uniqueid"] for name, sa in established_sas(one.host).items()} for one in ovn.chassis}

    ovn.add_chassis("ch4", f"{SUBNET}.4/24")
    ovn.wait_for_tunnels(ipsec=True)
    wait_established(ovn)
    assert_every_pair_has_an_ike_sa(ovn)
    for one in ovn.chassis[:3]:
        after = {name: sa["uniqueid"] for name, sa in established_sas(one.host).items()}
        assert {name: after.get(name) for name in before[one.name]} == before[one.name], \
            f"an existing IKE SA on {one.name} was replaced"
        assert len(after) == 3


def test_ipsec_encapsulation_forces_udp_encapsulation_of_ike_and_esp(ovn):
    mesh(ovn, 3)
    ovn.central.nbctl("set", "nb_global", ".", "ipsec=true", "options:ipsec_encapsulation=true")
    wait_for(lambda: all(row["options"].get("ipsec_encapsulation") == "yes"
                         for one in ovn.chassis for row in one.ovn_tunnels().values()), 30,
             what="ovn-controller to add ipsec_encapsulation=yes to every tunnel")
    wait_established(ovn)
    for one in ovn.chassis:
        sas = established_sas(one.host)
        assert len(sas) == 2
        for sa in sas.values():
            # Forced encapsulation: charon fakes NAT detection, so IKE moves to 4500 and ESP is UDP-encapsulated.
            assert sa.get("nat-any") == "yes" and sa["local-port"] == "4500" and sa["remote-port"] == "4500", sa
