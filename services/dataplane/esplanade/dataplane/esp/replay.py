"""The anti-replay window (RFC 4303 §3.4.3, appendix A) as a ring of bitmap blocks (RFC 6479).

State is three plain values, so the C batch loop can mirror it exactly: `top` (the highest
accepted 64-bit sequence number), `blocks` (a ring of 64-bit words; bit `s & 63` of word
`(s >> 6) % len(blocks)` says whether `s` was seen) and `size` (the window, W). The ring has
ceil(W / 64) + 1 words, so advancing the window clears whole words and never shifts bits.
`blocks` is an `array('Q')`: the compiled loop (`esplanade.dataplane.fastpath`) works on its
words in place; it is never resized.

The check (`check`) runs before decryption, the update (`accept`) only after the ICV
verified; `accept` checks again, so a duplicate inside one batch is still caught.
With ESN the receiver infers the high 32 bits from the window (RFC 4303 appendix A2);
the inferred value is authenticated by the ICV before `accept` ever sees it.
"""

from __future__ import annotations

from array import array

BLOCK_BITS = 64
_BLOCK_SHIFT = 6
_BLOCK_MASK = BLOCK_BITS - 1
_FULL_BLOCK = (1 << BLOCK_BITS) - 1
_LOW32 = 0xFFFFFFFF
# With anti-replay disabled, ESN inference still needs a window: use half the 32-bit space.
_INFERENCE_WINDOW_WITHOUT_REPLAY = 1 << 31
_MAX_SEQ_HI = _LOW32


class ReplayWindow:
    __slots__ = ("_nblocks", "blocks", "esn", "size", "top")

    def __init__(self, size: int, esn: bool, floor: int = 0) -> None:
        """`size` 0 disables anti-replay. Every number <= `floor` is rejected (failover)."""
        if size < 0:
            raise ValueError("negative replay window")
        self.size = size
        self.esn = esn
        self._nblocks = (size + BLOCK_BITS - 1) // BLOCK_BITS + 1 if size else 1
        self.blocks = array("Q", bytes(8 * self._nblocks))
        self.top = floor
        if floor and size:
            # Mark everything up to the floor as seen; never the bits above it in its block.
            self.blocks = array("Q", [_FULL_BLOCK] * self._nblocks)
            self.blocks[(floor >> _BLOCK_SHIFT) % self._nblocks] = (1 << ((floor & _BLOCK_MASK) + 1)) - 1

    def infer(self, seq_lo: int) -> int:
        """The 64-bit sequence number for a received low half (RFC 4303 appendix A2.1), or -1."""
        if not self.esn:
            return seq_lo
        window = self.size or _INFERENCE_WINDOW_WITHOUT_REPLAY
        top_hi, top_lo = self.top >> 32, self.top & _LOW32
        if top_lo >= window - 1:
            # Case A: the window lies inside one 2^32 subspace.
            seq_hi = top_hi if seq_lo >= top_lo - window + 1 else top_hi + 1
            if seq_hi > _MAX_SEQ_HI:
                return -1  # past 2^64 - 1: no such sequence number
        else:
            # Case B: the window spans two subspaces.
            seq_hi = top_hi - 1 if seq_lo >= (top_lo - window + 1) & _LOW32 else top_hi
            if seq_hi < 0:
                return -1
        return seq_hi << 32 | seq_lo

    def check(self, seq_lo: int) -> int:
        """The 64-bit sequence number if it may be new, or -1 for a replay (or the invalid 0)."""
        seq = self.infer(seq_lo) if self.esn else seq_lo
        if seq <= 0:
            return -1
        if seq > self.top or not self.size:
            return seq
        if seq + self.size <= self.top:
            return -1
        if self.blocks[(seq >> _BLOCK_SHIFT) % self._nblocks] >> (seq & _BLOCK_MASK) & 1:
            return -1
        return seq

    def accept(self, seq: int) -> bool:
        """Record `seq` (its ICV verified). False if it turned out to be a replay after all."""
        top = self.top
        if not self.size:
            if seq > top:
                self.top = seq
            return True
        nblocks = self._nblocks
        blocks = self.blocks
        if seq > top:
            index = seq >> _BLOCK_SHIFT
            top_index = top >> _BLOCK_SHIFT
            advance = index - top_index
            if advance >= nblocks:
                for i in range(nblocks):
                    blocks[i] = 0
            else:
                for i in range(top_index + 1, index + 1):
                    blocks[i % nblocks] = 0
            self.top = seq
        elif seq + self.size <= top:
            return False
        slot = (seq >> _BLOCK_SHIFT) % nblocks
        bit = 1 << (seq & _BLOCK_MASK)
        if blocks[slot] & bit:
            return False
        blocks[slot] |= bit
        return True
