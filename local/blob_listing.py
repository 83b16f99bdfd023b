"""A cheap listing for the local host's blob poller: (name, ETag) of each blob, nothing else.

`ContainerClient.list_blobs` turns every listed blob into a BlobProperties through the SDK's generic
XML model (~0.3 ms of CPU per blob): the poller of a container of a few hundred blobs spent most of
the host's CPU there. The poller needs two fields, so this reads them from the raw XML page the way
the SDK's own `list_blob_names` does (its names-only pager and deserializer, which are not public;
an SDK upgrade that moves them fails tests/test_local_host.py, which polls through this).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

from azure.core.async_paging import AsyncItemPaged
from azure.storage.blob._list_blobs_helper import IgnoreListBlobsDeserializer
from azure.storage.blob.aio import ContainerClient
from azure.storage.blob.aio._list_blobs_helper import BlobNamesPaged


class _VersionsPaged(BlobNamesPaged):
    """The SDK's names-only pager, returning (name, ETag) pairs instead of names."""

    async def _extract_data_cb(self, get_next_return: Any) -> tuple[str | None, list[tuple[str, str]]]:
        next_marker, _ = await super()._extract_data_cb(get_next_return)
        page = []
        for blob in self._response.iterfind("Blobs/Blob"):
            name_el = blob.find("Name")
            name = name_el.text or "" if name_el is not None else ""
            if name_el is not None and (name_el.get("Encoded") or "").lower() == "true":
                name = unquote(name)  # names with characters XML cannot carry come percent-encoded
            page.append((name, blob.findtext("Properties/Etag") or ""))
        return next_marker, page


def list_versions(container: ContainerClient, prefix: str | None = None) -> AsyncIterator[tuple[str, str]]:
    """(name, unquoted ETag) of every blob under `prefix`, following continuation tokens."""
    client = container._build_generated_client()
    client.container._deserialize = IgnoreListBlobsDeserializer()  # the page is read raw, as list_blob_names does
    command = functools.partial(client.container.list_blob_flat_segment)
    return AsyncItemPaged(
        command, prefix=prefix, container=container.container_name, page_iterator_class=_VersionsPaged
    )
