"""The consortium PKI: a CA in the workspace, node identities, certificate checks.

Only this package (in `_x509`) and `corolla.secure_agg._crypto` import
`cryptography.hazmat`.
"""

from corolla.platform.pki.ca import ConsortiumCA, IssuedNode
from corolla.platform.pki.errors import CertificateError, PkiError, WorkspaceError
from corolla.platform.pki.identity import NodeIdentity, PeerCertificate, Role, Verifier, tls_server_name

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
