"""How each `auth` value of lab/scenarios.toml is configured on a tunnel, as an operator would.

A function gets the two hosts and returns the options:KEY=VALUE to set on the local side's
tunnel interface. Certificate modes will also write key material into host.dir and set
Open_vSwitch other_config (certificate, private_key, ca_cert) before returning.
"""

from hosts import Host

PSK = "swordfish"


def psk(host: Host, peer: Host) -> dict:
    return {"psk": PSK}


AUTH = {"psk": psk}
