"""tcpdump on the underlay: the proof that tunnel traffic is encrypted on the wire."""

import signal
from pathlib import Path

from hosts import Host
from proc import stop_pid, wait_for

ESP = "ip proto 50 or ip6 proto 50"
IKE = "udp port 500 or udp port 4500"


class Capture:
    def __init__(self, host: Host, pcap: Path):
        self.host, self.pcap = host, pcap
        self.log = pcap.with_suffix(".tcpdump.out")
        self.proc = None

    def start(self) -> None:
        # -U writes each packet as it arrives, so nothing is lost when the capture stops.
        self.proc = self.host.sh.spawn(["tcpdump", "-i", self.host.dev, "-n", "-U", "-w", self.pcap],
                                       netns=self.host.name, log=self.log)
        if not wait_for(lambda: "listening on" in self.log.read_text(), timeout=20):
            raise RuntimeError(f"tcpdump on {self.host.name}/{self.host.dev} did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc:
            stop_pid(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=5)
            self.proc = None

    def count(self, expression: str) -> int:
        cp = self.host.sh.run(["tcpdump", "-n", "-r", self.pcap, expression], check=False)
        return len(cp.stdout.splitlines())

    def text(self) -> str:
        """A readable summary of the whole capture (kept as underlay.txt next to the pcap)."""
        return self.host.sh.run(["tcpdump", "-n", "-v", "-r", self.pcap], check=False).stdout
