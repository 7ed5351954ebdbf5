/* The inbound steps of the binding (espfast_module.c) as C calls, for pump_in (espfast_pump.c).
 *
 * Each is the body of the Python-level function of the same name without its argument parsing
 * and result object: the same type and bounds checks, the same counters, the same exceptions.
 * They return -1 with an exception set on failure. Requires Python.h.
 */
#ifndef ESPFAST_INBOUND_H
#define ESPFAST_INBOUND_H

#include <stddef.h>
#include <stdint.h>

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
