"""Adapters that talk to the kernel over netlink."""
