"""`ovs-ipsec userspace-esp` (the ESP bump for netdev tunnels) and `ovs-ipsec pcap-decrypt`."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from ..errors import OvsIpsecError

PROGRAM = "ovs-ipsec-esp"
DEFAULT_DATABASE = "unix:/var/run/openvswitch/db.sock"
DEFAULT_STATE_DIR = "/var/lib/openvswitch/ovs-ipsec-esp"
# Linux interface names (IFNAMSIZ 16, no '/', no whitespace); it ends up in /proc paths and logs.
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def add_parsers(commands) -> None:
    add_service_parser(commands.add_parser(
        "userspace-esp", help="encrypt netdev (userspace datapath) tunnels with ESP, keys from OVSDB"))
    add_pcap_parser(commands.add_parser(
        "pcap-decrypt", help="decrypt the ESP in a capture and show the tunnelled frames"))


# -- userspace-esp ---------------------------------------------------------------------------------

def add_service_parser(parser: argparse.ArgumentParser) -> None:
    import ovs.daemon
    import ovs.vlog

    parser.add_argument("database", metavar="DATABASE", nargs="?", default=DEFAULT_DATABASE,
                        help=f"OVSDB remote (default {DEFAULT_DATABASE})")
    parser.add_argument("--uplink", required=True, metavar="DEVICE",
                        help="our end of the veth whose other end is br-phy's uplink port")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help=f"where outbound sequence numbers are reserved (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--unixctl", help="control socket path (default <rundir>/ovs-ipsec-esp.<pid>.ctl)")
    parser.add_argument("--ike-keys", action="store_true",
                        help="also encrypt netdev tunnels with IKE options (psk, remote_cert, remote_name), with "
                             "the SAs the IKE daemon installed in the kernel inert (policies = no, mark_in, "
                             "mark_out), read with `ip -s xfrm state`")
    parser.add_argument("--no-icmp", action="store_true",
                        help="do not send ICMP 'fragmentation needed' / 'packet too big' into the overlay "
                             "for packets that do not fit with ESP (they are dropped and counted either way)")
    ovs.vlog.add_args(parser)
    ovs.daemon.add_args(parser)
    parser.set_defaults(func=run_service)


def run_service(args: argparse.Namespace) -> int:
    import ovs.daemon
    import ovs.util
    import ovs.vlog

    from ..cli import logbridge
    from .datapath import Datapath, gateway_mac_for, harden_uplink, interface_exists
    from .engine import Engine
    from .ovsdb import EspOvsdbReader
    from .seqstore import SequenceStore
    from .service import EspService, read_kernel_sas

    # Names of the pidfile, log file and control socket derive from the program name.
    ovs.util.PROGRAM_NAME = PROGRAM
    if not _IFNAME.fullmatch(args.uplink) or not interface_exists(args.uplink):
        print(f"{PROGRAM}: --uplink must name a network interface of this namespace", file=sys.stderr)
        return 1
    follow_vlog_levels = logbridge.install("ovs_ipsec")
    ovs.vlog.handle_args(args)
    follow_vlog_levels()
    ovs.daemon.handle_args(args)
    log = logging.getLogger("ovs_ipsec.userspace")
    try:
        reader = EspOvsdbReader(args.database)
        datapath = Datapath(args.uplink)
        for problem in harden_uplink(args.uplink):
            log.warning("could not harden the uplink: %s", problem)
        ovs.daemon.daemonize()
        engine = Engine(gateway_mac_for(datapath.uplink_mac), SequenceStore(Path(args.state_dir).absolute()),
                        logging.getLogger("ovs_ipsec.userspace"), send_too_big=not args.no_icmp)
        log.info("userspace ESP on uplink %s", args.uplink)
        EspService(reader, datapath, engine, args.unixctl,
                   kernel_sas=read_kernel_sas if args.ike_keys else None).run()
    except OvsIpsecError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


# -- pcap-decrypt ----------------------------------------------------------------------------------

def add_pcap_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pcap", help="a capture (pcap or pcapng, as tcpdump -w writes)")
    parser.add_argument("--sa", action="append", default=[], metavar="SPI:KEY",
                        help="an SA: SPI (decimal or 0x) and key||salt as 0x-hex (as ip xfrm takes it); "
                             "repeatable. On a shared machine prefer --sa-file: argv is visible to all")
    parser.add_argument("--sa-file", action="append", default=[], metavar="FILE",
                        help="SAs, one 'SPI KEY' per line, or the output of `ip xfrm state` "
                             "('-' reads standard input)")
    parser.add_argument("--port", action="append", default=[], metavar="KIND:PORT",
                        help="also decode UDP PORT as vxlan or geneve (defaults: vxlan 4789, geneve 6081)")
    parser.add_argument("--json", action="store_true", help="one JSON document: packets and counts")
    parser.set_defaults(func=run_pcap_decrypt)


def run_pcap_decrypt(args: argparse.Namespace) -> int:
    from .pcap import decrypt_capture, parse_port_options, render_text
    from .xfrm import parse_sa_argument, parse_sa_text

    try:
        keys = [parse_sa_argument(value) for value in args.sa]
        for name in args.sa_file:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
            keys.extend(parse_sa_text(text))
        if not keys:
            raise OvsIpsecError("no SA given (--sa or --sa-file)")
        ports = parse_port_options(args.port)
        report = decrypt_capture(Path(args.pcap).read_bytes(), keys, ports)
    except (OvsIpsecError, OSError) as exc:
        print(f"ovs-ipsec pcap-decrypt: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(render_text(report), end="")
    return 0
