"""Classic BPF programs that steer ESP by SPI, and how to attach them.

`reuseport_spi_program(n)` is attached with SO_ATTACH_REUSEPORT_CBPF to a SO_REUSEPORT group of
n UDP/4500 sockets. The kernel runs it with the packet data starting at the UDP payload; the
return value is the index of the socket in the group (bind order), here SPI mod n. IKE
messages (non-ESP marker, SPI 0) and NAT keep-alives (too short to load: the program
returns 0) land on socket 0.

`raw_esp_spi_program(n, k)` is attached with SO_ATTACH_FILTER to worker k's raw ESP socket:
raw sockets each get a copy of every ESP packet, so each one keeps only SPI mod n == k.
For IPv4 the data starts at the IP header (the program skips IHL*4 bytes); for IPv6 at ESP.

Building `struct sock_fprog` needs the address of the instruction array; ctypes provides it
once at set-up, never on the packet path.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_FILTER = 26
SO_ATTACH_REUSEPORT_CBPF = 51

# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }
_INSN = struct.Struct("HBBI")

BPF_LD_W_ABS = 0x20
BPF_LD_W_IND = 0x40
BPF_LDX_B_MSH = 0xB1
BPF_ALU_MOD_K = 0x94
BPF_JMP_JEQ_K = 0x15
BPF_RET_K = 0x06
BPF_RET_A = 0x16

ACCEPT_WHOLE_PACKET = 0xFFFFFFFF

Instruction = tuple[int, int, int, int]


def reuseport_spi_program(groups: int) -> list[Instruction]:
    if groups < 1:
        raise ValueError("a reuseport group has at least one socket")
    return [
        (BPF_LD_W_ABS, 0, 0, 0),  # A = SPI (first 4 payload bytes)
        (BPF_ALU_MOD_K, 0, 0, groups),  # A = SPI mod n
        (BPF_RET_A, 0, 0, 0),  # socket index
    ]


def raw_esp_spi_program(groups: int, index: int, ipv4_header: bool = True) -> list[Instruction]:
    if not 0 <= index < groups:
        raise ValueError(f"worker index {index} outside 0..{groups - 1}")
    head: list[Instruction] = [(BPF_LDX_B_MSH, 0, 0, 0)] if ipv4_header else []  # X = IHL * 4
    return [
        *head,
        (BPF_LD_W_IND, 0, 0, 0) if ipv4_header else (BPF_LD_W_ABS, 0, 0, 0),  # A = SPI
        (BPF_ALU_MOD_K, 0, 0, groups),
        (BPF_JMP_JEQ_K, 0, 1, index),
        (BPF_RET_K, 0, 0, ACCEPT_WHOLE_PACKET),
        (BPF_RET_K, 0, 0, 0),
    ]


def attach(sock: socket.socket, option: int, program: list[Instruction]) -> None:
    """setsockopt(SOL_SOCKET, option, struct sock_fprog); raises OSError when the kernel refuses."""
    code = b"".join(_INSN.pack(*insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)
