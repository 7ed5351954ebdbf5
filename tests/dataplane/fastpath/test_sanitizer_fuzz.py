"""AddressSanitizer + UBSan fuzzing of the compiled hot loop, bounded in time (about 45 s).

1. libFuzzer (clang -fsanitize=fuzzer,address,undefined; Debian clang 14 with
   libclang-rt-14-dev has it) over the C core: decapsulation (forged and authentic packets),
   TSO splitting, GRO merging, packet parsing, filter, flow table, replay window, sealing, and
   the VAES AES-GCM against OpenSSL's (target 7); seeded with valid inputs of each kind. It
   must finish without a finding.
2. The same harness with a planted one-byte overflow in the harness (EF_FUZZ_CANARY): the run
   must fail, which proves that a finding fails this test.
3. The CPython binding built with ASan/UBSan, loaded into a Python with the ASan runtime
   preloaded and PYTHONMALLOC=malloc, driven by hypothesis through every entry point
   (asan_driver.py).

Needs clang and libclang-rt-14-dev (Debian), both in scripts/install-system-packages.sh.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "services/dataplane/esplanade/dataplane/fastpath/csrc"
FUZZ_SECONDS = 20
DRIVER_SECONDS = 12
SANITIZE = ["-g", "-O1", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def clang() -> str:
    path = shutil.which("clang")
    assert path is not None, "clang is needed (Debian: clang libclang-rt-14-dev)"
    return path


def build_fuzzer(out: Path, canary: bool = False) -> Path:
    target = out / ("fuzz_canary" if canary else "fuzz_espfast")
    command = [
        clang(),
        *SANITIZE,
        "-fsanitize=fuzzer,address,undefined",
        f"-I{CSRC}",
        *(["-DEF_FUZZ_CANARY"] if canary else []),
        str(HERE / "fuzz" / "fuzz_espfast.c"),
        str(CSRC / "espfast_core.c"),
        str(CSRC / "espfast_aesgcm.c"),
        "-lcrypto",
        "-o",
        str(target),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return target


def seed_corpus(directory: Path) -> Path:
    """Valid inputs for every target (first byte: the target, see fuzz_espfast.c)."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    inner4 = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=53) / Raw(b"q" * 23))
    inner6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=1, dport=22) / Raw(b"z" * 9))
    for flags in range(4):
        for packet, next_header in ((inner4, 4), (inner6, 41), (inner4, 59), (inner6, 4)):
            padlen = -(len(packet) + 2) % 4
            plaintext = packet + bytes(range(1, padlen + 1)) + bytes((padlen, next_header))
            config = bytes((flags, 4)) + struct.pack("!Q", 1000) + bytes((0, 3))
            seeds.append(bytes((1,)) + config + plaintext)
            seeds.append(bytes((0,)) + config + b"\x00\x00\x10\x00" + bytes(60))
    frames = []
    for v6, udp, mss in ((False, False, 500), (True, False, 1000), (False, True, 300), (True, True, 700)):
        ip = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
        l4 = UDP(sport=5, dport=6) if udp else TCP(sport=5, dport=6, flags="PA", options=[("NOP", None)] * 4)
        packet = bytes(ip / l4 / Raw(bytes(2500)))
        gso = 5 if udp else 4 if v6 else 1
        frames.append(struct.pack("<BBHHHH", 1, gso, 0, mss, 40 if v6 else 20, 6 if udp else 16) + packet)
    seeds += [bytes((2,)) + f for f in frames]
    seeds.append(bytes((2,)) + struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 6) + inner4)
    segments = []
    seq = 1000
    for i in range(6):
        size = 100 if i < 5 else 40
        packet = bytes(
            IP(src="10.0.0.1", dst="10.0.0.2", id=i) / TCP(sport=5, dport=6, seq=seq, flags="A") / Raw(bytes(size))
        )
        segments.append(struct.pack("!H", len(packet)) + packet)
        seq += size
    udp_run = [struct.pack("!H", len(inner4)) + inner4] * 3
    seeds.append(bytes((3, 0)) + b"".join(segments))
    seeds.append(bytes((3, 1)) + b"".join(udp_run + segments))
    seeds += [bytes((4,)) + p for p in (inner4, inner6)]
    seeds.append(bytes((5, 1, 4)) + struct.pack("!Q", 1 << 32) + struct.pack("!8I", *range(1, 9)))
    seeds.append(bytes((6,)) + b"\x00\x40" + inner4)
    for key_bits, aad, body in ((0, 8, 0), (1, 12, 61), (2, 20, 1400), (3, 0, 127), (1, 8, 2100)):
        seeds.append(bytes((7, key_bits, aad, 5, 9)) + bytes(i % 251 for i in range(aad + body)))
    for i, seed in enumerate(seeds):
        (directory / f"seed-{i:03d}").write_bytes(seed)
    return directory


def run_fuzzer(binary: Path, corpus: Path, seconds: int, artifacts: Path) -> subprocess.CompletedProcess[str]:
    artifacts.mkdir(exist_ok=True)
    return subprocess.run(
        [
            str(binary),
            f"-max_total_time={seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-use_value_profile=1",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )


def test_libfuzzer_finds_nothing(tmp_path: Path) -> None:
    binary = build_fuzzer(tmp_path)
    corpus = seed_corpus(tmp_path / "corpus")
    done = run_fuzzer(binary, corpus, FUZZ_SECONDS, tmp_path / "artifacts")
    tail = "\n".join(done.stderr.splitlines()[-40:])
    assert done.returncode == 0, f"libFuzzer found something:\n{tail}"
    assert "ERROR: AddressSanitizer" not in done.stderr and "runtime error" not in done.stderr, tail
    assert "Done" in done.stderr, tail


def test_a_planted_overflow_fails_the_run(tmp_path: Path) -> None:
    binary = build_fuzzer(tmp_path, canary=True)
    corpus = seed_corpus(tmp_path / "corpus")
    done = run_fuzzer(binary, corpus, FUZZ_SECONDS, tmp_path / "artifacts")
    assert done.returncode != 0
    assert "heap-buffer-overflow" in done.stderr


def test_binding_under_asan_with_hypothesis(tmp_path: Path) -> None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    module = tmp_path / f"_espfast{suffix}"
    include = sysconfig.get_paths()["include"]
    sources = [str(CSRC / s) for s in ("espfast_core.c", "espfast_aesgcm.c", "espfast_module.c", "espfast_pump.c")]
    command = [clang(), *SANITIZE, "-fsanitize=address,undefined", "-shared", "-fPIC", f"-I{include}", *sources]
    subprocess.run([*command, "-lcrypto", "-o", str(module)], check=True, capture_output=True, timeout=300)
    runtime = subprocess.run(
        [clang(), "-print-file-name=libclang_rt.asan-x86_64.so"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert Path(runtime).exists(), "libclang-rt-14-dev provides the ASan runtime"
    env = {
        **os.environ,
        "LD_PRELOAD": runtime,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "PYTHONMALLOC": "malloc",
        "ESPFAST_ASAN_MODULE": str(module),
        "PYTHONPATH": str(HERE.parents[2]),
    }
    done = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "asan_driver.py"), str(DRIVER_SECONDS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DRIVER_SECONDS + 240,
        check=False,
    )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    assert done.returncode == 0, tail
    assert "no finding" in done.stdout, tail
