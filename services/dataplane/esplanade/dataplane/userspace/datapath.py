"""The userspace datapath of one node: detects offloads, builds the TUN and the outer sockets,
configures links and routes, and runs the workers. The crypto room comes in as a factory.

    datapath = UserspaceDatapath(settings, transform_factory)
    datapath.start()          # raises DatapathStartError, leaving nothing behind
    datapath.status()         # offloads detected and used, MTUs, per-worker counters
    datapath.stop()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from esplanade.dataplane.kernel.socket_options import bypass_ipsec
from esplanade.dataplane.userspace.handoff import Mailbox, mailbox_pairs
from esplanade.dataplane.userspace.loop import DEFAULT_BATCH, LoopParts
from esplanade.dataplane.userspace.mtu import (
    DfPolicy,
    IcmpErrorSender,
    MssClamp,
    MtuGuard,
    inner_mtu,
    opaque_overhead,
    outer_df_option,
)
from esplanade.dataplane.userspace.netconfig import LinkConfigurator, NetConfigError, TunLinkConfig
from esplanade.dataplane.userspace.offloads import (
    DatapathFeatures,
    OffloadReport,
    TunOffloadMode,
    choose_features,
    detect_offloads,
    probe_tun_offloads,
)
from esplanade.dataplane.userspace.outer_transport import OuterTransport
from esplanade.dataplane.userspace.raw_esp import RawEspSettings, RawEspSocket
from esplanade.dataplane.userspace.transform import PacketTransform, WorkerContext
from esplanade.dataplane.userspace.tun import MAX_FRAME, TunDevice, TunError, TunOffload, TunSettings
from esplanade.dataplane.userspace.udp_socket import NAT_T_PORT, EspUdpSocket, UdpSocketSettings
from esplanade.dataplane.userspace.vnet_header import VNET_HDR_LEN
from esplanade.dataplane.userspace.worker import WorkerPool, steering_of

log = logging.getLogger(__name__)

TransformFactory = Callable[[WorkerContext], PacketTransform]


class OuterKind(Enum):
    UDP = "udp"  # ESP-in-UDP on 4500 (RFC 3948)
    RAW = "raw"  # plain ESP, IP protocol 50


class DatapathStartError(RuntimeError):
    """The datapath could not start; everything it had created is released."""


@dataclass(frozen=True, slots=True)
class DatapathSettings:
    tun_name: str = "esp0"
    workers: int = 1
    outer: OuterKind = OuterKind.UDP
    bind_address: str = "0.0.0.0"
    port: int = NAT_T_PORT
    path_mtu: int = 1500  # MTU of the outer path toward the peers
    tun_mtu: int = 0  # 0: the inner MTU; larger values make MtuGuard enforce the inner MTU
    offloads: bool = True  # False: the plain path (no vnet header, no GSO/GRO), for fallback and comparison
    tun_offload_mode: TunOffloadMode = TunOffloadMode.NONE
    mss_clamp: bool = True
    outer_df: DfPolicy | None = None  # None: the kernel default (IP_PMTUDISC_WANT)
    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    route_source_v4: str = ""
    route_source_v6: str = ""
    txqlen: int = 1000
    batch: int = DEFAULT_BATCH
    pin_cpus: bool = False
    # SCHED_FIFO priority for the workers (0: normal scheduling). On a busy host this turns
    # wake-up latency from milliseconds into tens of µs; the kernel's RT throttling still
    # leaves 5 % of each CPU to everyone else.
    realtime_priority: int = 0
    icmp_rate: float = 100.0
    diagnostic_transform: bool = False  # must be set to run a test-only transform (pass-through)
    # outer=UDP only: also carry plain ESP (IP protocol 50) on a raw socket in every worker.
    plain_esp: bool = False
    # IKE that arrives on the UDP socket goes to the parent (the dataplane service relays it).
    forward_ike: bool = False
    # Exempt the outer sockets from XFRM policies (the inbound cleartext guard installs some).
    ipsec_bypass: bool = False


@dataclass(slots=True)
class DatapathSizes:
    esp_overhead: int
    path_mtu: int
    inner_mtu: int
    tun_mtu: int

    def as_dict(self) -> dict[str, int]:
        return {
            "esp_overhead": self.esp_overhead,
            "path_mtu": self.path_mtu,
            "inner_mtu": self.inner_mtu,
            "tun_mtu": self.tun_mtu,
        }


class UserspaceDatapath:
    def __init__(self, settings: DatapathSettings, transform_factory: TransformFactory) -> None:
        self.settings = settings
        self.transform_factory = transform_factory
        self.report: OffloadReport | None = None
        self.features: DatapathFeatures | None = None
        self.sizes: DatapathSizes | None = None
        self.device: TunDevice | None = None
        self.pool = WorkerPool()
        self._outers: list[OuterTransport | None] = []
        self._raw_outers: list[OuterTransport | None] = []  # plain ESP next to UDP (settings.plain_esp)
        self._mailboxes: list[Mailbox] = []

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._start()
        except (OSError, NetConfigError, ValueError) as exc:
            self.stop()
            raise DatapathStartError(f"userspace datapath did not start: {exc}") from None

    def _start(self) -> None:
        s = self.settings
        if s.workers < 1:
            raise ValueError("at least one worker")
        if not 0 <= s.realtime_priority <= 99:
            raise ValueError("realtime_priority must be 0 (off) or 1..99")
        ipaddress.ip_address(s.bind_address)
        # one throw-away instance tells the overhead (and whether it is a test-only transform)
        probe = self.transform_factory(WorkerContext(0, s.workers))
        if getattr(probe, "diagnostic_only", False) and not s.diagnostic_transform:
            raise ValueError("a diagnostic transform needs diagnostic_transform=True; it protects nothing")
        overhead = probe.esp_overhead()
        outer_v6 = ipaddress.ip_address(s.bind_address).version == 6
        exact = getattr(probe, "inner_mtu", None)  # a transform that knows its padding rule says so
        if callable(exact):
            inner = int(exact(s.path_mtu, s.outer is OuterKind.UDP, outer_v6))
        else:
            inner = inner_mtu(s.path_mtu, opaque_overhead(overhead, s.outer is OuterKind.UDP, outer_v6))
        del probe
        tun_mtu = s.tun_mtu or inner
        self.sizes = DatapathSizes(overhead, s.path_mtu, inner, tun_mtu)

        self.report = detect_offloads(probe_tun=False)
        features = choose_features(
            self.report, want_offloads=s.offloads, tun_mode=s.tun_offload_mode, workers=s.workers
        )
        self.device = TunDevice.create(
            TunSettings(name=s.tun_name, queues=s.workers, vnet_hdr=features.vnet_hdr, multi_queue=s.workers > 1),
            read_size=tun_mtu + VNET_HDR_LEN,
        )
        if features.vnet_hdr:
            probe_tun_offloads(self.device, self.report)
            # the probe may have found less than TUNGETFEATURES promised: decide again
            features = choose_features(
                self.report, want_offloads=s.offloads, tun_mode=s.tun_offload_mode, workers=s.workers
            )
            try:
                self.device.set_offload(features.tun_offload)
            except TunError as exc:
                self.report.notes.append(f"TUNSETOFFLOAD {features.tun_offload!r} failed: {exc}; offloads off")
                self.device.set_offload(TunOffload.NONE)
                features = replace(
                    features, tun_offload=TunOffload.NONE, reasons=(*features.reasons, "TUNSETOFFLOAD failed")
                )
        self.features = features
        if int(features.tun_offload):
            for queue in self.device.queues:  # super-packets: up to 64 KiB per read
                queue.set_read_size(MAX_FRAME)

        with LinkConfigurator() as links:
            links.configure_tun(
                TunLinkConfig(
                    name=s.tun_name,
                    mtu=tun_mtu,
                    txqlen=s.txqlen,
                    addresses=s.addresses,
                    routes=s.routes,
                    route_source_v4=s.route_source_v4,
                    route_source_v6=s.route_source_v6,
                )
            )
        self._open_outer_sockets(features)
        if s.workers > 1:
            self._mailboxes = self._make_mailboxes(s.workers)
        self.pool.spawn(
            s.workers,
            self._build_parts,
            self._mailboxes or None,
            self._close_worker_fds_in_parent,
            pin_cpus=s.pin_cpus,
            realtime_priority=s.realtime_priority,
        )
        for mailbox in self._mailboxes:
            mailbox.close()
        self._mailboxes = []

    def _open_outer_sockets(self, features: DatapathFeatures) -> None:
        s = self.settings
        for index in range(s.workers):
            outer: OuterTransport
            if s.outer is OuterKind.UDP:
                udp = EspUdpSocket.open(
                    UdpSocketSettings(
                        bind_address=s.bind_address,
                        port=s.port,
                        gso=features.udp_gso,
                        gro=features.udp_gro,
                        reuseport=s.workers > 1,
                        local_address_info=s.forward_ike,
                    )
                )
                outer = udp
                if s.plain_esp:
                    raw_extra: RawEspSocket | None = RawEspSocket.open(RawEspSettings(bind_address=s.bind_address))
                    assert raw_extra is not None
                    self._raw_outers.append(raw_extra)
                    if s.workers > 1:
                        raw_extra.attach_spi_filter(s.workers, index)
                if s.workers > 1 and index == s.workers - 1:
                    # the group is complete: steer it by SPI (the program belongs to the group)
                    udp.attach_spi_steering(s.workers)
            else:
                raw = RawEspSocket.open(RawEspSettings(bind_address=s.bind_address))
                if s.workers > 1:
                    raw.attach_spi_filter(s.workers, index)
                outer = raw
            if s.ipsec_bypass:
                self._bypass(outer)
                extra_socket = self._raw_outers[index] if index < len(self._raw_outers) else None
                if extra_socket is not None:
                    self._bypass(extra_socket)
            if s.outer_df is not None and ipaddress.ip_address(s.bind_address).version == 4:
                outer.set_socket_option(*outer_df_option(s.outer_df))
                extra = self._raw_outers[index] if index < len(self._raw_outers) else None
                if extra is not None:
                    extra.set_socket_option(*outer_df_option(s.outer_df))
            self._outers.append(outer)

    @staticmethod
    def _bypass(outer: OuterTransport) -> None:
        sock = getattr(outer, "sock", None)
        if sock is None:
            return
        try:
            bypass_ipsec(sock)
        except OSError as exc:  # no XFRM here: then there are no policies to be exempt from
            log.info("outer socket keeps the IPsec policies: %s", exc.strerror)

    @staticmethod
    def _make_mailboxes(count: int) -> list[Mailbox]:
        pairs = mailbox_pairs(count)
        return [Mailbox(k, pairs[k][0], [pairs[j][1] if j != k else None for j in range(count)]) for k in range(count)]

    def _close_worker_fds_in_parent(self, index: int) -> None:
        for outers in (self._outers, self._raw_outers):
            outer = outers[index] if index < len(outers) else None
            if outer is not None:
                outer.close()
                outers[index] = None

    def _build_parts(self, context: WorkerContext, control: socket.socket, mailbox: Mailbox | None) -> LoopParts:
        """Runs in the child: keep this worker's descriptors, release the others, build the transform."""
        s = self.settings
        assert self.device is not None and self.features is not None and self.sizes is not None
        for outers in (self._outers, self._raw_outers):
            for index, other in enumerate(outers):
                if index != context.index and other is not None:
                    other.close()
        outer = self._outers[context.index]
        raw_outer = self._raw_outers[context.index] if context.index < len(self._raw_outers) else None
        if outer is None:
            raise DatapathStartError(f"worker {context.index} has no outer socket")
        tun = self.device.queues[context.index]
        for index, queue in enumerate(self.device.queues):
            if index != context.index:
                queue.close()
        transform = self.transform_factory(context)
        sizes = self.sizes
        guard = MtuGuard(sizes.inner_mtu, icmp_rate=s.icmp_rate) if sizes.tun_mtu > sizes.inner_mtu else None
        return LoopParts(
            index=context.index,
            count=context.count,
            tun=tun,
            outer=outer,
            transform=transform,
            features=self.features,
            steering=steering_of(transform, context.count) if context.count > 1 else None,
            mailbox=mailbox,
            control=control,
            mtu_guard=guard,
            mss_clamp=MssClamp(sizes.inner_mtu) if s.mss_clamp else None,
            icmp=IcmpErrorSender() if guard is not None else None,
            raw_outer=raw_outer,
            forward_ike=s.forward_ike,
            batch=s.batch,
        )

    # -- run ------------------------------------------------------------------------------
    def failed_workers(self) -> list[int]:
        """Workers that exited on their own; the caller should stop the datapath (fail closed)."""
        self.pool.reap()
        return [h.index for h in self.pool.workers if h.exit_status is not None]

    def status(self) -> dict[str, object]:
        return {
            "backend": "userspace",
            "tun": self.settings.tun_name,
            "outer": self.settings.outer.value + ("+raw" if self.settings.plain_esp else ""),
            "workers": self.settings.workers,
            "offloads_detected": self.report.as_dict() if self.report else None,
            "offloads_used": self.features.as_dict() if self.features else None,
            "sizes": self.sizes.as_dict() if self.sizes else None,
            "worker_status": self.pool.status(),
            "failed_workers": self.failed_workers(),
        }

    def stop(self) -> None:
        self.pool.stop()
        for index in range(len(self._outers)):
            self._close_worker_fds_in_parent(index)
        for mailbox in self._mailboxes:
            mailbox.close()
        self._mailboxes = []
        if self.device is not None:
            self.device.close()
            self.device = None
