"""The last good configuration on the real kernel (`expect = "last-good"`, issue "Fail safe").

After the tunnel is established and pinged, the operator on h1 makes the mistakes an edit can
make: an empty PSK, a certificate path that does not exist, a malformed value of a known option,
an unknown option. After each, h1's monitor must report the tunnel `invalid` with `last_good_since`, the
same IKE SA must still be up (same `established_at`), and a ping across the tunnel must still work
with only ESP on the wire (the scenario's capture covers this phase too). Then the operator fixes
the row and the tunnel is valid again with the same SA.
"""

import time

from hosts import Host

# (the mistake, how it is undone), as ovs-vsctl arguments on the tunnel interface
MISTAKES = [
    (["set", "interface", "{t}", 'options:psk=""'], ["set", "interface", "{t}", "options:psk={psk}"]),
    (["set", "interface", "{t}", "options:remote_cert=/nonexistent/peer.pem"],
     ["remove", "interface", "{t}", "options", "remote_cert"]),
    # (Not dst_port: ovs-vswitchd refuses a malformed one itself, and the tunnel stops whatever IPsec does.)
    (["set", "interface", "{t}", "options:ipsec_dpddelay=soon"],
     ["remove", "interface", "{t}", "options", "ipsec_dpddelay"]),
    (["set", "interface", "{t}", "options:ipsec_leftupdown=/tmp/x"],
     ["remove", "interface", "{t}", "options", "ipsec_leftupdown"]),
]


def phases(host: Host, monitor, tunnel: str, psk: str, ping) -> dict:
    """Run every mistake on `host`; returns the result fields (`last_good_ok` and the details)."""
    def entry():
        return next((t for t in monitor.poll().get("tunnels", []) if t["name"] == tunnel), {})

    before = entry()
    checks = []
    for mistake, fix in MISTAKES:
        host.vsctl(*[word.format(t=tunnel, psk=psk) for word in mistake])
        wanted_state = "established" if "ipsec_leftupdown" in mistake[-1] else "invalid"  # ignored, not invalid
        now = _wait(entry, lambda t, s=wanted_state: t.get("state") == s, 20)
        sent, received = ping()
        checks.append({"mistake": mistake[-1], "state": now.get("state"), "last_good_since": now.get("last_good_since"),
                       "same_sa": now.get("established_at") == before.get("established_at"),
                       "ping": f"{received}/{sent}", "ignored_options": now.get("ignored_options")})
        host.vsctl(*[word.format(t=tunnel, psk=psk) for word in fix])
        _wait(entry, lambda t: t.get("state") == "established" and not t.get("last_good_since"), 20)
    after = entry()
    ok = all(c["same_sa"] and c["ping"] == "5/5" for c in checks) and all(
        c["last_good_since"] for c in checks if c["state"] == "invalid") and \
        after.get("established_at") == before.get("established_at") and len(
            [c for c in checks if c["state"] == "invalid"]) == 3
    return {"last_good_ok": ok, "last_good_checks": checks}


def _wait(read, condition, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if condition(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)
