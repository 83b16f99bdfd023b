"""Lazy, per-event-loop blob (and queue) clients for the `VlmStorage` connection.

Locally the connection is a connection string (Azurite); in Azure it is
identity-based (`VlmStorage__blobServiceUri` + managed identity). Clients are
created on first use, never at import time, and cached per event loop because
aio clients are bound to the loop that created them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .settings import Settings, StorageSettings

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient, ContainerClient

DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def dev_connection_string(blob_port: int = 10000, queue_port: int = 10001, host: str = "127.0.0.1") -> str:
    """Azurite's well-known account (public, not a secret) on these ports."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{DEV_ACCOUNT};QueueEndpoint=http://{host}:{queue_port}/{DEV_ACCOUNT};"
    )


def expand_connection_string(conn: str) -> str:
    """`UseDevelopmentStorage=true` -> the explicit Azurite connection string the SDK understands."""
    parts = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
    if parts.get("UseDevelopmentStorage", "").strip().lower() == "true":
        return dev_connection_string()
    return conn


def make_credential(storage: StorageSettings) -> Any:
    """Managed identity when the settings say so (with a client id for a user-assigned one), else the default chain."""
    from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

    if (storage.credential or "").lower() == "managedidentity":
        return (
            ManagedIdentityCredential(client_id=storage.client_id) if storage.client_id else ManagedIdentityCredential()
        )
    return DefaultAzureCredential(managed_identity_client_id=storage.client_id)


def make_blob_service(storage: StorageSettings) -> BlobServiceClient:
    from azure.storage.blob.aio import BlobServiceClient

    if storage.connection_string:
        return BlobServiceClient.from_connection_string(expand_connection_string(storage.connection_string))
    assert storage.blob_service_uri  # Settings guarantees one of the two
    return BlobServiceClient(storage.blob_service_uri, credential=make_credential(storage))


class BlobStore:
    """The blob service for one event loop, with containers created once on first use."""

    def __init__(self, settings: Settings, service: BlobServiceClient | None = None) -> None:
        self.settings = settings
        self._service = service
        self._ensured: set[str] = set()
        self._lock = asyncio.Lock()

    @property
    def service(self) -> BlobServiceClient:
        if self._service is None:
            self._service = make_blob_service(self.settings.storage)
        return self._service

    async def container(self, name: str) -> ContainerClient:
        """A container client; the container is created if missing (once per store, i.e. per App)."""
        client = self.service.get_container_client(name)
        if name not in self._ensured:
            from azure.core.exceptions import ResourceExistsError

            async with self._lock:
                if name not in self._ensured:
                    try:
                        await client.create_container()
                    except ResourceExistsError:
                        pass
                    self._ensured.add(name)
        return client

    async def close(self) -> None:
        if self._service is not None:
            await self._service.close()
            self._service = None
