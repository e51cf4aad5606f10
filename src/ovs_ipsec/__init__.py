"""ovs-ipsec: encrypt Open vSwitch tunnels with IPsec."""

__version__ = "0.1.0"
