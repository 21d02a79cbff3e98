"""The client side of the contract: what model servers and plugins import (gRPC, numpy and `core` only).

`credentials` holds ClientSecurity (TLS, mTLS, bearer token), `fallback` the reasons a plugin serves the
base model instead, `audit` the per-batch JSON-lines record, and `settings` the CHAMELEON_* environment
variables the engine plugins share.
"""

from adapter_service.client.adapter_client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AdapterClient,
    AdapterServiceError,
    AdaptResult,
    AsyncAdapterClient,
    BasesCache,
    ClusterAdapter,
    InvalidResponse,
    ModuleDelta,
    ServiceManifest,
    build_adapt_request,
    parse_adapt_response,
)
from adapter_service.client.credentials import ClientSecurity

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AdaptResult",
    "AdapterClient",
    "AdapterServiceError",
    "AsyncAdapterClient",
    "BasesCache",
    "ClientSecurity",
    "ClusterAdapter",
    "InvalidResponse",
    "ModuleDelta",
    "ServiceManifest",
    "build_adapt_request",
    "parse_adapt_response",
]
