#!/usr/bin/env bash
# Install ovs-ipsec as a system service from this checkout (run as root on Debian 12).
# The upstream openvswitch-ipsec service is stopped and disabled: only one monitor may run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --break-system-packages . 2>/dev/null || python3 -m pip install .
install -m 0644 packaging/ovs-ipsec.service /etc/systemd/system/ovs-ipsec.service
install -m 0644 packaging/ovs-ipsec.logrotate /etc/logrotate.d/ovs-ipsec
install -m 0644 packaging/strongswan-ovs-ipsec.conf /etc/strongswan.d/ovs-ipsec.conf
[ -f /etc/default/ovs-ipsec ] || install -m 0644 packaging/ovs-ipsec.default /etc/default/ovs-ipsec
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now openvswitch-ipsec.service 2>/dev/null || true
  systemctl daemon-reload
  systemctl enable --now ovs-ipsec.service
fi
