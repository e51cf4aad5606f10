#!/bin/bash
# PID 1 of the lab VM: a minimal system (no systemd), then the scenario runner, then power off.
# The runner's exit status is written to /results/guest-exit so the host can tell a crashed
# runner from failed scenarios.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=C.UTF-8

mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /run/lock /run/openvswitch
mount -t tmpfs tmpfs /tmp
hostname ovs-ipsec-lab
ip link set lo up

# The host's lab/results/ directory, shared read-write over virtio-9p.
modprobe -q 9pnet_virtio
modprobe -q 9p
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results; then
  echo "LAB: cannot mount the results share; results are only on the console"
fi

echo "LAB: userspace up at $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"
if grep -qw lab_shell=1 /proc/cmdline; then
  # lab/run.sh --shell: a root shell on the serial console; leaving it powers off.
  echo "LAB: interactive shell; the runner is /opt/ovs-ipsec/lab/runner.py; exit powers off"
  setsid -c bash -l </dev/ttyS0 >/dev/ttyS0 2>&1
  rc=0
else
  python3 /opt/ovs-ipsec/lab/runner.py
  rc=$?
fi
echo "$rc" > /results/guest-exit 2>/dev/null
echo "LAB: runner exited with status $rc at $(cut -d' ' -f1 /proc/uptime)s"

sync
umount /results 2>/dev/null
echo 1 > /proc/sys/kernel/sysrq
echo o > /proc/sysrq-trigger   # power off; with -no-reboot QEMU exits
sleep 30
