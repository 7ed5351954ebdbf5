from __future__ import annotations

from esplanade.dataplane.userspace.handoff import Mailbox, mailbox_pairs


def test_packets_reach_the_owner_mailbox_intact() -> None:
    pairs = mailbox_pairs(3)
    boxes = [Mailbox(k, pairs[k][0], [pairs[j][1] if j != k else None for j in range(3)]) for k in range(3)]
    try:
        boxes[0].send_outbound(2, b"inner packet")
        boxes[1].send_inbound(2, (("fd18::2", 4500), b"\x00\x00\x10\x01esp"))
        boxes[1].send_inbound(2, (("198.18.0.1", 0), b"\x00\x00\x10\x03esp"))
        boxes[0].send_outbound(0, b"to myself")  # no outbox to oneself: a counted drop
        boxes[0].send_outbound(7, b"nobody")
        outbound, inbound = boxes[2].drain(64)
        assert outbound == [b"inner packet"]
        assert inbound == [(("fd18::2", 4500), b"\x00\x00\x10\x01esp"), (("198.18.0.1", 0), b"\x00\x00\x10\x03esp")]
        assert boxes[0].drops["no_such_worker"] == 2
        assert boxes[2].drain(64) == ([], [])
        pairs[1][1].send(b"I\x09short")  # malformed: host length beyond the message
        pairs[1][1].send(b"Zjunk")
        assert boxes[1].drain(8) == ([], []) and boxes[1].drops["malformed"] == 2
    finally:
        for inbox, outbox in pairs:
            inbox.close()
            outbox.close()
