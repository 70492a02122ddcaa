"""The consortium PKI: a CA in the workspace, node identities, certificate checks.

Only this package (in `_x509`) and `corolla.secure_agg._crypto` import
`cryptography.hazmat`.
"""

from corolla.pki.ca import ConsortiumCA, IssuedNode
from corolla.pki.errors import CertificateError, PkiError, WorkspaceError
from corolla.pki.identity import NodeIdentity, PeerCertificate, Role, Verifier, tls_server_name

__all__ = [
    "CertificateError",
    "ConsortiumCA",
    "IssuedNode",
    "NodeIdentity",
    "PeerCertificate",
    "PkiError",
    "Role",
    "Verifier",
    "WorkspaceError",
    "tls_server_name",
]
