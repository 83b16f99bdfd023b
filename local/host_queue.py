"""The queue trigger: poll, decode, invoke, delete; retry via visibility; poison after maxDequeueCount.

Like the Functions queue extension: message text is base64 (host.json `messageEncoding`, default
base64); a failed message becomes visible again after `visibilityTimeout` (default 0) and is
retried until its dequeue count reaches `maxDequeueCount` (default 5), then it is copied to
`<queue>-poison` and deleted. At most `batchSize` messages of one queue run at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage

from local.host_blob import InvocationLogger
from local.host_loader import LoadedFunction, stop_listener
from local.host_storage import StorageConnection

log = logging.getLogger("local.host")

MAX_VISIBILITY_S = 7 * 24 * 3600


@dataclass
class QueueTriggerListener:
    """Polls one queue for one function."""

    fn: LoadedFunction
    queue_name: str
    storage: StorageConnection
    max_dequeue_count: int
    batch_size: int
    retry_visibility_s: float
    message_encoding: str
    poll_interval_s: float
    timeout_s: float | None
    log_invocation: InvocationLogger
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _poller: asyncio.Task[None] | None = field(default=None, repr=False)
    _ready: bool = field(default=False, repr=False)

    @property
    def poison_queue_name(self) -> str:
        return f"{self.queue_name}-poison"

    @property
    def lease_s(self) -> int:
        """How long a received message stays invisible while it runs (longer than any invocation)."""
        base = self.timeout_s if self.timeout_s is not None else 3600.0
        return int(min(MAX_VISIBILITY_S, base + 60))

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop(), name=f"queue-poll:{self.fn.spec.name}")

    async def stop(self, grace_s: float) -> None:
        await stop_listener(self._poller, self._tasks, grace_s)

    def _queue(self, name: str) -> Any:
        return self.storage.queue_service().get_queue_client(name)

    async def poll_once(self) -> int:
        """Receive up to the free batch capacity and start each message; returns how many."""
        if not self._ready:
            await _ensure_queue(self._queue(self.queue_name))
            self._ready = True
        free = self.batch_size - len(self._tasks)
        if free <= 0:
            return 0
        started = 0
        pages = self._queue(self.queue_name).receive_messages(
            messages_per_page=min(32, free), visibility_timeout=self.lease_s, max_messages=free
        )
        async for msg in pages:
            task = asyncio.create_task(self._process(msg), name=f"queue:{self.fn.spec.name}:{msg.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def _poll_loop(self) -> None:
        failing = False
        while True:
            started = 0
            try:
                started = await self.poll_once()
                if failing:
                    log.info("queue trigger %s: storage reachable again", self.fn.spec.name)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning(
                        "queue trigger %s: cannot read queue %s (%s); retrying every %.1fs",
                        self.fn.spec.name,
                        self.queue_name,
                        type(e).__name__,
                        self.poll_interval_s,
                    )
                failing = True
            if started == 0:
                await asyncio.sleep(self.poll_interval_s)
            else:
                await asyncio.sleep(0)

    def _decode(self, text: str) -> bytes:
        if self.message_encoding == "none":
            return text.encode("utf-8")
        return base64.b64decode(text.encode("ascii"), validate=True)

    async def _to_poison(self, msg: Any, reason: str) -> None:
        poison = self._queue(self.poison_queue_name)
        try:
            await poison.send_message(msg.content)
        except ResourceNotFoundError:
            await _ensure_queue(poison)
            await poison.send_message(msg.content)
        await self._queue(self.queue_name).delete_message(msg)
        log.error(
            "queue trigger %s: message %s moved to %s (%s)", self.fn.spec.name, msg.id, self.poison_queue_name, reason
        )

    async def _process(self, msg: Any) -> None:
        try:
            await self._process_inner(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Storage trouble: the message becomes visible again when its lease expires.
            log.exception("queue trigger %s: error handling message %s", self.fn.spec.name, msg.id)

    async def _process_inner(self, msg: Any) -> None:
        try:
            body = self._decode(msg.content or "")
        except (binascii.Error, ValueError, UnicodeEncodeError):
            await self._to_poison(msg, f"message is not valid {self.message_encoding}")
            return
        message = QueueMessage(
            id=msg.id,
            body=body,
            dequeue_count=msg.dequeue_count,
            expiration_time=msg.expires_on,
            insertion_time=msg.inserted_on,
            time_next_visible=msg.next_visible_on,
            pop_receipt=msg.pop_receipt,
        )
        error = await self.fn.invoke_logged(
            message,
            trigger="queue",
            detail=f"{self.queue_name} id={msg.id} dequeue_count={msg.dequeue_count}/{self.max_dequeue_count}",
            timeout_s=self.timeout_s,
            log_invocation=self.log_invocation,
        )
        queue = self._queue(self.queue_name)
        if error is None:
            try:
                await queue.delete_message(msg)
            except ResourceNotFoundError:
                pass  # its lease ran out and someone else took it; nothing to delete
            return
        if (msg.dequeue_count or 0) >= self.max_dequeue_count:
            await self._to_poison(msg, f"failed {msg.dequeue_count} times")
            return
        await queue.update_message(msg, visibility_timeout=int(self.retry_visibility_s))


async def _ensure_queue(queue: Any) -> None:
    try:
        await queue.create_queue()
    except ResourceExistsError:
        pass
