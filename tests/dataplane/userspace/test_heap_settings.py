"""The worker's glibc heap settings: applied in a child process (they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ctypes
from esplanade.dataplane.userspace.heap_settings import keep_batch_buffers_mapped
assert keep_batch_buffers_mapped()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks
buffers = [bytearray(3 << 20) for _ in range(3)]  # above the default mmap threshold
print(libc.mallinfo2().hblks - before)
"""


def test_batch_sized_buffers_come_from_the_heap_not_from_their_own_mappings() -> None:
    got = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert int(got.stdout.strip()) == 0  # no block in its own mapping (glibc's default would make 3)
