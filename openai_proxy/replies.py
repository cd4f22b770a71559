"""
Agent audio delivery and barge-in accounting (SPEC §5, §6).

The client plays a reply's audio in order, at real time, from its first frame.  This module counts what
was delivered for each output item of the reply, in delivery order, and on barge-in works out what the
user heard: the item being heard is truncated at the heard position, never closer than a margin to the
end of its delivered audio (the upstream counts slightly less audio than was delivered and refuses a
truncate past its end), and later items of which nothing was heard are deleted from the conversation.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from openai_proxy.audio import OutputConverter
from openai_proxy.outputs import Emitter
from openai_proxy.translate import messages as m

#: How far before the end of an item's delivered audio a truncate stays (ms).  The upstream counts an
#: item's audio a little shorter than the daemon delivered (85 ms was seen) and refuses a truncate past
#: its end ("already shorter").
TRUNCATE_MARGIN_MS = 150


@dataclass
class DeliveredItem:
    """Agent audio of one output item as delivered to the client."""

    item_id: str
    delivered_ms: float = 0.0
    done: bool = False


class Replies:
    """The reply being delivered: its response, its items in order, and when it started playing."""

    def __init__(self, emitter: Emitter, now: Callable[[], float], output: OutputConverter,
                 upstream_bytes_per_ms: float) -> None:
        self._emit = emitter
        self._now = now
        self._output = output
        self._bytes_per_ms = upstream_bytes_per_ms
        self.response_id: str | None = None
        self.items: list[DeliveredItem] = []
        #: Item ids the response announced (``output_item.added``) that have no audio yet.
        self.announced: list[str] = []
        self.started_at = 0.0
        #: Whether an item's audio is still streaming to the client.
        self.streaming = False
        #: Responses whose audio is never forwarded (again): ended or interrupted.
        self.silenced: deque[str] = deque(maxlen=64)
        self.agent_spoke = False
        #: After :meth:`barge_in`: what the client heard of each item of the interrupted reply, as a share
        #: of the audio it was sent (0.0: nothing, the item was deleted); items heard in full are absent.
        self.heard: dict[str, float] = {}

    def current(self) -> DeliveredItem | None:
        return self.items[-1] if self.items and not self.items[-1].done else None

    def announce(self, response_id: str, item_id: str) -> None:
        if response_id not in self.silenced and item_id not in self.announced:
            self.announced.append(item_id)

    def deliver(self, response_id: str, item_id: str, data: bytes,
                started: Callable[[], None]) -> None:
        """Forward ``data`` (upstream format) of ``item_id``; ``started`` runs before a reply's first audio."""
        if response_id in self.silenced or not data:
            return
        if self.response_id != response_id:
            self._new_reply(response_id)
        item = self.current()
        if item is None or item.item_id != item_id:
            if item is not None:
                self.finish_item()
            if not self.items:
                self.started_at = self._now()
                self.agent_spoke = True
                started()
            header = self._output.reply_header()
            if header:
                self._emit.audio(header)
            item = DeliveredItem(item_id)
            self.items.append(item)
            if item_id in self.announced:
                self.announced.remove(item_id)
            self.streaming = True
        item.delivered_ms += len(data) / self._bytes_per_ms
        converted = self._output.feed(data)
        if converted:
            self._emit.audio(converted)

    def _new_reply(self, response_id: str) -> None:
        if self.current() is not None:
            self.finish_item()
        self.response_id = response_id
        self.items = []
        self.announced = []

    def finish_item(self, item_id: str | None = None) -> None:
        """The item's audio ended: flush the converter, then ``AgentAudioDone``."""
        item = self.current()
        if item is None or (item_id is not None and item.item_id != item_id):
            return
        tail = self._output.end_reply()
        if tail:
            self._emit.audio(tail)
        item.done = True
        self.streaming = False
        self._emit.client(m.simple("AgentAudioDone"))

    def response_ended(self, response_id: str) -> None:
        if self.response_id == response_id:
            self.finish_item()
            self.announced = []
        if response_id not in self.silenced:
            self.silenced.append(response_id)

    @property
    def playing(self) -> bool:
        """Whether the client may still be playing (or receiving) this reply's audio."""
        if not self.items:
            return False
        if self.current() is not None:
            return True
        total = sum(i.delivered_ms for i in self.items)
        return (self._now() - self.started_at) * 1000.0 < total

    def barge_in(self, response_id: str | None) -> list[str]:
        """
        Stop the reply: no more of its audio reaches the client; truncate the item being heard and
        delete later unheard items (SPEC §6).  ``response_id`` is the response in progress, if any.
        Returns the event ids of the housekeeping events sent.
        """
        sent: list[str] = []
        self.heard = {}
        for silenced in (response_id, self.response_id):
            if silenced is not None and silenced not in self.silenced:
                self.silenced.append(silenced)
        streaming = self.current()
        # The upstream holds more of a streaming item than was delivered: it is cut even if heard.
        cut_short = streaming.item_id if streaming is not None else None
        if streaming is not None:
            # Audio still inside the resampler never reached the client.
            streaming.delivered_ms = min(streaming.delivered_ms, self._output.emitted_ms)
            self._output.discard_reply()
            self.streaming = False
        heard_ms = max(0.0, (self._now() - self.started_at) * 1000.0) if self.items else 0.0
        before = 0.0
        heard_item_seen = False
        for item in self.items:
            if heard_item_seen:
                sent.append(self._delete(item.item_id))
                self.heard[item.item_id] = 0.0
                continue
            if heard_ms >= before + item.delivered_ms and item.item_id != cut_short:
                before += item.delivered_ms
                continue  # heard in full
            heard_item_seen = True
            # (1e-6: a whole millisecond computed from float seconds must not lose one.)
            end_ms = math.floor(min(item.delivered_ms - TRUNCATE_MARGIN_MS, heard_ms - before) + 1e-6)
            if end_ms > 0:
                event_id = self._emit.next_id("truncate")
                self._emit.upstream(m.item_truncate(event_id, item.item_id, end_ms))
                self._emit.log("debug", "truncated {item_id} at {audio_end_ms} ms",
                               item_id=item.item_id, audio_end_ms=end_ms)
                sent.append(event_id)
                self.heard[item.item_id] = min(1.0, end_ms / item.delivered_ms)
            elif before > 0:
                sent.append(self._delete(item.item_id))
                self.heard[item.item_id] = 0.0
        for item_id in self.announced if self.items else ():
            sent.append(self._delete(item_id))
            self.heard[item_id] = 0.0
        self.items = []
        self.announced = []
        self.response_id = None
        return sent

    def _delete(self, item_id: str) -> str:
        event_id = self._emit.next_id("delete")
        self._emit.upstream(m.item_delete(event_id, item_id))
        self._emit.log("debug", "deleted unheard item {item_id}", item_id=item_id)
        return event_id
