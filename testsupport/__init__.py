"""Test support: real daemons (ovsdb-server, charon, pluto, OVN, our monitor) in private network
namespaces, for the functional tests, the demos, the benchmark and the lab guest. Never shipped:
it lives outside `src/`, so `pip wheel .` holds the product only.

One fixture per daemon, each with `start()`/`stop()` and the paths it owns, composed by `Host`
(one simulated hypervisor) the way ovsdbapp composes its fixtures. Everything started here is
stopped by PID and every namespace deleted by name, so nothing leaks into the machine.
"""
