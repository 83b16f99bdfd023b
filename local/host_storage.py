"""Storage connections for trigger bindings, resolved from settings as the real host does.

A binding's `connection` names a setting: either a connection string (`VlmStorage`, or the legacy
`AzureWebJobsVlmStorage`) or identity-based URIs (`VlmStorage__blobServiceUri`,
`__queueServiceUri`, `__serviceUri`, `__accountName`, with `__credential` / `__clientId`) used with
Entra ID. An empty connection means `AzureWebJobsStorage`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from azure.storage.blob.aio import BlobServiceClient
from azure.storage.queue.aio import QueueServiceClient

from local.host_config import HostConfigError

HOST_STORAGE = "AzureWebJobsStorage"


@dataclass
class StorageConnection:
    """One storage account as a binding sees it; clients are created on first use and shared."""

    name: str
    connection_string: str | None = None
    blob_uri: str | None = None
    queue_uri: str | None = None
    credential_kind: str | None = None
    client_id: str | None = None
    _blob: BlobServiceClient | None = field(default=None, repr=False)
    _queue: QueueServiceClient | None = field(default=None, repr=False)
    _credential: Any = field(default=None, repr=False)

    def _token_credential(self) -> Any:
        if self._credential is None:
            from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

            if (self.credential_kind or "").lower() == "managedidentity":
                self._credential = ManagedIdentityCredential(client_id=self.client_id)
            else:
                self._credential = DefaultAzureCredential(managed_identity_client_id=self.client_id)
        return self._credential

    def blob_service(self) -> BlobServiceClient:
        if self._blob is None:
            if self.connection_string:
                self._blob = BlobServiceClient.from_connection_string(self.connection_string)
            elif self.blob_uri:
                self._blob = BlobServiceClient(self.blob_uri, credential=self._token_credential())
            else:
                raise HostConfigError(f"connection {self.name!r}: no blob endpoint")
        return self._blob

    def queue_service(self) -> QueueServiceClient:
        if self._queue is None:
            if self.connection_string:
                self._queue = QueueServiceClient.from_connection_string(self.connection_string)
            elif self.queue_uri:
                self._queue = QueueServiceClient(self.queue_uri, credential=self._token_credential())
            else:
                raise HostConfigError(f"connection {self.name!r}: no queue endpoint (set {self.name}__queueServiceUri)")
        return self._queue

    def describe(self) -> str:
        """Where it points, without secrets (for logs)."""
        if self.connection_string:
            try:
                return f"{self.name} -> {self.blob_service().url}"
            except Exception:
                return f"{self.name} -> (connection string)"
        return f"{self.name} -> {self.blob_uri} (Entra ID)"

    async def close(self) -> None:
        for client in (self._blob, self._queue, self._credential):
            if client is not None:
                await client.close()
        self._blob = self._queue = self._credential = None


def resolve_connection(name: str | None, environ: Mapping[str, str] | None = None) -> StorageConnection:
    """The storage account a binding's `connection` setting names; error names the missing setting."""
    env = os.environ if environ is None else environ
    name = name or HOST_STORAGE
    for key in (name, f"AzureWebJobs{name}"):
        value = env.get(key)
        if value:
            return StorageConnection(name=name, connection_string=value)
    blob_uri = env.get(f"{name}__blobServiceUri") or env.get(f"{name}__serviceUri")
    account = env.get(f"{name}__accountName")
    if not blob_uri and account:
        blob_uri = f"https://{account}.blob.core.windows.net"
    if blob_uri:
        queue_uri = env.get(f"{name}__queueServiceUri")
        if not queue_uri:
            parts = urlsplit(blob_uri)
            if ".blob." in parts.netloc:
                queue_uri = f"{parts.scheme}://{parts.netloc.replace('.blob.', '.queue.')}"
            elif account:
                queue_uri = f"https://{account}.queue.core.windows.net"
        return StorageConnection(
            name=name,
            blob_uri=blob_uri,
            queue_uri=queue_uri,
            credential_kind=env.get(f"{name}__credential"),
            client_id=env.get(f"{name}__clientId"),
        )
    raise HostConfigError(
        f"storage connection {name!r} is not configured: set {name} to a connection string "
        f"(e.g. UseDevelopmentStorage=true) or {name}__blobServiceUri"
    )


class ConnectionPool:
    """One StorageConnection per setting name, closed together when the host stops."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self._conns: dict[str, StorageConnection] = {}

    def get(self, name: str | None) -> StorageConnection:
        key = name or HOST_STORAGE
        if key not in self._conns:
            self._conns[key] = resolve_connection(key, self._environ)
        return self._conns[key]

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()
