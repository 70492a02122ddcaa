"""The consortium PKI: a CA in the workspace, node identities, certificate checks.

Only this package (in `_x509`), `corolla.secure_agg._crypto` and
`corolla.verify.ledger.signing` import `cryptography.hazmat`. A signature check raises
`SignatureError` (one opaque error; `Verifier` says which certificate it concerned).
"""

from corolla.pki.ca import ConsortiumCA, IssuedNode
from corolla.pki.errors import CertificateError, PkiError, SignatureError, WorkspaceError
from corolla.pki.identity import NodeIdentity, PeerCertificate, Role, Verifier, tls_server_name

__all__ = [
    "CertificateError",
    "ConsortiumCA",
    "IssuedNode",
    "NodeIdentity",
    "PeerCertificate",
    "PkiError",
    "Role",
    "SignatureError",
    "Verifier",
    "WorkspaceError",
    "tls_server_name",
]
