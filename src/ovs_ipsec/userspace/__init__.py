"""Userspace ESP for tunnels of the OVS userspace (netdev) datapath.

The userspace datapath never hands tunnel packets to the kernel's IP stack: native tunnelling
pushes the outer headers itself and sends the frame out of br-phy's uplink port, below XFRM, so
kernel IPsec never sees it. This package puts ESP (RFC 4303, transport mode, AES-GCM per
RFC 4106) on that path with a small process on the far end of a veth that is br-phy's uplink:

    VM / overlay port                                         the wire (underlay NIC, kernel)
         |                                                              ^   |
    +----v----------------- ovs-vswitchd (netdev) ---------+            |   |
    | br-int: vxlan0 (local_ip A, remote_ip B,             |            |   |
    |         options:esp_{in,out}_{spi,key})               |            |   |
    |   native tunnel push: Eth | IP A>B | UDP 4789 | VXLAN |            |   |
    |   | inner frame                                        |            |   |
    | br-phy (IP A; OVS route to B via br-phy)              |            |   |
    |   uplink port esp-ovs  (AF_PACKET)                    |            |   |
    +----+--------------------------------^-----------------+            |   |
         | veth                            | decrypted tunnel packet      |   |
    +----v--------------------------------+-----------------+           |   |
    | esp-gw: ovs-ipsec userspace-esp (this package)         |  raw IP   |   |
    |   ARP/ND: answers for every next hop br-phy looks up   |  sockets  |   |
    |   out: IP A>B | ESP(SPI, seq, IV | UDP | VXLAN | inner | pad) ICV -+   |
    |   in:  raw IPPROTO_ESP socket: SPI -> SA, anti-replay, ICV, selector <--+
    |        -> Eth(to br-phy's MAC) | IP A<B | UDP 4789 | VXLAN | inner   |
    +--------------------------------------------------------+

The kernel keeps routing, ARP and the NIC; OVS keeps the tunnel; this process only turns tunnel
packets into ESP and back. A tunnel packet without an SA is dropped, never forwarded.

Modules: esp (pure codec), sa (OVSDB options -> validated SAs), engine (per-packet decisions),
pmtu (MTU and ICMP "too big"), frames (Ethernet/ARP/IP bits), seqstore (sequence numbers that
survive restarts), datapath (sockets), ovsdb (the IDL), service (the loop), status (esp/show),
pcap and xfrm (`ovs-ipsec pcap-decrypt`), cli.
"""
