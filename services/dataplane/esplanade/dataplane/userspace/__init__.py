"""The userspace ESP datapath: TUN, UDP/raw-ESP sockets and workers around a pluggable crypto room.

Rooms (wireguard-go style, batched doors): `tun` (TUN queues), `udp_socket` / `raw_esp`
(outer sockets), `transform` (the door the ESP engine implements), `loop` / `worker`
(epoll drain loop, multi-queue worker processes), `datapath` (assembly and start-up).
"""
