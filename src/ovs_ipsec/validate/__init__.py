"""Validation: OVSDB rows (untrusted) -> typed tunnels, typed guard configuration, and reasons.

`fields` holds one strict parser per kind of value, `options` the `ipsec_*` options, `tunnels`
the per-row rules, `certificates` the host's identity, `guard` the plaintext guard's inputs.
Nothing downstream reads a raw row again.
"""

from .certificates import CertificateFacts, certificate_paths, is_ipsec_interface
from .fields import Reject
from .guard import parse_skb_mark
from .tunnels import validate

__all__ = ["CertificateFacts", "Reject", "certificate_paths", "is_ipsec_interface", "parse_skb_mark", "validate"]
