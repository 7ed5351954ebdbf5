/* The C cores of the batch steps (espfast_module.c), for the pumps (espfast_pump.c).
 *
 * The Python-level entry points read_frames, split_frames, clamp_mss and send_runs (sending) and
 * recv_gro, decrypt_batch, coalesce and write_frames (receiving) are thin wrappers: each parses
 * its arguments and calls one of these, which does the work with the same type and bounds checks,
 * counters and errors; encrypt_batch and ef_split_seal_frames share its seal loop.
 * The pumps call them directly, without an argument tuple, a format string or a result tuple per
 * step. Spans are native u32 triples (offset, length, tag); `spans`/`spans_len` are the span
 * buffer and its size in bytes, `count` the spans to use. Every function returns -1 with a
 * Python exception set on failure.
 */
#ifndef ESPFAST_STEPS_H
#define ESPFAST_STEPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* -- sending ------------------------------------------------------------------------------------ */
/* Up to `limit` reads of `frame_max` bytes from a non-blocking fd into the bytearray `buf` (grown
 * once), spans into the bytearray `spans`: *count frames, *err the errno that stopped it (0 for
 * EAGAIN or end of file). */
int ef_read_frames_into(int fd, PyObject *buf, PyObject *spans, Py_ssize_t limit, Py_ssize_t frame_max,
                        Py_ssize_t *count, int *err);

/* TSO/USO split of `count` TUN frames into the bytearrays `out`/`out_spans` (grown, trimmed to
 * what was written): *npackets wire packets (tags: frame index), *dropped malformed frames. */
int ef_split_frames_into(const uint8_t *frames, size_t frames_len, const uint8_t *spans, size_t spans_len,
                         Py_ssize_t count, PyObject *out, PyObject *out_spans, Py_ssize_t *npackets,
                         Py_ssize_t *dropped);

/* MSS clamp of TCP SYNs in place over `count` spans of `data` (mss4, mss6 in 0..65535): how many
 * were lowered, or -1 (ValueError: bad arguments, or a span past the end of `data`). */
long ef_clamp_mss_spans(uint8_t *data, size_t data_len, const uint8_t *spans, size_t spans_len, Py_ssize_t count,
                        int mss4, int mss6);

/* split_frames, clamp_mss and encrypt_batch in one pass over `count` TUN frames of `frames`, for
 * frames whose slots are known (frame_slot: one per frame): each packet is split in place in its
 * frame (ef_split_next: no payload copy), clamped (mss4 < 0: not) and sealed before the next one
 * is built. The ESP payloads are those encrypt_batch makes of split_frames' packets, byte for
 * byte, in the same order; the frames are consumed (the caller holds a writable export of their
 * owner; spans that overlap give other packets, never a write outside the outputs' checked size). *npackets, *dropped: split_frames' counts; *clamped: clamp_mss's. The ESP payloads
 * written (0 and the outputs untouched when there is no packet), or -1. */
Py_ssize_t ef_split_seal_frames(PyObject *slots, const uint16_t *frame_slot, uint8_t *frames, size_t frames_len,
                                const uint8_t *spans, size_t spans_len, Py_ssize_t count, int mss4, int mss6,
                                double now, PyObject *out, PyObject *out_spans, PyObject *flows,
                                Py_ssize_t *npackets, Py_ssize_t *dropped, Py_ssize_t *clamped);

/* send_runs over `count` spans of `data` on `fd`: *sent payloads, *sends calls, *aside a new list
 * of the runs not sent (offset, length, segment, count, tag, errno). dests: a tuple. */
int ef_send_runs_from(int fd, const uint8_t *data, size_t data_len, const uint8_t *spans, size_t spans_len,
                      Py_ssize_t count, PyObject *dests, int gso, Py_ssize_t max_segments, Py_ssize_t max_bytes,
                      Py_ssize_t *sent, Py_ssize_t *sends, PyObject **aside);

/* -- receiving ---------------------------------------------------------------------------------- */
/* recv_gro's result: counts, and new references to its three lists. */
typedef struct {
    Py_ssize_t count, reads;
    PyObject *spis, *odd, *errnos;
} ef_gro_reads;

/* recv_gro(fd, buf, spans, max_reads, read_max, accept): buf and spans bytearrays, accept a set. */
int ef_recv_gro(int fd, PyObject *buf, PyObject *spans, Py_ssize_t max_reads, Py_ssize_t read_max, PyObject *accept,
                ef_gro_reads *got);

/* decrypt_batch(table, packets, spans, count, now, out, out_spans, flows, non_esp) -> inner packets. */
Py_ssize_t ef_decrypt_batch(PyObject *table, PyObject *packets, PyObject *spans, Py_ssize_t count, double now,
                            PyObject *out, PyObject *out_spans, PyObject *flows, PyObject *non_esp);

/* coalesce(packets, spans, count, merge_udp, out, out_spans) -> TUN frames. */
Py_ssize_t ef_coalesce(PyObject *packets, PyObject *spans, Py_ssize_t count, int merge_udp, PyObject *out,
                       PyObject *out_spans);

/* write_frames(fd, data, spans, count): *written frames went through; the errno of each write that
 * failed is appended to the list `errnos`. */
int ef_write_frames(int fd, const uint8_t *data, size_t data_len, const uint8_t *spans, size_t spans_len,
                    Py_ssize_t count, Py_ssize_t *written, PyObject *errnos);

#endif
