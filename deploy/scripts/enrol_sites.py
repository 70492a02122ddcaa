"""Enrol sites' Flower keys at a running SuperLink, each after its certificate checks.

    python enrol_sites.py --workspace /var/lib/corolla --coordinator coordinator \
        --superlink superlink:9200 site-a site-b site-c

Run on the coordinator (it needs `nodes/<coordinator>/` and each site's `nodes/<site>/node.pem`
and `flower-auth.pub`, both public). A site whose certificate is not from the consortium CA,
is revoked, or does not name its Flower key is refused (exit 1) and nothing of it is enrolled.
A key already enrolled (the SuperLink keeps enrolments in its --database) is reported, not an
error, so this can run at every start.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from corolla.errors import CorollaError
from corolla.pki import NodeIdentity
from corolla.platform.flower import ControlClient, SuperLinkConnection
from corolla.platform.flower.enrolment import enroll_site


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--coordinator", default="coordinator", help="the coordinator's node name")
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT")
    parser.add_argument("sites", nargs="+")
    args = parser.parse_args()
    coordinator = args.workspace / "nodes" / args.coordinator
    verifier = NodeIdentity.load(coordinator).verifier()
    with tempfile.TemporaryDirectory() as work:
        connection = SuperLinkConnection(address=args.superlink, root_certificates=coordinator / "ca.pem")
        control = ControlClient(connection, work_dir=Path(work))
        for site in args.sites:
            try:
                holder, node_id = enroll_site(control, verifier, args.workspace / "nodes" / site)
            except (CorollaError, OSError) as exc:  # the certificate, its files, the Flower CLI: one line
                if "already in use" in str(exc):
                    print(f"{site}: already enrolled")
                    continue
                print(f"{site}: not enrolled: {exc}", file=sys.stderr)
                return 1
            print(f"{site}: enrolled as SuperNode {node_id} (node id {holder.node_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
