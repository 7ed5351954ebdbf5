"""Micro-benchmark of the ESP engine: microseconds per packet, per transform.

    .venv/bin/python bench/esp_engine.py [--size 1400] [--batch 64] [--rounds 200] [--json]

Tunnel mode, IPv4, ESP payloads (`encrypt_batch` / `decrypt_batch`, the UDP-socket shape),
inner packets of `--size` bytes. Also times `protect`/`unprotect` (whole packets) for the
AEAD default, and AH. Prints the best of 5 repetitions of process CPU time (the machine
is shared; wall time is noisier).
"""

from __future__ import annotations

import argparse
import json
import time

from esplanade.dataplane.esp import InboundSa, OutboundSa, decrypt_batch, encrypt_batch, protect_batch, unprotect_batch
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_AES_CBC_256,
    ENCR_AES_GCM_16_128,
    ENCR_AES_GCM_16_256,
    ENCR_CHACHA20_POLY1305,
    ENCR_NULL,
    INTEG_HMAC_SHA2_256_128,
    INTEG_HMAC_SHA2_512_256,
    Direction,
    EncrAlgorithm,
    IntegAlgorithm,
    IpProto,
)

TRANSFORMS: list[tuple[str, IpProto, EncrAlgorithm | None, IntegAlgorithm | None]] = [
    ("aes128gcm16", IpProto.ESP, ENCR_AES_GCM_16_128, None),
    ("aes256gcm16", IpProto.ESP, ENCR_AES_GCM_16_256, None),
    ("chacha20poly1305", IpProto.ESP, ENCR_CHACHA20_POLY1305, None),
    ("aes128-sha256", IpProto.ESP, ENCR_AES_CBC_128, INTEG_HMAC_SHA2_256_128),
    ("aes256-sha512", IpProto.ESP, ENCR_AES_CBC_256, INTEG_HMAC_SHA2_512_256),
    ("null-sha256", IpProto.ESP, ENCR_NULL, INTEG_HMAC_SHA2_256_128),
    ("ah-sha256", IpProto.AH, None, INTEG_HMAC_SHA2_256_128),
]


def inner_packet(size: int) -> bytes:
    header = bytearray.fromhex("45000000000040004011" + "0000" + "0a010001" + "0a020001")
    header[2:4] = size.to_bytes(2, "big")
    udp = (40000).to_bytes(2, "big") + (5201).to_bytes(2, "big") + (size - 20).to_bytes(2, "big") + b"\x00\x00"
    return bytes(header) + udp + bytes(size - 28)


def make_pair(proto: IpProto, encr: EncrAlgorithm | None, integ: IntegAlgorithm | None) -> tuple[OutboundSa, InboundSa]:
    kw = {
        "spi": 0x1000,
        "src": "192.0.2.1",
        "dst": "198.51.100.2",
        "protocol": proto,
        "encr": encr,
        "encr_key": bytes(range(encr.keymat_bytes)) if encr else b"",
        "integ": integ,
        "integ_key": bytes(range(integ.key_bytes)) if integ else b"",
        "replay_window": 1024,
    }
    out = OutboundSa(SecurityAssociation(direction=Direction.OUT, **kw), 0.0, reserved_upto=1 << 31)  # type: ignore[arg-type]
    inb = InboundSa(SecurityAssociation(direction=Direction.IN, **kw), 0.0)  # type: ignore[arg-type]
    return out, inb


def best_us_per_packet(run: object, packets: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()  # CPU time: steadier than wall time on a shared machine
        run()  # type: ignore[operator]
        best = min(best, time.process_time() - t0)
    return best / packets * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    packet = inner_packet(args.size)
    batch = [packet] * args.batch
    n = args.batch * args.rounds
    results: dict[str, dict[str, float]] = {}
    # The bare AEAD call on the same bytes, as a yardstick for machine load: engine overhead
    # is the difference.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, nonce, aad, pt = AESGCM(bytes(16)), bytes(12), bytes(8), packet + bytes(4)
    ct = aead.encrypt(nonce, pt, aad)

    def raw_enc() -> None:
        for _ in range(n):
            aead.encrypt(nonce, pt, aad)

    def raw_dec() -> None:
        for _ in range(n):
            aead.decrypt(nonce, ct, aad)

    results["(bare AESGCM call, no engine)"] = {
        "encrypt_us": best_us_per_packet(raw_enc, n),
        "decrypt_us": best_us_per_packet(raw_dec, n),
    }
    for name, proto, encr, integ in TRANSFORMS:
        sender, receiver = make_pair(proto, encr, integ)
        if proto == IpProto.ESP:
            # pre-encrypt enough packets for all repetitions (each is accepted once)
            wire = [encrypt_batch(sender, batch, 0.0) for _ in range(args.rounds * 6)]

            def enc(sender: OutboundSa = sender) -> None:
                for _ in range(args.rounds):
                    encrypt_batch(sender, batch, 0.0)

            it = iter(wire)

            def dec(receiver: InboundSa = receiver, it: object = it) -> None:
                for _ in range(args.rounds):
                    out = decrypt_batch(receiver, next(it), 0.0)  # type: ignore[call-overload]
                    assert len(out) == args.batch

            results[name] = {"encrypt_us": best_us_per_packet(enc, n), "decrypt_us": best_us_per_packet(dec, n)}
        if proto == IpProto.AH or name == "aes128gcm16":
            wire_full = [protect_batch(sender, batch, 0.0) for _ in range(args.rounds * 6)]

            def prot(sender: OutboundSa = sender) -> None:
                for _ in range(args.rounds):
                    protect_batch(sender, batch, 0.0)

            itf = iter(wire_full)

            def unprot(receiver: InboundSa = receiver, itf: object = itf) -> None:
                for _ in range(args.rounds):
                    out = unprotect_batch(receiver, next(itf), 0.0)  # type: ignore[call-overload]
                    assert len(out) == args.batch

            key = name if proto == IpProto.AH else f"{name} (whole packets)"
            results[key] = {"encrypt_us": best_us_per_packet(prot, n), "decrypt_us": best_us_per_packet(unprot, n)}
    if args.json:
        print(json.dumps({"size": args.size, "batch": args.batch, "results": results}, indent=2))
        return
    print(f"ESP engine, {args.size}-byte inner packets, batches of {args.batch}, best of 5 x {n} packets")
    print(f"{'transform':32} {'encrypt us/pkt':>15} {'decrypt us/pkt':>15}")
    for name, r in results.items():
        print(f"{name:32} {r['encrypt_us']:15.2f} {r['decrypt_us']:15.2f}")


if __name__ == "__main__":
    main()
