#!/usr/bin/env bash
# Install ovs-ipsec as a system service on a distribution without the .deb (Debian and Ubuntu:
# `make deb`, then `apt install ./build/deb/ovs-ipsec_*.deb`). Run as root from this checkout.
#   PREFIX (default /opt/ovs-ipsec): a virtualenv of its own; the system's Python packages are
#   never touched. Needs python3 >= 3.11 with venv, Open vSwitch, and strongSwan's charon with the
#   vici plugin (swanctl) running as its own service.
# The units are installed enabled but not started while another ovs-monitor-ipsec runs
# (openvswitch-ipsec.service): switch with `ovs-ipsec migrate-from-upstream` on Debian-like hosts,
# or stop it by hand (its stop removes every tunnel) where that procedure does not apply.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/opt/ovs-ipsec}
python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --upgrade pip
"$PREFIX/bin/pip" install --quiet .
for unit in ovs-ipsec.service ovs-ipsec-guard.service; do
  sed -e "s#/usr/sbin/ovs-monitor-ipsec#$PREFIX/bin/ovs-monitor-ipsec#" -e "s#/usr/bin/ovs-ipsec#$PREFIX/bin/ovs-ipsec#" \
    "packaging/$unit" > "/etc/systemd/system/$unit"
done
install -D -m 0644 packaging/ovs-ipsec.logrotate /etc/logrotate.d/ovs-ipsec
install -D -m 0644 packaging/strongswan-ovs-ipsec.conf /etc/strongswan.d/ovs-ipsec.conf
[ -f /etc/default/ovs-ipsec ] || install -D -m 0644 packaging/ovs-ipsec.default /etc/default/ovs-ipsec
install -D -m 0644 packaging/man/ovs-ipsec.8 /usr/local/share/man/man8/ovs-ipsec.8
install -D -m 0644 packaging/man/ovs-monitor-ipsec.8 /usr/local/share/man/man8/ovs-monitor-ipsec.8
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable ovs-ipsec.service ovs-ipsec-guard.service
  if systemctl is-active --quiet openvswitch-ipsec.service; then
    echo "install.sh: openvswitch-ipsec.service runs upstream's monitor: ovs-ipsec.service not started"
  else
    systemctl start ovs-ipsec.service
  fi
fi
