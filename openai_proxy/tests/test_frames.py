"""
The relay's per-message fast path (:class:`openai_proxy.relay._FastFrames`) against Autobahn's own
frame code, in memory: what one side sends, the other receives unchanged, and every frame the fast
path does not take is still checked and refused the way Autobahn refuses it.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.xormasker import create_xor_masker
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.relay import _FastFrames, _xor_mask
from openai_proxy.translate import messages as m


class _Recorder:
    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = code


class FastServer(_Recorder, _FastFrames, WebSocketServerProtocol):
    _incoming_mask_bit = 0x80

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bool]] = []
        self.opened = False
        self.closed: int | None = None


class FastClient(_Recorder, _FastFrames, WebSocketClientProtocol):
    _masks_outgoing = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bool]] = []
        self.opened = False
        self.closed: int | None = None


class PlainServer(_Recorder, WebSocketServerProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bool]] = []
        self.opened = False
        self.closed: int | None = None


class PlainClient(_Recorder, WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bool]] = []
        self.opened = False
        self.closed: int | None = None


def connect(
    test: SynchronousTestCase, server_cls: type, client_cls: type, **options: Any
) -> tuple[Any, Any, iosim.IOPump]:
    """An open WebSocket connection in memory; ``options`` are the server's protocol options
    (failing by a close frame, not a dropped connection, so that close codes can be checked).
    Autobahn schedules its timers on the global reactor, so the connection is dropped at the end
    of the test: that cancels them."""
    options.setdefault("failByDrop", False)
    reactor = MemoryReactorClock()
    server_factory = WebSocketServerFactory(reactor=reactor)
    server_factory.protocol = server_cls
    server_factory.setProtocolOptions(**options)
    client_factory = WebSocketClientFactory("ws://localhost/", reactor=reactor)
    client_factory.protocol = client_cls
    client, server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
    )
    pump.flush()
    assert server.opened and client.opened

    def drop() -> None:
        for protocol in (server, client):
            for name in ("closeHandshakeTimeoutCall", "autoPingPendingCall", "autoPingTimeoutCall"):
                call = getattr(protocol, name, None)
                if call is not None and getattr(call, "_timer", None) is not None:
                    call.cancel()
                setattr(protocol, name, None)
            protocol.transport.abortConnection()
        pump.flush()

    test.addCleanup(drop)
    return server, client, pump


def raw_frame(opcode: int, payload: bytes, *, mask: bytes | None, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask is None:
        return header + payload
    return header + mask + _xor_mask(payload, mask)


SIZES = (0, 1, 125, 126, 127, 1000, 65535, 65536, 70000)


class RoundTripTests(SynchronousTestCase):
    def test_messages_of_every_length_class_arrive_unchanged(self) -> None:
        """Text and binary, each length encoding (7-bit, 16-bit, 64-bit), in both directions and
        against Autobahn's own implementation on the other end, in order."""
        for server_cls, client_cls in (
            (FastServer, FastClient),
            (FastServer, PlainClient),
            (PlainServer, FastClient),
        ):
            server, client, pump = connect(self, server_cls, client_cls)
            sent = []
            for n in SIZES:
                for binary in (False, True):
                    payload = os.urandom(n) if binary else ("é" * (n // 2)).encode()
                    sent.append((payload, binary))
                    client.sendMessage(payload, binary)
                    server.sendMessage(payload, binary)
            pump.flush()
            self.assertEqual(server.received, sent, (server_cls, client_cls))
            self.assertEqual(client.received, sent, (server_cls, client_cls))

    def test_fragmented_and_split_frames_arrive_whole(self) -> None:
        """A message sent in fragments, and frames delivered one byte at a time, go through
        Autobahn's own path and still arrive as one message each."""
        server, client, pump = connect(self, FastServer, FastClient)
        client.sendMessage(b"x" * 5000, True, fragmentSize=700)
        pump.flush()
        wire = raw_frame(1, b'{"type":"KeepAlive"}', mask=b"\x01\x02\x03\x04")
        wire += raw_frame(2, bytes(range(200)), mask=b"\xff\x00\xff\x00")
        for i in range(len(wire)):
            server.dataReceived(wire[i : i + 1])
        self.assertEqual(
            server.received,
            [(b"x" * 5000, True), (b'{"type":"KeepAlive"}', False), (bytes(range(200)), True)],
        )

    def test_client_frames_are_masked_on_the_wire(self) -> None:
        """The client leg masks every frame (RFC 6455 §5.3), with a fresh key each time."""
        server, client, pump = connect(self, FastServer, FastClient)
        written: list[bytes] = []
        original = client.transport.write
        client.transport.write = lambda data: (written.append(data), original(data))
        payload = b"A" * 300
        client.sendMessage(payload, True)
        client.sendMessage(payload, True)
        pump.flush()
        self.assertEqual(len(written), 2)
        for frame in written:
            self.assertEqual(frame[1] & 0x80, 0x80)
            self.assertNotIn(payload[:16], frame)
        self.assertNotEqual(written[0][4:8], written[1][4:8])
        self.assertEqual(server.received, [(payload, True)] * 2)

    def test_data_frames_count_as_traffic_for_the_ping_timeout(self) -> None:
        """As in Autobahn, a data frame received while a ping is pending cancels its timeout."""
        server, client, pump = connect(self, FastServer, PlainClient, autoPingInterval=10, autoPingTimeout=5)
        # What the ping timer does when it fires (cancelled here, so as not to wait for it).
        server.autoPingPendingCall.cancel()
        server.autoPingPendingCall = None
        server._sendAutoPing()
        self.assertIsNotNone(server.autoPingTimeoutCall)
        server.dataReceived(raw_frame(2, b"x", mask=b"abcd"))
        self.assertIsNone(server.autoPingTimeoutCall)
        self.assertEqual(server.received, [(b"x", True)])

    @settings(max_examples=50, deadline=None)
    @given(payload=st.binary(max_size=3000), key=st.binary(min_size=4, max_size=4))
    def test_masking_matches_autobahn(self, payload: bytes, key: bytes) -> None:
        masker = create_xor_masker(key, len(payload))
        self.assertEqual(_xor_mask(payload, key), masker.process(payload) if payload else b"")
        self.assertEqual(_xor_mask(_xor_mask(payload, key), key), payload)

    def test_masking_both_ways_of_computing_it(self) -> None:
        # Lengths around the switch to numpy and every remainder modulo 4.
        key = b"\x12\x34\xab\xcd"
        for n in (1, 2, 3, 4, 5, 1019, 1020, 1021, 1022, 1023, 1024, 1025, 1026, 1027, 1028, 1400, 4099):
            payload = os.urandom(n)
            expected = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            self.assertEqual(_xor_mask(payload, key), expected, n)


class RefusalTests(SynchronousTestCase):
    def test_invalid_utf8_text_closes_1007(self) -> None:
        server, client, pump = connect(self, FastServer, PlainClient)
        client.transport.write(raw_frame(1, b"\xff\xfe not utf-8", mask=b"abcd"))
        pump.flush()
        self.assertEqual(server.received, [])
        self.assertEqual(server.localCloseCode, 1007)

    def test_invalid_utf8_passes_where_validation_is_off(self) -> None:
        """The trusted upstream leg turns validation off; the JSON decoder refuses bad text."""
        server, client, pump = connect(self, FastServer, PlainClient, utf8validateIncoming=False)
        client.transport.write(raw_frame(1, b"\xff", mask=b"abcd"))
        pump.flush()
        self.assertEqual(server.received, [(b"\xff", False)])

    def test_unmasked_client_frame_is_a_protocol_violation(self) -> None:
        server, client, pump = connect(self, FastServer, PlainClient)
        client.transport.write(raw_frame(2, b"audio", mask=None))
        pump.flush()
        self.assertEqual(server.received, [])
        self.assertEqual(server.localCloseCode, 1002)

    def test_masked_server_frame_is_a_protocol_violation(self) -> None:
        server, client, pump = connect(self, PlainServer, FastClient)
        client.failByDrop = False
        server.transport.write(raw_frame(2, b"audio", mask=b"abcd"))
        pump.flush()
        self.assertEqual(client.received, [])
        self.assertEqual(client.localCloseCode, 1002)

    def test_non_minimal_length_is_a_protocol_violation(self) -> None:
        server, client, pump = connect(self, FastServer, PlainClient)
        client.transport.write(b"\x82\xfe\x00\x05abcd" + _xor_mask(b"hello", b"abcd"))
        pump.flush()
        self.assertEqual(server.received, [])
        self.assertEqual(server.localCloseCode, 1002)

    def test_frame_over_the_limit_closes_1009(self) -> None:
        server, client, pump = connect(self, FastServer, PlainClient, maxFramePayloadSize=1000,
                                       failByDrop=False)
        client.sendMessage(bytes(999), True)
        client.sendMessage(bytes(1001), True)
        pump.flush()
        self.assertEqual(server.received, [(bytes(999), True)])
        self.assertEqual(server.localCloseCode, 1009)

    def test_reserved_bits_and_opcodes_are_refused(self) -> None:
        for first in (0xC2, 0x83):  # RSV1 set; reserved data opcode 3
            server, client, pump = connect(self, FastServer, PlainClient)
            client.transport.write(bytes((first, 0x80 | 1)) + b"abcd" + b"x")
            pump.flush()
            self.assertEqual(server.received, [], hex(first))
            self.assertEqual(server.localCloseCode, 1002, hex(first))


class TimerTests(SynchronousTestCase):
    def test_a_lost_connection_leaves_no_closing_handshake_timer(self) -> None:
        """A side that sent its close and lost the connection before the answer cancels the
        closing-handshake timer (Autobahn itself leaves it to fire)."""
        server, client, pump = connect(self, FastServer, PlainClient, closeHandshakeTimeout=2.0)
        client.dataReceived = lambda data: None  # the peer never answers the close
        server.sendClose(1000)
        pump.flush()
        call = server.closeHandshakeTimeoutCall
        self.assertIsNotNone(call)
        server.transport.abortConnection()
        pump.flush()
        self.assertIsNone(server.closeHandshakeTimeoutCall)
        self.assertIsNone(call._timer)  # txaio's mark of a cancelled batched call


class AppendEncodingTests(SynchronousTestCase):
    @settings(max_examples=50, deadline=None)
    @given(audio=st.binary(max_size=2000), seq=st.integers(min_value=0, max_value=10**9))
    def test_append_template_is_json_dumps(self, audio: bytes, seq: int) -> None:
        """The bytes template gives exactly what json.dumps gives for the same event."""
        import base64

        event = m.input_audio_append(f"append_1b43fdbb_{seq}", base64.b64encode(audio).decode())
        self.assertEqual(m.encode_event(event), json.dumps(event, separators=(",", ":")).encode())

    def test_other_events_and_odd_ids_use_json(self) -> None:
        for event in (
            m.input_audio_append('a"b\\c', "AAAA"),
            m.input_audio_append("ü", "AAAA"),
            {"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "x"},
            m.response_cancel("cancel_1"),
            m.session_update("s_1", {"instructions": "say \"hi\" ü"}),
        ):
            self.assertEqual(
                m.encode_event(event), json.dumps(event, separators=(",", ":")).encode("utf-8")
            )
