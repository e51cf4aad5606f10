"""The status write-back plan: our three keys only, written only when they differ."""

from __future__ import annotations

from ovs_ipsec.model import TunnelState
from ovs_ipsec.ovsdb.writer import OWNED_KEYS, RowWrite, plan_writes, status_keys
from ovs_ipsec.status.snapshot import TunnelStatus


def status(name="gnv0", state=TunnelState.ESTABLISHED, reason=None, since=86400.0):
    return TunnelStatus(name=name, type="geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", auth="psk",
                        state=state, reason=reason, since=since)


def test_status_keys():
    assert status_keys(status()) == {"ipsec_state": "established", "ipsec_since": "1970-01-02T00:00:00Z"}
    assert status_keys(status(state=TunnelState.INVALID, reason="'psk' is empty"))["ipsec_reason"] == "'psk' is empty"


def test_only_differences_are_written_and_foreign_keys_never_appear():
    wanted = {"gnv0": status_keys(status()), "gre0": status_keys(status("gre0", TunnelState.ERROR, "refused"))}
    foreign = {"ovn-chassis-id": "ch2@10.0.0.2", "ipsec_custom": "operator's own"}
    rows = [
        ("u1", "gnv0", {**foreign, **wanted["gnv0"]}),  # already right: nothing to do
        ("u2", "gre0", {**foreign, "ipsec_state": "loaded", "ipsec_since": wanted["gre0"]["ipsec_since"]}),
        ("u3", "vif0", {**foreign, "iface-id": "lsp1"}),  # not ours, never was
        ("u4", "old0", {**foreign, "ipsec_state": "established", "ipsec_reason": "x", "ipsec_since": "y"}),
    ]
    assert plan_writes(wanted, rows) == (
        RowWrite("u2", "gre0", set_keys=(("ipsec_state", "error"), ("ipsec_reason", "refused")), delete_keys=()),
        RowWrite("u4", "old0", set_keys=(), delete_keys=("ipsec_state", "ipsec_reason", "ipsec_since")),
    )
    for write in plan_writes(wanted, rows):
        assert {key for key, _ in write.set_keys} | set(write.delete_keys) <= set(OWNED_KEYS)


def test_a_reason_that_clears_is_deleted():
    wanted = {"gnv0": status_keys(status())}
    rows = [("u1", "gnv0", {**wanted["gnv0"], "ipsec_reason": "was broken"})]
    assert plan_writes(wanted, rows) == (RowWrite("u1", "gnv0", (), ("ipsec_reason",)),)


def test_rows_sharing_a_name_each_get_the_keys():
    wanted = {"ovn-ch2-0": status_keys(status("ovn-ch2-0"))}
    writes = plan_writes(wanted, [("old", "ovn-ch2-0", {}), ("new", "ovn-ch2-0", {})])
    assert [w.uuid for w in writes] == ["old", "new"]
