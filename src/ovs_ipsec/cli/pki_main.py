"""`python -m ovs_ipsec.cli.pki_main ...`: the `ovs-ipsec pki` command on its own."""
import sys

from ovs_ipsec.pki.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
