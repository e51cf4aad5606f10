"""How each `auth` value of lab/scenarios.toml is configured on a tunnel, as an operator would.

A function gets the local host and its peer and returns the options:KEY=VALUE to set on the
local side's tunnel interface. Certificate modes first give the host its key material (files in
host.dir) and set Open_vSwitch other_config:certificate/private_key[/ca_cert] with ovs-vsctl,
before the tunnel exists, as the OVS IPsec tutorial does.

The certificates come from the project's own PKI tool (`python3 -m ovs_ipsec.cli.pki_main`,
an ovs-pki work-alike), run inside the VM with Debian's python3 and the overlay's `cryptography`
(the deployed environment, and the VM's own clock for notBefore). They are made once per boot,
on first use, under PKI_ROOT (the operator's workstation), exactly as
tests/functional/test_certificates.py makes them; each scenario then copies to each host only
what that hypervisor would be given: its own key and certificate, plus the peer's certificate
(self-signed mode) or the CA certificate (CA mode). Key generation under TCG costs about 2 s of
Python start-up per command, which a scenario then does not pay again.
"""

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hosts import Host
from monitor import PYTHON_ENV

PSK = "swordfish"
PKI = ["python3", "-m", "ovs_ipsec.cli.pki_main"]
PKI_ROOT = Path("/tmp/lab-pki")
# What each auth mode makes the monitor report as the tunnel's `auth` in `status --json`;
# runner.py checks it, so a scenario cannot pass while authenticating some other way.
STATUS_AUTH = {"psk": "psk", "cert": "peer-cert", "ca": "ca-cert", "ca-rsa": "ca-cert"}

_made = {}                 # PKI folder -> True once its certificates exist (one boot)
_lock = threading.Lock()


def psk(host: Host, peer: Host) -> dict:
    return {"psk": PSK}


def _pki(host: Host, folder: Path, *args) -> None:
    # Like ovs-pki: NAME-privkey.pem, NAME-req.pem and NAME-cert.pem go to the current folder,
    # the CAs to --dir.
    host.sh.run([*PKI, "--dir", folder / "pki", *args], cwd=folder, env=PYTHON_ENV, timeout=120)


def _make_once(host: Host, kind: str, names: list, key_type: tuple = ()) -> Path:
    """The certificates of `kind` ("self-signed" or "ca-signed") for `names`, made on first use;
    `key_type` ("-k", "rsa") for RSA keys (our tool's default is ECDSA P-256)."""
    folder = PKI_ROOT / (f"{kind}-{key_type[-1]}" if key_type else kind)
    with _lock:
        if _made.get(folder):
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if kind == "ca-signed":
            _pki(host, folder, "init", *key_type)
        # One request per host, the two in parallel (2 vCPUs); signing appends to the CA's
        # index, so the CA signs one after the other.
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            list(pool.map(lambda name: _pki(host, folder, "req", *key_type, name), names))
        for name in names:
            if kind == "ca-signed":
                _pki(host, folder, "sign", name, "switch")
            else:
                _pki(host, folder, "self-sign", name)
        _made[folder] = True
        return folder


def _install(host: Host, folder: Path, files: list) -> dict:
    """Copy the files this host is given into host.dir (the private key keeps its mode 0600)."""
    paths = {}
    for src in files:
        dst = host.dir / Path(src).name
        shutil.copy2(folder / src, dst)
        paths[src] = dst
    return paths


def _use_certificate(host: Host, cert: Path, key: Path, ca_cert: Path = None) -> None:
    settings = [f"other_config:certificate={cert}", f"other_config:private_key={key}"]
    if ca_cert:
        settings.append(f"other_config:ca_cert={ca_cert}")
    host.vsctl("set", "Open_vSwitch", ".", *settings)


def cert(host: Host, peer: Host) -> dict:
    """Self-signed certificates: each host pins its peer's certificate with options:remote_cert."""
    folder = _make_once(host, "self-signed", sorted((host.name, peer.name)))
    own, key, theirs = f"{host.name}-cert.pem", f"{host.name}-privkey.pem", f"{peer.name}-cert.pem"
    files = _install(host, folder, [own, key, theirs])
    _use_certificate(host, files[own], files[key])
    return {"remote_cert": files[theirs]}


def ca(host: Host, peer: Host, key_type: tuple = ()) -> dict:
    """CA-signed certificates: each host trusts the switch CA and names its peer's CN."""
    folder = _make_once(host, "ca-signed", sorted((host.name, peer.name)), key_type)
    own, key, cacert = f"{host.name}-cert.pem", f"{host.name}-privkey.pem", "pki/switchca/cacert.pem"
    files = _install(host, folder, [own, key, cacert])
    _use_certificate(host, files[own], files[key], files[cacert])
    return {"remote_name": peer.name}


def ca_rsa(host: Host, peer: Host) -> dict:
    """CA-signed RSA certificates, as upstream's ovs-pki makes them: upstream's monitor writes
    `RSA` key lines (strongSwan) and `leftrsasigkey=%cert` (LibreSwan)."""
    return ca(host, peer, ("-k", "rsa"))


def cacert(host: Host) -> Path:
    """The switch CA certificate a CA-signed scenario gave this host."""
    return host.dir / "cacert.pem"


AUTH = {"psk": psk, "cert": cert, "ca": ca, "ca-rsa": ca_rsa}
