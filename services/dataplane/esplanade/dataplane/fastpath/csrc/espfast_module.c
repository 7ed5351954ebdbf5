/* _espfast: the CPython binding of the compiled ESP hot loop (espfast_core.c).
 *
 * Python keeps the control. The batch functions read the state of each SA they touch from
 * its Python object at its first packet in the batch (next_seq, seq_mark, replay.top, the
 * counters, the lifetime marks) and write it back at the end of the batch; the replay
 * window's words are used in place (the Python ReplayWindow keeps them in an array('Q')).
 * Whenever a packet reaches a mark, the loop writes the state back, calls the Python slow
 * path on the SA object (take_sequence, on_time, on_volume, on_replay_top) exactly where the
 * pure-Python engine would, and reads the state again. SAs the C loop does not handle
 * ("python" slots) go through the pure-Python engine, packet by packet, in order.
 *
 * One call per batch. Inputs: a sequence of bytes-like packets, or one buffer plus spans
 * (u32 offset, u32 length, u32 tag per packet). Outputs: one bytearray (grown when needed,
 * locked while the batch runs) plus spans of the same layout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

#include <openssl/crypto.h>
#include <openssl/opensslv.h>

#include "espfast_core.h"
#include "espfast_steps.h"

int ef_pump_init(PyObject *module); /* espfast_pump.c: pump_out, pump_in, SlotCache */

#define SLOT_PYTHON 0
#define SPAN_WORDS 3
#define SPAN_BYTES (SPAN_WORDS * sizeof(uint32_t))

/* Span i of `spans` (offset, length, tag) into w, or -1 (ValueError) when it runs past the end of
 * the `data_len` bytes it points into. The caller has checked that `spans` holds span i. */
static inline int span_within(const uint8_t *spans, size_t i, size_t data_len, uint32_t w[SPAN_WORDS]) {
    memcpy(w, spans + i * SPAN_BYTES, SPAN_BYTES);
    if ((uint64_t)w[0] + w[1] > (uint64_t)data_len) {
        PyErr_SetString(PyExc_ValueError, "a span runs past the end of its buffer");
        return -1;
    }
    return 0;
}

static const char *const DROP_NAMES[EF_NREASONS] = {
    "",         "replay",  "icv_failure", "unknown_spi",        "policy_mismatch",
    "malformed", "lifetime", "dummy",       "sequence_exhausted", "sequence_unreserved",
};

/* Set by configure(): the DropReason members in C order, and the pure-Python engine's entry points. */
static PyObject *drop_reasons[EF_NREASONS];
static PyObject *py_encrypt_esp, *py_decrypt_esp;
static int in_batch;

static PyObject *s_next_seq, *s_seq_mark, *s_counters, *s_packets, *s_bytes, *s_drops, *s_packet_mark, *s_byte_mark,
    *s_time_mark, *s_hard_expired, *s_replay, *s_top, *s_blocks, *s_persist_mark, *s_on_time, *s_on_volume,
    *s_take_sequence, *s_on_replay_top, *s_size;

static int int_sign(PyObject *v);

/* -- conversions -------------------------------------------------------------------------------- */

/* An int or float mark as u64: inf and anything above 2^64 - 1 become UINT64_MAX (never reached
 * by a count; for sequence marks it only sends the packet through the Python slow path). */
static int as_mark(PyObject *v, uint64_t *out) {
    if (PyFloat_Check(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        if (isnan(d)) {
            PyErr_SetString(PyExc_ValueError, "NaN mark");
            return -1;
        }
        if (d <= 0)
            *out = 0;
        else if (d >= 18446744073709551615.0)
            *out = UINT64_MAX;
        else
            *out = (uint64_t)ceil(d);
        return 0;
    }
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "expected an int or float mark, got %.80s", Py_TYPE(v)->tp_name);
        return -1;
    }
    {
        int sign = int_sign(v);
        if (sign == -2) return -1;
        if (sign < 0) {
            *out = 0;
            return 0;
        }
    }
    *out = PyLong_AsUnsignedLongLong(v);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        *out = UINT64_MAX;
    }
    return 0;
}

static int get_mark(PyObject *obj, PyObject *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    int r;
    if (v == NULL) return -1;
    r = as_mark(v, out);
    Py_DECREF(v);
    return r;
}

/* An exact non-negative int that must fit 64 bits (a count, a window top). */
static int get_u64(PyObject *obj, PyObject *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    return *out == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

static int set_u64(PyObject *obj, PyObject *name, uint64_t value) {
    PyObject *v = PyLong_FromUnsignedLongLong(value);
    int r;
    if (v == NULL) return -1;
    r = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return r;
}

static int add_drops(PyObject *counters, uint64_t *deltas) {
    PyObject *drops;
    int r = 0;
    for (int i = 1; i < EF_NREASONS && !r; i++) {
        if (!deltas[i]) continue;
        if (drop_reasons[i] == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "_espfast.configure() was not called");
            return -1;
        }
        drops = PyObject_GetAttr(counters, s_drops);
        if (drops == NULL) return -1;
        {
            PyObject *old = PyObject_GetItem(drops, drop_reasons[i]), *delta, *sum;
            if (old == NULL) {
                Py_DECREF(drops);
                return -1;
            }
            delta = PyLong_FromUnsignedLongLong(deltas[i]);
            sum = delta ? PyNumber_Add(old, delta) : NULL;
            r = sum ? PyObject_SetItem(drops, drop_reasons[i], sum) : -1;
            Py_XDECREF(sum);
            Py_XDECREF(delta);
            Py_DECREF(old);
        }
        Py_DECREF(drops);
        if (!r) deltas[i] = 0;
    }
    return r;
}

/* -- Filter ------------------------------------------------------------------------------------- */
#define DENIED_SAMPLE 64 /* bytes of the last denied packet kept for the decision log */

typedef struct {
    PyObject_HEAD ef_filter filter;
    void *memory;
    unsigned long long denied;
    unsigned long long allowed;
    uint8_t last_denied[DENIED_SAMPLE]; /* the head of the last packet denied since take_denied() */
    size_t last_denied_len;             /* 0: none */
    uint8_t last_outside[DENIED_SAMPLE]; /* ... dropped outside its SA's selectors, since take_outside() */
    size_t last_outside_len;             /* 0: none */
} FilterObject;

static int Filter_init(FilterObject *self, PyObject *args, PyObject *kw) {
    if (!PyArg_ParseTuple(args, "")) return -1;
    memset(&self->filter, 0xFF, sizeof(self->filter.index));
    self->last_denied_len = 0;
    self->last_outside_len = 0;
    self->filter.ntables = 0;
    self->filter.tables = NULL;
    return 0;
}

static void Filter_dealloc(FilterObject *self) {
    PyMem_Free(self->memory);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int buffer_of(PyObject *obj, Py_buffer *view, size_t item, size_t count, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) return -1;
    if ((size_t)view->len != item * count) {
        PyErr_Format(PyExc_ValueError, "filter table: %s holds %zd bytes, expected %zu", what, view->len, item * count);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* load(tables): tables is a list of (version, protocol, starts_hi, starts_lo, kinds, first, count,
 * port_lo, port_hi); the address starts as native u64 arrays, the rest native u32 arrays (kinds u8). */
static PyObject *Filter_load(FilterObject *self, PyObject *tables) {
    PyObject *seq = PySequence_Fast(tables, "tables must be a sequence");
    Py_ssize_t nt;
    size_t total = 0, at = 0;
    uint8_t *mem = NULL;
    ef_filter f;
    ef_filter_table *tabs;
    if (seq == NULL) return NULL;
    nt = PySequence_Fast_GET_SIZE(seq);
    if (nt > 512) {
        PyErr_SetString(PyExc_ValueError, "too many filter tables");
        goto fail;
    }
    memset(f.index, 0xFF, sizeof(f.index));
    /* First pass: sizes. */
    for (Py_ssize_t i = 0; i < nt; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t sizes[7];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 9) {
            PyErr_SetString(PyExc_TypeError, "a filter table is a 9-tuple");
            goto fail;
        }
        for (int k = 0; k < 7; k++) {
            sizes[k] = PyObject_Length(PyTuple_GET_ITEM(t, k + 2));
            if (sizes[k] < 0) goto fail;
        }
        total += (size_t)sizes[0] * 2 + (size_t)sizes[2] + (size_t)sizes[3] + (size_t)sizes[4] + (size_t)sizes[5] +
                 (size_t)sizes[6] + 64;
    }
    total += (size_t)nt * sizeof(ef_filter_table) + 64;
    mem = PyMem_Calloc(1, total);
    if (mem == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    tabs = (ef_filter_table *)mem;
    at = (size_t)nt * sizeof(ef_filter_table);
    for (Py_ssize_t i = 0; i < nt; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        long version = PyLong_AsLong(PyTuple_GET_ITEM(t, 0)), proto = PyLong_AsLong(PyTuple_GET_ITEM(t, 1));
        Py_ssize_t nseg = PyObject_Length(PyTuple_GET_ITEM(t, 4)), nports;
        Py_buffer b[7];
        int ok = 1, got = 0;
        ef_filter_table *tb = &tabs[i];
        if (PyErr_Occurred()) goto fail;
        if ((version != 4 && version != 6) || proto < 0 || proto > 255 || nseg < 0) {
            PyErr_SetString(PyExc_ValueError, "filter table: bad version, protocol or segment count");
            goto fail;
        }
        nports = PyObject_Length(PyTuple_GET_ITEM(t, 7));
        if (nports < 0 || nports % 4) {
            PyErr_SetString(PyExc_ValueError, "filter table: bad port arrays");
            goto fail;
        }
        nports /= 4;
        ok = buffer_of(PyTuple_GET_ITEM(t, 2), &b[0], 8, (size_t)nseg, "starts_hi") == 0 && ++got &&
             buffer_of(PyTuple_GET_ITEM(t, 3), &b[1], 8, (size_t)nseg, "starts_lo") == 0 && ++got &&
             buffer_of(PyTuple_GET_ITEM(t, 4), &b[2], 1, (size_t)nseg, "kinds") == 0 && ++got &&
             buffer_of(PyTuple_GET_ITEM(t, 5), &b[3], 4, (size_t)nseg, "first") == 0 && ++got &&
             buffer_of(PyTuple_GET_ITEM(t, 6), &b[4], 4, (size_t)nseg, "count") == 0 && ++got &&
             buffer_of(PyTuple_GET_ITEM(t, 7), &b[5], 4, (size_t)nports, "port_lo") == 0 && ++got &&
             buffer_of(PyTuple_GET_ITEM(t, 8), &b[6], 4, (size_t)nports, "port_hi") == 0 && ++got;
        if (ok) {
            ef_addr *starts;
            uint8_t *kind;
            uint32_t *first, *count, *plo, *phi;
            at = (at + 15) & ~(size_t)15;
            starts = (ef_addr *)(mem + at);
            at += (size_t)nseg * sizeof(ef_addr);
            first = (uint32_t *)(mem + at);
            at += (size_t)nseg * 4;
            count = (uint32_t *)(mem + at);
            at += (size_t)nseg * 4;
            plo = (uint32_t *)(mem + at);
            at += (size_t)nports * 4;
            phi = (uint32_t *)(mem + at);
            at += (size_t)nports * 4;
            kind = mem + at;
            at += (size_t)nseg;
            for (Py_ssize_t k = 0; k < nseg; k++) {
                memcpy(&starts[k].hi, (uint8_t *)b[0].buf + 8 * k, 8);
                memcpy(&starts[k].lo, (uint8_t *)b[1].buf + 8 * k, 8);
            }
            memcpy(kind, b[2].buf, (size_t)nseg);
            memcpy(first, b[3].buf, (size_t)nseg * 4);
            memcpy(count, b[4].buf, (size_t)nseg * 4);
            memcpy(plo, b[5].buf, (size_t)nports * 4);
            memcpy(phi, b[6].buf, (size_t)nports * 4);
            for (Py_ssize_t k = 0; k < nseg && ok; k++) {
                if (kind[k] > 2 || (kind[k] == 2 && (count[k] == 0 || (uint64_t)first[k] + count[k] > (uint64_t)nports)))
                    ok = 0;
                if (k && !ef_addr_lt(starts[k - 1], starts[k])) ok = 0;
            }
            if (!ok) PyErr_SetString(PyExc_ValueError, "filter table: inconsistent segments");
            tb->nseg = (uint32_t)nseg;
            tb->starts = starts;
            tb->kind = kind;
            tb->first = first;
            tb->count = count;
            tb->port_lo = plo;
            tb->port_hi = phi;
            f.index[version == 6][proto] = (int16_t)i;
        }
        for (int k = 0; k < got; k++) PyBuffer_Release(&b[k]);
        if (!ok) goto fail;
    }
    Py_DECREF(seq);
    f.tables = tabs;
    f.ntables = (uint32_t)nt;
    PyMem_Free(self->memory);
    self->memory = mem;
    self->filter = f;
    Py_RETURN_NONE;
fail:
    PyMem_Free(mem);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *Filter_allows(FilterObject *self, PyObject *packet) {
    Py_buffer view;
    ef_inner_header h;
    int ok;
    if (PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE) < 0) return NULL;
    ok = ef_parse_inner(view.buf, (size_t)view.len, &h) == 0 && ef_filter_allows(&self->filter, &h);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyObject *Filter_take_denied(FilterObject *self, PyObject *unused) {
    PyObject *head;
    (void)unused;
    if (self->last_denied_len == 0) Py_RETURN_NONE;
    head = PyBytes_FromStringAndSize((const char *)self->last_denied, (Py_ssize_t)self->last_denied_len);
    self->last_denied_len = 0;
    return head;
}

static PyObject *Filter_take_outside(FilterObject *self, PyObject *unused) {
    PyObject *head;
    (void)unused;
    if (self->last_outside_len == 0) Py_RETURN_NONE;
    head = PyBytes_FromStringAndSize((const char *)self->last_outside, (Py_ssize_t)self->last_outside_len);
    self->last_outside_len = 0;
    return head;
}

static PyMethodDef Filter_methods[] = {
    {"load", (PyCFunction)Filter_load, METH_O, "Replace the tables (see filter_tables.py)."},
    {"take_denied", (PyCFunction)Filter_take_denied, METH_NOARGS,
     "The head of the last packet denied since the previous call, or None."},
    {"take_outside", (PyCFunction)Filter_take_outside, METH_NOARGS,
     "The head of the last packet of its SA dropped outside the SA's selectors since the previous call, or None."},
    {"allows_packet", (PyCFunction)Filter_allows, METH_O, "Parse an inner packet and check it."},
    {NULL}};

static PyMemberDef Filter_members[] = {
    {"denied", T_ULONGLONG, offsetof(FilterObject, denied), 0, "Packets the filter dropped."},
    {"allowed", T_ULONGLONG, offsetof(FilterObject, allowed), 0, "Packets the filter let through."},
    {NULL}};

static PyTypeObject FilterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_espfast.Filter",
    .tp_basicsize = sizeof(FilterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An identity's packet filter, compiled from esplanade.policy.filters.PacketFilter.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Filter_init,
    .tp_dealloc = (destructor)Filter_dealloc,
    .tp_methods = Filter_methods,
    .tp_members = Filter_members,
};

/* -- FlowTable ----------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD ef_flows flows;
} FlowTableObject;

static int FlowTable_init(FlowTableObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"capacity", NULL};
    Py_ssize_t capacity = 4096;
    uint32_t cap = 16;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n", names, &capacity)) return -1;
    if (capacity < 1 || capacity > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "flow table capacity must be 1 .. 2^24");
        return -1;
    }
    while (cap < (uint32_t)capacity) cap <<= 1;
    PyMem_Free(self->flows.slots);
    self->flows.slots = PyMem_Calloc(cap, sizeof(ef_flow));
    if (self->flows.slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->flows.capacity = cap;
    self->flows.limit = cap / 4 * 3;
    self->flows.count = 0;
    self->flows.overflow_packets = self->flows.overflow_bytes = 0;
    return 0;
}

static void FlowTable_dealloc(FlowTableObject *self) {
    PyMem_Free(self->flows.slots);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *addr_bytes(ef_addr a, int version) {
    uint8_t b[16];
    for (int i = 0; i < 8; i++) {
        b[i] = (uint8_t)(a.hi >> (56 - 8 * i));
        b[8 + i] = (uint8_t)(a.lo >> (56 - 8 * i));
    }
    if (version == 4) return PyBytes_FromStringAndSize((char *)b + 12, 4);
    if (version == 6) return PyBytes_FromStringAndSize((char *)b, 16);
    return PyBytes_FromStringAndSize("", 0);
}

/* drain() -> [(spi, direction, version, src, dst, protocol, src_port, dst_port, packets, bytes)], and empty. */
static PyObject *FlowTable_drain(FlowTableObject *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (uint32_t i = 0; i < self->flows.capacity; i++) {
        ef_flow *f = &self->flows.slots[i];
        PyObject *src, *dst, *rec;
        if (!f->used) continue;
        src = addr_bytes(f->src, f->version);
        dst = addr_bytes(f->dst, f->version);
        rec = src && dst ? Py_BuildValue("(kiiOOiiiKK)", (unsigned long)f->spi, f->direction, f->version, src, dst,
                                         f->protocol, f->src_port, f->dst_port, (unsigned long long)f->packets,
                                         (unsigned long long)f->bytes)
                         : NULL;
        Py_XDECREF(src);
        Py_XDECREF(dst);
        if (rec == NULL || PyList_Append(out, rec) < 0) {
            Py_XDECREF(rec);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(rec);
    }
    memset(self->flows.slots, 0, (size_t)self->flows.capacity * sizeof(ef_flow));
    self->flows.count = 0;
    return out;
}

static PyMethodDef FlowTable_methods[] = {
    {"drain", (PyCFunction)FlowTable_drain, METH_NOARGS, "Take every flow record and empty the table."}, {NULL}};

static PyMemberDef FlowTable_members[] = {
    {"count", T_UINT, offsetof(FlowTableObject, flows.count), READONLY, "Flows held."},
    {"limit", T_UINT, offsetof(FlowTableObject, flows.limit), READONLY, "Flows held at most."},
    {"overflow_packets", T_ULONGLONG, offsetof(FlowTableObject, flows.overflow_packets), 0,
     "Packets of new flows that found the table full."},
    {"overflow_bytes", T_ULONGLONG, offsetof(FlowTableObject, flows.overflow_bytes), 0, "Their bytes."},
    {NULL}};

static PyTypeObject FlowTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_espfast.FlowTable",
    .tp_basicsize = sizeof(FlowTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Per (SPI, direction, 5-tuple) packet and byte counts, drained by Python.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FlowTable_init,
    .tp_dealloc = (destructor)FlowTable_dealloc,
    .tp_methods = FlowTable_methods,
    .tp_members = FlowTable_members,
};

/* -- SA slots ------------------------------------------------------------------------------------ */
typedef struct Slot Slot;
struct Slot {
    PyObject_HEAD PyObject *sa;
    PyObject *filter; /* FilterObject or None (inbound only) */
    int kind, outbound, esn;
    uint32_t spi;
    /* outbound */
    ef_aead aead;
    size_t pad_to, max_esp;
    /* inbound */
    ef_inbound in;
    ef_selectors selectors;
    ef_selector *selector_memory;
    /* the mirror of the Python state while a batch runs */
    int loaded;
    Slot *next_loaded;
    PyObject *counters;
    uint64_t next_seq, seq_mark, packets, bytes, packet_mark, byte_mark, persist_mark;
    uint64_t loaded_next_seq, loaded_top, loaded_packets, loaded_bytes;
    double time_mark;
    int hard_expired;
    Py_buffer blocks;
    uint64_t drops[EF_NREASONS];
};

static void Slot_dealloc(Slot *self) {
    ef_aead_free(&self->aead);
    ef_aead_free(&self->in.aead);
    PyMem_Free(self->selector_memory);
    Py_XDECREF(self->sa);
    Py_XDECREF(self->filter);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int parse_selectors(PyObject *list, ef_selector *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(list, i);
        unsigned long long a[6];
        PyObject *lo, *hi;
        int version, proto, plo, phi;
        if (!PyArg_ParseTuple(t, "iOOiii", &version, &lo, &hi, &proto, &plo, &phi)) return -1;
        for (int k = 0; k < 2; k++) {
            PyObject *v = k ? hi : lo, *shift = PyLong_FromLong(64), *mask = PyLong_FromUnsignedLongLong(UINT64_MAX);
            PyObject *high = shift ? PyNumber_Rshift(v, shift) : NULL, *low = mask ? PyNumber_And(v, mask) : NULL;
            a[2 * k] = high ? PyLong_AsUnsignedLongLong(high) : 0;
            a[2 * k + 1] = low ? PyLong_AsUnsignedLongLong(low) : 0;
            Py_XDECREF(shift);
            Py_XDECREF(mask);
            Py_XDECREF(high);
            Py_XDECREF(low);
            if (PyErr_Occurred()) return -1;
        }
        if ((version != 4 && version != 6) || proto < 0 || proto > 255 || plo < -2 || phi > 65535) {
            PyErr_SetString(PyExc_ValueError, "bad compiled selector");
            return -1;
        }
        out[i].version = (uint8_t)version;
        out[i].lo.hi = a[0];
        out[i].lo.lo = a[1];
        out[i].hi.hi = a[2];
        out[i].hi.lo = a[3];
        out[i].protocol = (uint8_t)proto;
        out[i].port_lo = plo;
        out[i].port_hi = phi;
    }
    return 0;
}

static PyTypeObject SlotType;

/* Slot(sa, outbound, kind, key, salt, spi, esn, *, pad_to=0, max_esp=0, local=None, remote=None, filter=None)
 * kind 0: the pure-Python engine handles this SA; 1: AES-GCM-16; 2: ChaCha20-Poly1305.
 * local/remote: compiled selectors (selector_match.compile_selector tuples), None: match all. */
static int Slot_init(Slot *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"sa",      "outbound", "kind",  "key",    "salt",   "spi", "esn",
                            "pad_to",  "max_esp",  "local", "remote", "filter", NULL};
    PyObject *sa, *local = Py_None, *remote = Py_None, *filter = Py_None;
    int outbound, kind, esn;
    Py_buffer key, salt;
    unsigned long spi;
    Py_ssize_t pad_to = 0, max_esp = 0;
    if (self->sa != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a slot is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Opiy*y*kp|$nnOOO", names, &sa, &outbound, &kind, &key, &salt, &spi,
                                     &esn, &pad_to, &max_esp, &local, &remote, &filter))
        return -1;
    if (kind < 0 || kind > 2 || salt.len != (kind ? 4 : salt.len) || spi > 0xFFFFFFFFul || pad_to < 0 ||
        max_esp < 0 || (filter != Py_None && !PyObject_TypeCheck(filter, &FilterType))) {
        PyErr_SetString(PyExc_ValueError, "bad slot parameters");
        goto fail;
    }
    self->outbound = outbound;
    self->kind = kind;
    self->esn = esn;
    self->spi = (uint32_t)spi;
    self->pad_to = (size_t)pad_to;
    self->max_esp = (size_t)max_esp;
    if (kind) {
        ef_aead *a = outbound ? &self->aead : &self->in.aead;
        if (ef_aead_init(a, kind, key.buf, (size_t)key.len, salt.buf, outbound) < 0) {
            PyErr_SetString(PyExc_ValueError, "OpenSSL refused the AEAD key");
            goto fail;
        }
    }
    if (!outbound && kind && local != Py_None) {
        PyObject *l = PySequence_Fast(local, "local selectors"), *r = l ? PySequence_Fast(remote, "remote selectors") : NULL;
        Py_ssize_t nl, nr;
        if (r == NULL) {
            Py_XDECREF(l);
            goto fail;
        }
        nl = PySequence_Fast_GET_SIZE(l);
        nr = PySequence_Fast_GET_SIZE(r);
        self->selector_memory = PyMem_Calloc((size_t)(nl + nr + 1), sizeof(ef_selector));
        if (self->selector_memory == NULL || parse_selectors(l, self->selector_memory, nl) < 0 ||
            parse_selectors(r, self->selector_memory + nl, nr) < 0) {
            if (self->selector_memory == NULL) PyErr_NoMemory();
            Py_DECREF(l);
            Py_DECREF(r);
            goto fail;
        }
        self->selectors.local = self->selector_memory;
        self->selectors.nlocal = (uint32_t)nl;
        self->selectors.remote = self->selector_memory + nl;
        self->selectors.nremote = (uint32_t)nr;
        self->in.selectors = &self->selectors;
        Py_DECREF(l);
        Py_DECREF(r);
    }
    self->in.spi = self->spi;
    self->in.esn = esn;
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    Py_INCREF(sa);
    self->sa = sa;
    Py_INCREF(filter);
    self->filter = filter;
    return 0;
fail: /* nothing keyed or allocated survives: __init__ may be called again after a failure */
    ef_aead_free(&self->aead);
    ef_aead_free(&self->in.aead);
    PyMem_Free(self->selector_memory);
    self->selector_memory = NULL;
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    return -1;
}

static PyObject *Slot_get_filter(Slot *self, void *closure) {
    PyObject *f = self->filter ? self->filter : Py_None;
    Py_INCREF(f);
    return f;
}

static int Slot_set_filter(Slot *self, PyObject *value, void *closure) {
    if (value == NULL || (value != Py_None && !PyObject_TypeCheck(value, &FilterType))) {
        PyErr_SetString(PyExc_TypeError, "filter must be a Filter or None");
        return -1;
    }
    if (in_batch) {
        PyErr_SetString(PyExc_RuntimeError, "cannot replace a filter while a batch runs");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->filter, value);
    return 0;
}

static PyObject *Slot_get_aead_implementation(Slot *self, void *closure) {
    const char *name = ef_aead_implementation(self->outbound ? &self->aead : &self->in.aead);
    if (name == NULL) Py_RETURN_NONE;
    return PyUnicode_FromString(name);
}

static PyGetSetDef Slot_getset[] = {
    {"filter", (getter)Slot_get_filter, (setter)Slot_set_filter, "The identity's Filter, or None.", NULL},
    {"aead_implementation", (getter)Slot_get_aead_implementation, NULL,
     "Who runs this SA's AEAD: 'vaes-avx2' (our AES-GCM), 'openssl', or None (a pure-Python slot).", NULL},
    {NULL}};

static PyMemberDef Slot_members[] = {
    {"sa", T_OBJECT, offsetof(Slot, sa), READONLY, "The Python SA state this slot mirrors."},
    {"kind", T_INT, offsetof(Slot, kind), READONLY, "0 pure Python, 1 AES-GCM-16, 2 ChaCha20-Poly1305."},
    {"spi", T_UINT, offsetof(Slot, spi), READONLY, "The SPI."},
    {NULL}};

static PyTypeObject SlotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_espfast.Slot",
    .tp_basicsize = sizeof(Slot),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One SA as the compiled loop sees it: keyed cipher context and a reference to the Python state.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Slot_init,
    .tp_dealloc = (destructor)Slot_dealloc,
    .tp_members = Slot_members,
    .tp_getset = Slot_getset,
};

/* Read the Python state into the mirror. */
static int slot_read(Slot *s) {
    PyObject *sa = s->sa, *v;
    if (get_u64(s->counters, s_packets, &s->packets) < 0 || get_u64(s->counters, s_bytes, &s->bytes) < 0 ||
        get_mark(sa, s_packet_mark, &s->packet_mark) < 0 || get_mark(sa, s_byte_mark, &s->byte_mark) < 0)
        return -1;
    v = PyObject_GetAttr(sa, s_time_mark);
    if (v == NULL) return -1;
    s->time_mark = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (s->time_mark == -1.0 && PyErr_Occurred()) return -1;
    v = PyObject_GetAttr(sa, s_hard_expired);
    if (v == NULL) return -1;
    s->hard_expired = v != Py_None;
    Py_DECREF(v);
    if (s->outbound) {
        if (get_mark(sa, s_next_seq, &s->next_seq) < 0 || get_mark(sa, s_seq_mark, &s->seq_mark) < 0) return -1;
        if (s->next_seq == UINT64_MAX) s->seq_mark = 0; /* out of 64 bits: always the slow path */
        s->loaded_next_seq = s->next_seq;
    } else {
        PyObject *replay = PyObject_GetAttr(sa, s_replay);
        int r;
        if (replay == NULL) return -1;
        r = get_u64(replay, s_top, &s->in.replay.top);
        Py_DECREF(replay);
        if (r < 0 || get_mark(sa, s_persist_mark, &s->persist_mark) < 0) return -1;
        s->loaded_top = s->in.replay.top;
    }
    s->loaded_packets = s->packets;
    s->loaded_bytes = s->bytes;
    return 0;
}

/* Write the mirror back (only what changed; drops are added and zeroed). */
static int slot_write(Slot *s) {
    int r = 0;
    if (s->outbound && s->next_seq != s->loaded_next_seq) {
        r |= set_u64(s->sa, s_next_seq, s->next_seq);
        s->loaded_next_seq = s->next_seq;
    }
    if (!s->outbound && s->in.replay.top != s->loaded_top) {
        PyObject *replay = PyObject_GetAttr(s->sa, s_replay);
        r |= replay ? set_u64(replay, s_top, s->in.replay.top) : -1;
        Py_XDECREF(replay);
        s->loaded_top = s->in.replay.top;
    }
    if (s->packets != s->loaded_packets) {
        r |= set_u64(s->counters, s_packets, s->packets);
        s->loaded_packets = s->packets;
    }
    if (s->bytes != s->loaded_bytes) {
        r |= set_u64(s->counters, s_bytes, s->bytes);
        s->loaded_bytes = s->bytes;
    }
    r |= add_drops(s->counters, s->drops);
    return r ? -1 : 0;
}

/* First packet of the slot in this batch: take its counters object and its replay words, read the rest. */
static int slot_load(Slot *s, Slot **loaded) {
    if (s->loaded) return 0;
    memset(s->drops, 0, sizeof(s->drops));
    s->counters = PyObject_GetAttr(s->sa, s_counters);
    if (s->counters == NULL) return -1;
    if (!s->outbound) {
        PyObject *replay = PyObject_GetAttr(s->sa, s_replay), *v, *blocks;
        uint64_t size = 0;
        if (replay == NULL) goto fail;
        v = PyObject_GetAttr(replay, s_size);
        if (v != NULL) size = PyLong_AsUnsignedLongLong(v);
        Py_XDECREF(v);
        blocks = PyErr_Occurred() ? NULL : PyObject_GetAttr(replay, s_blocks);
        Py_DECREF(replay);
        if (blocks == NULL) goto fail;
        if (PyObject_GetBuffer(blocks, &s->blocks, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
            Py_DECREF(blocks);
            goto fail;
        }
        Py_DECREF(blocks);
        if (s->blocks.itemsize != 8 || s->blocks.len < 8 || s->blocks.len % 8 || size > (1u << 20) ||
            (uint64_t)s->blocks.len / 8 != (size ? (size + 63) / 64 + 1 : 1)) {
            PyBuffer_Release(&s->blocks);
            PyErr_SetString(PyExc_TypeError, "replay.blocks must be an array('Q') of ceil(W/64)+1 words");
            goto fail;
        }
        s->in.replay.blocks = s->blocks.buf;
        s->in.replay.nblocks = (uint32_t)(s->blocks.len / 8);
        s->in.replay.size = (uint32_t)size;
        s->in.replay.esn = s->esn;
    }
    if (slot_read(s) < 0) {
        if (!s->outbound) PyBuffer_Release(&s->blocks);
        goto fail;
    }
    s->loaded = 1;
    Py_INCREF(s);
    s->next_loaded = *loaded;
    *loaded = s;
    return 0;
fail:
    Py_CLEAR(s->counters);
    return -1;
}

/* Write every loaded slot back and let go of it; keeps the first error. */
static int flush_all(Slot **loaded) {
    int r = 0;
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    if (PyErr_Occurred()) PyErr_Fetch(&et, &ev, &tb);
    while (*loaded) {
        Slot *s = *loaded;
        *loaded = s->next_loaded;
        s->next_loaded = NULL;
        if (slot_write(s) < 0) {
            if (et == NULL)
                PyErr_Fetch(&et, &ev, &tb);
            else
                PyErr_Clear();
            r = -1;
        }
        if (!s->outbound) {
            PyBuffer_Release(&s->blocks);
            s->in.replay.blocks = NULL;
        }
        Py_CLEAR(s->counters);
        s->loaded = 0;
        Py_DECREF(s);
    }
    if (et != NULL) {
        PyErr_Restore(et, ev, tb);
        r = -1;
    }
    return r;
}

/* Call a slow-path method on the SA with the mirror written back, then read the state again. */
static PyObject *slow_path(Slot *s, PyObject *method, PyObject *arg) {
    PyObject *result;
    if (slot_write(s) < 0) return NULL;
    result = arg ? PyObject_CallMethodOneArg(s->sa, method, arg) : PyObject_CallMethodNoArgs(s->sa, method);
    if (result != NULL && slot_read(s) < 0) Py_CLEAR(result);
    return result;
}

/* The sign of a Python int: -1, 0, 1; -2 with an exception set if it is none. */
static int int_sign(PyObject *v) {
    int overflow;
    long long x;
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "expected an int");
        return -2;
    }
    x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return -2;
    return overflow ? overflow : (x > 0) - (x < 0);
}

/* -- batch inputs and outputs ------------------------------------------------------------------- */
typedef struct {
    ef_span *pkts;
    PyObject **objs; /* the bytes object of each packet when it is one (else NULL) */
    size_t n;
    PyObject *tuple;
    Py_buffer *views;
    size_t nviews;
    Py_buffer whole;
    int have_whole;
} Inputs;

static void inputs_release(Inputs *in) {
    for (size_t i = 0; i < in->nviews; i++) PyBuffer_Release(&in->views[i]);
    if (in->have_whole) PyBuffer_Release(&in->whole);
    Py_CLEAR(in->tuple);
    PyMem_Free(in->pkts);
    PyMem_Free(in->objs);
    PyMem_Free(in->views);
    memset(in, 0, sizeof(*in));
}

/* Inputs over `count` spans of one buffer (`in` zeroed or released; the caller keeps `data` alive
 * and unmoved while `in` is used). */
static int inputs_from_spans(Inputs *in, const uint8_t *data, size_t data_len, const uint8_t *spans,
                             size_t spans_len, Py_ssize_t count) {
    if (count < 0 || (size_t)count > spans_len / SPAN_BYTES) {
        PyErr_SetString(PyExc_ValueError, "count exceeds the spans");
        return -1;
    }
    in->pkts = PyMem_Calloc((size_t)count + 1, sizeof(ef_span));
    in->objs = PyMem_Calloc((size_t)count + 1, sizeof(PyObject *));
    if (!in->pkts || !in->objs) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t w[SPAN_WORDS];
        if (span_within(spans, (size_t)i, data_len, w) < 0) return -1;
        in->pkts[i].data = data + w[0];
        in->pkts[i].len = w[1];
    }
    in->n = (size_t)count;
    return 0;
}

static int inputs_load(Inputs *in, PyObject *packets, PyObject *spans, Py_ssize_t count) {
    memset(in, 0, sizeof(*in));
    if (spans == Py_None) {
        Py_ssize_t n;
        in->tuple = PySequence_Tuple(packets);
        if (in->tuple == NULL) return -1;
        n = PyTuple_GET_SIZE(in->tuple);
        in->pkts = PyMem_Calloc((size_t)n + 1, sizeof(ef_span));
        in->objs = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
        in->views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
        if (!in->pkts || !in->objs || !in->views) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PyTuple_GET_ITEM(in->tuple, i);
            if (PyBytes_CheckExact(item)) {
                if (PyBytes_GET_SIZE(item) > UINT32_MAX) goto too_big;
                in->pkts[i].data = (const uint8_t *)PyBytes_AS_STRING(item);
                in->pkts[i].len = (uint32_t)PyBytes_GET_SIZE(item);
                in->objs[i] = item;
            } else {
                Py_buffer *v = &in->views[in->nviews];
                if (PyObject_GetBuffer(item, v, PyBUF_SIMPLE) < 0) return -1;
                in->nviews++;
                if (v->len > UINT32_MAX) goto too_big;
                in->pkts[i].data = v->buf;
                in->pkts[i].len = (uint32_t)v->len;
            }
        }
        in->n = (size_t)n;
        return 0;
    }
    {
        Py_buffer sv;
        int r;
        if (PyObject_GetBuffer(packets, &in->whole, PyBUF_SIMPLE) < 0) return -1;
        in->have_whole = 1;
        if (PyObject_GetBuffer(spans, &sv, PyBUF_SIMPLE) < 0) return -1;
        r = inputs_from_spans(in, in->whole.buf, (size_t)in->whole.len, sv.buf, (size_t)sv.len, count);
        PyBuffer_Release(&sv);
        return r;
    }
too_big:
    PyErr_SetString(PyExc_ValueError, "packet larger than 4 GiB");
    return -1;
}

/* A bytes object for packet i (the original one if it is bytes). New reference. */
static PyObject *input_bytes(const Inputs *in, size_t i) {
    if (in->objs[i] != NULL) {
        Py_INCREF(in->objs[i]);
        return in->objs[i];
    }
    return PyBytes_FromStringAndSize((const char *)in->pkts[i].data, in->pkts[i].len);
}

typedef struct {
    Py_buffer data, spans;
    int have_data, have_spans;
    uint8_t *p;
    size_t cap, at, count, span_cap;
} Outputs;

static int grow(PyObject *ba, size_t need) {
    if (!PyByteArray_Check(ba)) {
        PyErr_SetString(PyExc_TypeError, "outputs must be bytearrays");
        return -1;
    }
    if ((size_t)PyByteArray_GET_SIZE(ba) < need) return PyByteArray_Resize(ba, (Py_ssize_t)need);
    return 0;
}

static int outputs_open(Outputs *o, PyObject *data, PyObject *spans, size_t need, size_t max_count) {
    memset(o, 0, sizeof(*o));
    if (grow(data, need ? need : 1) < 0 || grow(spans, (max_count ? max_count : 1) * SPAN_BYTES) < 0) return -1;
    if (PyObject_GetBuffer(data, &o->data, PyBUF_WRITABLE) < 0) return -1;
    o->have_data = 1;
    if (PyObject_GetBuffer(spans, &o->spans, PyBUF_WRITABLE) < 0) return -1;
    o->have_spans = 1;
    o->p = o->data.buf;
    o->cap = (size_t)o->data.len;
    o->span_cap = (size_t)o->spans.len / SPAN_BYTES;
    return 0;
}

static void outputs_release(Outputs *o) {
    if (o->have_data) PyBuffer_Release(&o->data);
    if (o->have_spans) PyBuffer_Release(&o->spans);
    o->have_data = o->have_spans = 0;
}

/* Unlock the outputs and, when `ok`, trim them to what was written (`data` is then exactly the
 * packets). -1 when a trim failed. */
static int outputs_done(Outputs *o, PyObject *data, PyObject *spans, int ok) {
    int opened = o->have_data && o->have_spans;
    outputs_release(o);
    if (ok && opened &&
        (PyByteArray_Resize(data, (Py_ssize_t)o->at) < 0 ||
         PyByteArray_Resize(spans, (Py_ssize_t)(o->count * SPAN_BYTES)) < 0))
        return -1;
    return 0;
}

static PyObject *outputs_finish(Outputs *o, PyObject *data, PyObject *spans, PyObject *result) {
    if (outputs_done(o, data, spans, result != NULL) < 0) Py_CLEAR(result);
    return result;
}

static int emit(Outputs *o, size_t len, uint32_t tag) {
    uint32_t w[SPAN_WORDS] = {(uint32_t)o->at, (uint32_t)len, tag};
    if (o->count >= o->span_cap || len > o->cap - o->at || o->at + len > UINT32_MAX) {
        PyErr_SetString(PyExc_RuntimeError, "_espfast: output bound miscomputed");
        return -1;
    }
    memcpy((uint8_t *)o->spans.buf + o->count * SPAN_BYTES, w, SPAN_BYTES);
    o->count++;
    o->at += len;
    return 0;
}

/* Copy a bytes result of the Python engine into the output. */
static int emit_bytes(Outputs *o, PyObject *b, uint32_t tag) {
    size_t len = (size_t)PyBytes_GET_SIZE(b);
    if (len > o->cap - o->at) {
        PyErr_SetString(PyExc_RuntimeError, "_espfast: output bound miscomputed");
        return -1;
    }
    memcpy(o->p + o->at, PyBytes_AS_STRING(b), len);
    return emit(o, len, tag);
}

static void account(FlowTableObject *flows, uint32_t spi, int direction, const uint8_t *p, size_t n) {
    ef_inner_header h;
    if (flows == NULL) return;
    ef_flows_add(&flows->flows, spi, direction, ef_parse_inner(p, n, &h) == 0 ? &h : NULL, n);
}

static int enter_batch(void) {
    if (in_batch) {
        PyErr_SetString(PyExc_RuntimeError, "_espfast batches do not nest");
        return -1;
    }
    in_batch = 1;
    return 0;
}

#define EF_SKIP 0xFFFF /* a `which` entry that leaves the packet out */

/* -- encrypt ------------------------------------------------------------------------------------- */
/* encrypt_batch(slots, which, packets, spans, count, now, out, out_spans, flows) -> int
 * slots: tuple of outbound Slots; which: None (all slot 0) or a u16 buffer, one per packet;
 * 0xFFFF leaves that packet out (no output, no count). */
/* The checks encrypt_batch makes before the batch: outbound Slots, a FlowTable or None. */
static int encrypt_check(PyObject *slots, PyObject *flows_obj) {
    if (flows_obj != Py_None && !PyObject_TypeCheck(flows_obj, &FlowTableType)) {
        PyErr_SetString(PyExc_TypeError, "flows must be a FlowTable or None");
        return -1;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(slots); k++) {
        PyObject *s = PyTuple_GET_ITEM(slots, k);
        if (!PyObject_TypeCheck(s, &SlotType) || !((Slot *)s)->outbound || ((Slot *)s)->sa == NULL) {
            PyErr_SetString(PyExc_TypeError, "slots must be initialised outbound Slots");
            return -1;
        }
    }
    return 0;
}

/* The state of a seal loop: the slots, the outputs, the slots loaded into the mirror. */
typedef struct {
    PyObject *slots;
    Outputs o;
    Slot *loaded;
    double now;
    PyObject *now_obj; /* made when a slow path or the Python engine needs it */
    FlowTableObject *flows;
} Sealer;

/* The ESP bytes packet `n` bytes long may take with slot `s`. */
static size_t seal_room(const Slot *s, size_t n) {
    if (s->kind) { /* what does not fit max_esp is dropped, not written */
        size_t sealed = ef_esp_sealed_length(n, s->pad_to);
        return sealed < s->max_esp ? sealed : s->max_esp;
    } else { /* the Python engine: at most an IP packet's worth */
        size_t body = n > s->pad_to ? n : s->pad_to;
        return (body < EF_MAX_IP ? body : EF_MAX_IP) + 128;
    }
}

static PyObject *sealer_now(Sealer *z) {
    if (z->now_obj == NULL) z->now_obj = PyFloat_FromDouble(z->now);
    return z->now_obj;
}

/* Seal one packet with slot k (< the number of slots): 0 (sealed, dropped or counted) or -1.
 * obj: the packet's bytes object when it is one (for the Python engine), else NULL. */
static int seal_one(Sealer *z, uint16_t k, const uint8_t *p, size_t n, PyObject *obj) {
    Slot *s = (Slot *)PyTuple_GET_ITEM(z->slots, k);
    int version, nh;
    uint64_t seq;
    long sealed;
    if (s->kind == SLOT_PYTHON) {
        PyObject *pkt, *esp;
        if (sealer_now(z) == NULL) return -1;
        pkt = obj != NULL ? Py_NewRef(obj) : PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
        if (pkt == NULL) return -1;
        esp = PyObject_CallFunctionObjArgs(py_encrypt_esp, s->sa, pkt, z->now_obj, NULL);
        Py_DECREF(pkt);
        if (esp == NULL) return -1;
        if (esp != Py_None) {
            if (!PyBytes_Check(esp) || emit_bytes(&z->o, esp, k) < 0) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "encrypt_esp returned no bytes");
                Py_DECREF(esp);
                return -1;
            }
            account(z->flows, s->spi, 1, p, n);
        }
        Py_DECREF(esp);
        return 0;
    }
    if (slot_load(s, &z->loaded) < 0) return -1;
    if (z->now >= s->time_mark) { /* outbound_gate */
        PyObject *r;
        if (sealer_now(z) == NULL) return -1;
        r = slow_path(s, s_on_time, z->now_obj);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    if (s->hard_expired) {
        s->drops[EF_LIFETIME]++;
        return 0;
    }
    version = n ? p[0] >> 4 : 0;
    nh = version == 4 ? 4 : version == 6 ? 41 : 0;
    if (!nh || ef_inner_ip_length(p, n) != (long)n) {
        s->drops[EF_MALFORMED]++;
        return 0;
    }
    if (ef_esp_sealed_length(n, s->pad_to) > s->max_esp) {
        s->drops[EF_MALFORMED]++;
        return 0;
    }
    if (s->next_seq < s->seq_mark) {
        seq = s->next_seq++;
    } else {
        PyObject *r = slow_path(s, s_take_sequence, NULL);
        int sign;
        if (r == NULL) return -1;
        sign = int_sign(r);
        seq = sign > 0 ? PyLong_AsUnsignedLongLong(r) : 0;
        Py_DECREF(r);
        if (sign == -2 || PyErr_Occurred()) return -1;
        if (sign < 0) return 0; /* no number may be used: counted by the Python slow path */
        /* slow_path read back next_seq, which take_sequence advanced */
    }
    sealed = ef_esp_seal(&s->aead, s->spi, seq, s->esn, p, n, s->pad_to, (uint8_t)nh, z->o.p + z->o.at,
                         z->o.cap - z->o.at);
    if (sealed < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to seal an ESP packet");
        return -1;
    }
    if (emit(&z->o, (size_t)sealed, k) < 0) return -1;
    s->packets++;
    s->bytes += n;
    if (s->packets >= s->packet_mark || s->bytes >= s->byte_mark) {
        PyObject *r = slow_path(s, s_on_volume, NULL);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    account(z->flows, s->spi, 1, p, n);
    return 0;
}

/* The end of a seal loop (ok: it ran to the end): the mirror written back, the outputs trimmed;
 * the ESP payloads written, or -1. */
static Py_ssize_t sealer_finish(Sealer *z, PyObject *out, PyObject *out_spans, int ok) {
    PyObject *result = ok ? Py_NewRef(Py_None) : NULL;
    Py_ssize_t count = -1;
    if (flush_all(&z->loaded) < 0) Py_CLEAR(result);
    result = outputs_finish(&z->o, out, out_spans, result);
    if (result != NULL) {
        count = (Py_ssize_t)z->o.count;
        Py_DECREF(result);
    }
    Py_CLEAR(z->now_obj);
    return count;
}

static void sealer_init(Sealer *z, PyObject *slots, double now, PyObject *flows_obj) {
    memset(z, 0, sizeof(*z));
    z->slots = slots;
    z->now = now;
    z->flows = flows_obj == Py_None ? NULL : (FlowTableObject *)flows_obj;
}

/* The batch (checked, inside enter_batch): which NULL (all slot 0) or `which_len` bytes of u16. */
static Py_ssize_t encrypt_inputs(PyObject *slots, const uint8_t *which, size_t which_len, const Inputs *in,
                                 double now, PyObject *out, PyObject *out_spans, PyObject *flows_obj) {
    Sealer z;
    size_t need = 0, nslots = (size_t)PyTuple_GET_SIZE(slots);
    int ok = 0;

    sealer_init(&z, slots, now, flows_obj);
    if (which != NULL && which_len < in->n * 2) {
        PyErr_SetString(PyExc_ValueError, "which: one u16 slot index per packet");
        goto done;
    }
    for (size_t i = 0; i < in->n; i++) {
        uint16_t k = 0;
        if (which != NULL) memcpy(&k, which + 2 * i, 2);
        if (k == EF_SKIP) continue;
        if (k >= nslots) {
            PyErr_SetString(PyExc_IndexError, "which: slot index out of range");
            goto done;
        }
        need += seal_room((Slot *)PyTuple_GET_ITEM(slots, k), in->pkts[i].len);
    }
    if (outputs_open(&z.o, out, out_spans, need, in->n) < 0) goto done;
    for (size_t i = 0; i < in->n; i++) {
        uint16_t k = 0;
        if (which != NULL) memcpy(&k, which + 2 * i, 2);
        if (k == EF_SKIP) continue; /* the caller's decision (no SA, handed off): counted there */
        if (seal_one(&z, k, in->pkts[i].data, in->pkts[i].len, in->objs[i]) < 0) goto done;
    }
    ok = 1;
done:
    return sealer_finish(&z, out, out_spans, ok);
}

/* The TSO/USO split and the seal in one pass (see espfast_steps.h), with the checks and errors of
 * split_frames, clamp_mss and encrypt_batch in the order the pump called them. */
static Py_ssize_t split_seal(PyObject *slots, const uint16_t *frame_slot, const Inputs *in, int mss4, int mss6,
                             double now, PyObject *out, PyObject *out_spans, PyObject *flows_obj,
                             Py_ssize_t *npackets, Py_ssize_t *ndropped, Py_ssize_t *nclamped) {
    Sealer z;
    ef_split_cursor c;
    size_t need = 0, npkts = 0, dropped = 0, nslots = (size_t)PyTuple_GET_SIZE(slots);
    long clamped = 0;
    int ok = 0;

    for (size_t f = 0; f < in->n; f++) {
        long count = ef_split_start(&c, (uint8_t *)in->pkts[f].data, in->pkts[f].len);
        if (count < 0)
            dropped++;
        else
            npkts += (size_t)count;
    }
    *npackets = (Py_ssize_t)npkts;
    *ndropped = (Py_ssize_t)dropped;
    *nclamped = 0;
    if (npkts == 0) return 0; /* nothing to clamp or seal: the outputs stay as they were */
    if (mss4 >= 0 && (mss4 > 0xFFFF || mss6 < 0 || mss6 > 0xFFFF)) {
        PyErr_SetString(PyExc_ValueError, "bad clamp_mss arguments");
        return -1;
    }
    if (encrypt_check(slots, flows_obj) < 0 || enter_batch() < 0) return -1;
    sealer_init(&z, slots, now, flows_obj);
    for (size_t f = 0; f < in->n; f++) {
        long count = ef_split_start(&c, (uint8_t *)in->pkts[f].data, in->pkts[f].len);
        Slot *s;
        if (count < 0) continue;
        if (frame_slot[f] >= nslots) {
            PyErr_SetString(PyExc_IndexError, "which: slot index out of range");
            goto done;
        }
        s = (Slot *)PyTuple_GET_ITEM(slots, frame_slot[f]);
        for (size_t i = 0; i < (size_t)count; i++) need += seal_room(s, ef_split_length(&c, i));
    }
    if (outputs_open(&z.o, out, out_spans, need, npkts) < 0) goto done;
    for (size_t f = 0; f < in->n; f++) {
        uint8_t *p;
        if (ef_split_start(&c, (uint8_t *)in->pkts[f].data, in->pkts[f].len) < 0) continue;
        for (size_t i = 0; (p = ef_split_next(&c)) != NULL; i++) { /* each packet used before the next is built */
            size_t n = ef_split_length(&c, i);
            if (mss4 >= 0) clamped += ef_clamp_mss(p, n, (uint16_t)mss4, (uint16_t)mss6);
            if (seal_one(&z, frame_slot[f], p, n, NULL) < 0) goto done;
        }
    }
    *nclamped = (Py_ssize_t)clamped;
    ok = 1;
done:
    in_batch = 0;
    return sealer_finish(&z, out, out_spans, ok);
}

Py_ssize_t ef_split_seal_frames(PyObject *slots, const uint16_t *frame_slot, uint8_t *frames, size_t frames_len,
                                const uint8_t *spans, size_t spans_len, Py_ssize_t count, int mss4, int mss6,
                                double now, PyObject *out, PyObject *out_spans, PyObject *flows,
                                Py_ssize_t *npackets, Py_ssize_t *dropped, Py_ssize_t *clamped) {
    Inputs in;
    Py_ssize_t n = -1;
    *npackets = *dropped = *clamped = 0;
    if (!PyTuple_Check(slots)) {
        PyErr_SetString(PyExc_TypeError, "slots must be a tuple");
        return -1;
    }
    memset(&in, 0, sizeof(in));
    if (inputs_from_spans(&in, frames, frames_len, spans, spans_len, count) == 0)
        n = split_seal(slots, frame_slot, &in, mss4, mss6, now, out, out_spans, flows, npackets, dropped, clamped);
    inputs_release(&in);
    return n;
}

static PyObject *encrypt_batch(PyObject *mod, PyObject *args) {
    PyObject *slots, *which, *packets, *spans, *out, *out_spans, *flows;
    Py_ssize_t count, n = -1;
    double now;
    Inputs in;
    Py_buffer wv;
    int have_which = 0;

    memset(&in, 0, sizeof(in));
    if (!PyArg_ParseTuple(args, "O!OOOndO!O!O", &PyTuple_Type, &slots, &which, &packets, &spans, &count, &now,
                          &PyByteArray_Type, &out, &PyByteArray_Type, &out_spans, &flows))
        return NULL;
    if (encrypt_check(slots, flows) < 0 || enter_batch() < 0) return NULL;
    if (inputs_load(&in, packets, spans, count) < 0) goto done;
    if (which != Py_None) {
        if (PyObject_GetBuffer(which, &wv, PyBUF_SIMPLE) < 0) goto done;
        have_which = 1;
    }
    n = encrypt_inputs(slots, have_which ? wv.buf : NULL, have_which ? (size_t)wv.len : 0, &in, now, out, out_spans,
                       flows);
done:
    if (have_which) PyBuffer_Release(&wv);
    inputs_release(&in);
    in_batch = 0;
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* -- the inbound SA table ------------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD PyObject *counters; /* TrafficCounters of drops that belong to no SA */
    PyObject *by_spi;                 /* dict spi -> Slot: the Python view */
    Slot **buckets;
    uint32_t nbuckets;
    uint64_t drops[EF_NREASONS];
} TableObject;

static int Table_init(TableObject *self, PyObject *args, PyObject *kw) {
    PyObject *counters;
    if (!PyArg_ParseTuple(args, "O", &counters)) return -1;
    Py_INCREF(counters);
    Py_XSETREF(self->counters, counters);
    Py_XSETREF(self->by_spi, PyDict_New());
    return self->by_spi ? 0 : -1;
}

static void Table_dealloc(TableObject *self) {
    PyMem_Free(self->buckets);
    Py_XDECREF(self->counters);
    Py_XDECREF(self->by_spi);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline uint32_t spi_hash(uint32_t spi) { return (uint32_t)((spi * 0x9E3779B97F4A7C15ull) >> 32); }

static int Table_rebuild(TableObject *self) {
    Py_ssize_t n = PyDict_GET_SIZE(self->by_spi), pos = 0;
    uint32_t nb = 16;
    PyObject *key, *value;
    Slot **b;
    while (nb < 2 * (uint32_t)n) nb <<= 1;
    b = PyMem_Calloc(nb, sizeof(Slot *));
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    while (PyDict_Next(self->by_spi, &pos, &key, &value)) {
        Slot *s = (Slot *)value;
        uint32_t i = spi_hash(s->spi) & (nb - 1);
        while (b[i]) i = (i + 1) & (nb - 1);
        b[i] = s; /* borrowed: by_spi holds the reference */
    }
    PyMem_Free(self->buckets);
    self->buckets = b;
    self->nbuckets = nb;
    return 0;
}

static Slot *table_find(const TableObject *t, uint32_t spi) {
    uint32_t mask = t->nbuckets - 1;
    if (t->buckets == NULL) return NULL;
    for (uint32_t i = spi_hash(spi) & mask;; i = (i + 1) & mask) {
        Slot *s = t->buckets[i];
        if (s == NULL || s->spi == spi) return s;
    }
}

static PyObject *Table_add(TableObject *self, PyObject *slot) {
    PyObject *key;
    int r;
    if (!PyObject_TypeCheck(slot, &SlotType) || ((Slot *)slot)->outbound || ((Slot *)slot)->sa == NULL) {
        PyErr_SetString(PyExc_TypeError, "add() takes an initialised inbound Slot");
        return NULL;
    }
    if (in_batch) {
        PyErr_SetString(PyExc_RuntimeError, "cannot change the table while a batch runs");
        return NULL;
    }
    key = PyLong_FromUnsignedLong(((Slot *)slot)->spi);
    if (key == NULL) return NULL;
    r = PyDict_Contains(self->by_spi, key);
    if (r == 0) r = PyDict_SetItem(self->by_spi, key, slot);
    else if (r == 1) PyErr_Format(PyExc_ValueError, "inbound SPI %#x is already installed", ((Slot *)slot)->spi), r = -1;
    Py_DECREF(key);
    if (r < 0 || Table_rebuild(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Table_remove(TableObject *self, PyObject *spi) {
    PyObject *slot;
    if (in_batch) {
        PyErr_SetString(PyExc_RuntimeError, "cannot change the table while a batch runs");
        return NULL;
    }
    slot = PyDict_GetItemWithError(self->by_spi, spi);
    if (slot == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    Py_INCREF(slot);
    if (PyDict_DelItem(self->by_spi, spi) < 0 || Table_rebuild(self) < 0) {
        Py_DECREF(slot);
        return NULL;
    }
    return slot;
}

static PyObject *Table_get(TableObject *self, PyObject *spi) {
    PyObject *slot = PyDict_GetItemWithError(self->by_spi, spi);
    if (slot == NULL) {
        if (PyErr_Occurred()) return NULL;
        slot = Py_None;
    }
    Py_INCREF(slot);
    return slot;
}

static Py_ssize_t Table_len(TableObject *self) { return PyDict_GET_SIZE(self->by_spi); }

static PyMethodDef Table_methods[] = {
    {"add", (PyCFunction)Table_add, METH_O, "Install an inbound Slot under its SPI."},
    {"remove", (PyCFunction)Table_remove, METH_O, "Remove the Slot of an SPI; returns it or None."},
    {"get", (PyCFunction)Table_get, METH_O, "The Slot of an SPI, or None."},
    {NULL}};

static PySequenceMethods Table_as_sequence = {.sq_length = (lenfunc)Table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_espfast.InboundTable",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Inbound Slots by SPI, and the counters of drops that belong to no SA.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
    .tp_as_sequence = &Table_as_sequence,
};

/* -- decrypt ------------------------------------------------------------------------------------- */
/* After the engine passed an inner packet: the identity's filter, flow accounting, output. */
static int deliver(Outputs *o, Slot *s, FlowTableObject *flows, size_t len) {
    const uint8_t *p = o->p + o->at;
    ef_inner_header h;
    int parsed = ef_parse_inner(p, len, &h) == 0;
    if (s->filter != Py_None && s->filter != NULL) {
        FilterObject *f = (FilterObject *)s->filter;
        if (!parsed || !ef_filter_allows(&f->filter, &h)) {
            f->denied++;
            f->last_denied_len = len < DENIED_SAMPLE ? len : DENIED_SAMPLE;
            memcpy(f->last_denied, p, f->last_denied_len);
            return 0;
        }
        f->allowed++;
    }
    if (flows != NULL) ef_flows_add(&flows->flows, s->spi, 0, parsed ? &h : NULL, len);
    return emit(o, len, s->spi);
}

/* decrypt_batch(table, packets, spans, count, now, out, out_spans, flows, non_esp=None) -> int
 * ESP payloads (SPI .. ICV) of any SA in the table -> inner packets; span tags are SPIs.
 * non_esp: a list that receives the input index of every NAT keepalive and non-ESP-marker
 * (IKE) datagram instead of counting them as drops. */
Py_ssize_t ef_decrypt_batch(PyObject *table_obj, PyObject *packets, PyObject *spans, Py_ssize_t count, double now,
                            PyObject *out, PyObject *out_spans, PyObject *flows_obj, PyObject *non_esp) {
    PyObject *now_obj = NULL;
    TableObject *table;
    Py_ssize_t result = -1;
    Inputs in;
    Outputs o;
    Slot *loaded = NULL;
    size_t need = 0;
    FlowTableObject *flows = NULL;

    memset(&in, 0, sizeof(in));
    memset(&o, 0, sizeof(o));
    if (!PyObject_TypeCheck(table_obj, &TableType) || !PyByteArray_Check(out) || !PyByteArray_Check(out_spans)) {
        PyErr_SetString(PyExc_TypeError, "decrypt_batch: table must be an InboundTable, out and out_spans bytearrays");
        return -1;
    }
    table = (TableObject *)table_obj;
    if (non_esp != Py_None && !PyList_Check(non_esp)) {
        PyErr_SetString(PyExc_TypeError, "non_esp must be a list or None");
        return -1;
    }
    if (flows_obj != Py_None) {
        if (!PyObject_TypeCheck(flows_obj, &FlowTableType)) {
            PyErr_SetString(PyExc_TypeError, "flows must be a FlowTable or None");
            return -1;
        }
        flows = (FlowTableObject *)flows_obj;
    }
    if (enter_batch() < 0) return -1;
    Py_INCREF(table);
    if (inputs_load(&in, packets, spans, count) < 0) goto done;
    for (size_t i = 0; i < in.n; i++) need += (size_t)in.pkts[i].len + 64; /* transport mode may add an IP header */
    if (outputs_open(&o, out, out_spans, need, in.n) < 0) goto done;
    now_obj = PyFloat_FromDouble(now);
    if (now_obj == NULL) goto done;

    for (size_t i = 0; i < in.n; i++) {
        const uint8_t *p = in.pkts[i].data;
        size_t n = in.pkts[i].len, inner_len;
        Slot *s;
        int status, accepted;
        if (non_esp != Py_None && ((n == 1 && p[0] == 0xFF) || (n >= 4 && !p[0] && !p[1] && !p[2] && !p[3]))) {
            /* RFC 3948: a NAT keepalive, or IKE behind the non-ESP marker: the shell's, not a drop */
            PyObject *index = PyLong_FromSize_t(i);
            if (index == NULL || PyList_Append(non_esp, index) < 0) {
                Py_XDECREF(index);
                goto done;
            }
            Py_DECREF(index);
            continue;
        }
        if (n < 8) {
            table->drops[EF_MALFORMED]++;
            continue;
        }
        s = table_find(table, (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]);
        if (s == NULL) {
            table->drops[EF_UNKNOWN_SPI]++;
            continue;
        }
        if (s->kind == SLOT_PYTHON) {
            PyObject *pkt = input_bytes(&in, i), *inner;
            if (pkt == NULL) goto done;
            inner = PyObject_CallFunctionObjArgs(py_decrypt_esp, s->sa, pkt, now_obj, NULL);
            Py_DECREF(pkt);
            if (inner == NULL) goto done;
            if (inner != Py_None) {
                size_t len;
                if (!PyBytes_Check(inner)) {
                    PyErr_SetString(PyExc_TypeError, "decrypt_esp returned no bytes");
                    Py_DECREF(inner);
                    goto done;
                }
                len = (size_t)PyBytes_GET_SIZE(inner);
                if (len > o.cap - o.at) {
                    PyErr_SetString(PyExc_RuntimeError, "_espfast: output bound miscomputed");
                    Py_DECREF(inner);
                    goto done;
                }
                memcpy(o.p + o.at, PyBytes_AS_STRING(inner), len);
                if (deliver(&o, s, flows, len) < 0) {
                    Py_DECREF(inner);
                    goto done;
                }
            }
            Py_DECREF(inner);
            continue;
        }
        if (slot_load(s, &loaded) < 0) goto done;
        if (now >= s->time_mark) {
            PyObject *r = slow_path(s, s_on_time, now_obj);
            if (r == NULL) goto done;
            Py_DECREF(r);
        }
        if (s->hard_expired) {
            s->drops[EF_LIFETIME]++;
            continue;
        }
        status = ef_esp_open(&s->in, p, n, o.p + o.at, o.cap - o.at, &inner_len, &accepted);
        if (status == EF_CRYPTO_ERROR) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to open an ESP packet");
            goto done;
        }
        if (accepted && s->in.replay.top >= s->persist_mark) {
            PyObject *r = slow_path(s, s_on_replay_top, NULL);
            if (r == NULL) goto done;
            Py_DECREF(r);
        }
        if (status != EF_OK) {
            s->drops[status]++;
            if (status == EF_POLICY_MISMATCH && s->filter != NULL && s->filter != Py_None) {
                /* a governed SA: keep the head for the decision log's 5-tuple (drop path only) */
                FilterObject *f = (FilterObject *)s->filter;
                f->last_outside_len = inner_len < DENIED_SAMPLE ? inner_len : DENIED_SAMPLE;
                memcpy(f->last_outside, o.p + o.at, f->last_outside_len);
            }
            continue;
        }
        s->packets++;
        s->bytes += inner_len;
        if (s->packets >= s->packet_mark || s->bytes >= s->byte_mark) {
            PyObject *r = slow_path(s, s_on_volume, NULL);
            if (r == NULL) goto done;
            Py_DECREF(r);
        }
        if (deliver(&o, s, flows, inner_len) < 0) goto done;
    }
    result = (Py_ssize_t)o.count;
done:
    if (flush_all(&loaded) < 0) result = -1;
    if (add_drops(table->counters, table->drops) < 0) result = -1;
    if (outputs_done(&o, out, out_spans, result >= 0) < 0) result = -1;
    inputs_release(&in);
    Py_XDECREF(now_obj);
    Py_DECREF(table);
    in_batch = 0;
    return result;
}

static PyObject *decrypt_batch(PyObject *mod, PyObject *args) {
    PyObject *packets, *spans, *table, *out, *out_spans, *flows, *non_esp = Py_None;
    Py_ssize_t count, n;
    double now;
    if (!PyArg_ParseTuple(args, "O!OOndO!O!O|O", &TableType, &table, &packets, &spans, &count, &now, &PyByteArray_Type,
                          &out, &PyByteArray_Type, &out_spans, &flows, &non_esp))
        return NULL;
    n = ef_decrypt_batch(table, packets, spans, count, now, out, out_spans, flows, non_esp);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* -- segmentation -------------------------------------------------------------------------------- */
/* split_frames(frames, spans, count, out, out_spans) -> (packets, dropped)
 * TUN frames (virtio_net_hdr + packet) -> wire packets; span tags are frame indices. */
/* The split over loaded inputs. */
static int split_inputs(const Inputs *in, PyObject *out, PyObject *out_spans, Py_ssize_t *npackets,
                        Py_ssize_t *ndropped) {
    Outputs o;
    size_t need = 0, npkts = 0, dropped = 0;
    uint32_t *lens = NULL;
    int ok = 0;
    memset(&o, 0, sizeof(o));
    for (size_t i = 0; i < in->n; i++) {
        size_t bytes;
        long c = ef_split_size(in->pkts[i].data, in->pkts[i].len, &bytes);
        if (c > 0) {
            need += bytes;
            npkts += (size_t)c;
        }
    }
    lens = PyMem_Malloc((npkts + 1) * sizeof(uint32_t));
    if (lens == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (outputs_open(&o, out, out_spans, need, npkts) < 0) goto done;
    for (size_t i = 0; i < in->n; i++) {
        long c = ef_split_frame(in->pkts[i].data, in->pkts[i].len, o.p + o.at, o.cap - o.at, lens, npkts - o.count);
        if (c < 0) {
            dropped++;
            continue;
        }
        for (long k = 0; k < c; k++)
            if (emit(&o, lens[k], (uint32_t)i) < 0) goto done;
    }
    *npackets = (Py_ssize_t)o.count;
    *ndropped = (Py_ssize_t)dropped;
    ok = 1;
done:
    PyMem_Free(lens);
    {
        PyObject *r = outputs_finish(&o, out, out_spans, ok ? Py_NewRef(Py_None) : NULL);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    return 0;
}

int ef_split_frames_into(const uint8_t *frames, size_t frames_len, const uint8_t *spans, size_t spans_len,
                         Py_ssize_t count, PyObject *out, PyObject *out_spans, Py_ssize_t *npackets,
                         Py_ssize_t *dropped) {
    Inputs in;
    int r;
    memset(&in, 0, sizeof(in));
    *npackets = *dropped = 0;
    r = inputs_from_spans(&in, frames, frames_len, spans, spans_len, count) < 0
            ? -1
            : split_inputs(&in, out, out_spans, npackets, dropped);
    inputs_release(&in);
    return r;
}

static PyObject *split_frames(PyObject *mod, PyObject *args) {
    PyObject *frames, *spans, *out, *out_spans, *result = NULL;
    Py_ssize_t count, npackets, dropped;
    Inputs in;
    if (!PyArg_ParseTuple(args, "OOnO!O!", &frames, &spans, &count, &PyByteArray_Type, &out, &PyByteArray_Type,
                          &out_spans))
        return NULL;
    if (inputs_load(&in, frames, spans, count) == 0 && split_inputs(&in, out, out_spans, &npackets, &dropped) == 0)
        result = Py_BuildValue("(nn)", npackets, dropped);
    inputs_release(&in);
    return result;
}

/* coalesce(packets, spans, count, merge_udp, out, out_spans) -> int
 * Inner packets -> TUN frames with merged TCP (and UDP) runs; span tags are each frame's first packet. */
Py_ssize_t ef_coalesce(PyObject *packets, PyObject *spans, Py_ssize_t count, int merge_udp, PyObject *out,
                       PyObject *out_spans) {
    Py_ssize_t result = -1;
    Inputs in;
    Outputs o;
    void *scratch = NULL;
    uint32_t *lens = NULL, *firsts = NULL;
    ef_coalesce_state st;
    size_t need;
    long frames;
    memset(&in, 0, sizeof(in));
    memset(&o, 0, sizeof(o));
    if (!PyByteArray_Check(out) || !PyByteArray_Check(out_spans)) {
        PyErr_SetString(PyExc_TypeError, "coalesce: out and out_spans must be bytearrays");
        return -1;
    }
    if (inputs_load(&in, packets, spans, count) < 0) goto done;
    scratch = PyMem_Malloc(ef_coalesce_scratch_bytes(in.n) + 16);
    lens = PyMem_Malloc((in.n + 1) * sizeof(uint32_t));
    firsts = PyMem_Malloc((in.n + 1) * sizeof(uint32_t));
    if (scratch == NULL || lens == NULL || firsts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    need = ef_coalesce_plan(in.pkts, in.n, merge_udp, scratch, &st);
    if (outputs_open(&o, out, out_spans, need, st.nitems) < 0) goto done;
    frames = ef_coalesce_write(in.pkts, &st, o.p, o.cap, lens, firsts, in.n);
    if (frames < 0) {
        PyErr_SetString(PyExc_RuntimeError, "_espfast: coalesce output bound miscomputed");
        goto done;
    }
    for (long k = 0; k < frames; k++)
        if (emit(&o, lens[k], firsts[k]) < 0) goto done;
    result = (Py_ssize_t)o.count;
done:
    if (outputs_done(&o, out, out_spans, result >= 0) < 0) result = -1;
    inputs_release(&in);
    PyMem_Free(scratch);
    PyMem_Free(lens);
    PyMem_Free(firsts);
    return result;
}

static PyObject *coalesce(PyObject *mod, PyObject *args) {
    PyObject *packets, *spans, *out, *out_spans;
    Py_ssize_t count, n;
    int merge_udp;
    if (!PyArg_ParseTuple(args, "OOnpO!O!", &packets, &spans, &count, &merge_udp, &PyByteArray_Type, &out,
                          &PyByteArray_Type, &out_spans))
        return NULL;
    n = ef_coalesce(packets, spans, count, merge_udp, out, out_spans);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* -- helpers for the UDP room ------------------------------------------------------------------- */
/* gso_runs(spans, count, max_segments, max_bytes) -> [(offset, length, segment, count, tag)]
 * Runs of packets that can leave in one UDP GSO send: contiguous in the buffer, the same tag,
 * all of the first one's size but a shorter last one, at most max_segments and max_bytes. */
static PyObject *gso_runs(PyObject *mod, PyObject *args) {
    Py_buffer sv;
    Py_ssize_t count, max_segments, max_bytes;
    PyObject *out;
    size_t i = 0;
    if (!PyArg_ParseTuple(args, "y*nnn", &sv, &count, &max_segments, &max_bytes)) return NULL;
    if (count < 0 || (size_t)count * SPAN_BYTES > (size_t)sv.len || max_segments < 1 || max_bytes < 1) {
        PyBuffer_Release(&sv);
        PyErr_SetString(PyExc_ValueError, "bad gso_runs arguments");
        return NULL;
    }
    out = PyList_New(0);
    while (out != NULL && i < (size_t)count) {
        uint32_t first[SPAN_WORDS], w[SPAN_WORDS];
        size_t j = i + 1, total, end;
        PyObject *run;
        memcpy(first, (uint8_t *)sv.buf + i * SPAN_BYTES, SPAN_BYTES);
        total = first[1];
        end = (size_t)first[0] + first[1];
        while (j < (size_t)count && j - i < (size_t)max_segments) {
            memcpy(w, (uint8_t *)sv.buf + j * SPAN_BYTES, SPAN_BYTES);
            if (w[2] != first[2] || w[0] != end || w[1] > first[1] || total + w[1] > (size_t)max_bytes) break;
            total += w[1];
            end += w[1];
            j++;
            if (w[1] < first[1]) break;
        }
        run = Py_BuildValue("(kknnk)", (unsigned long)first[0], (unsigned long)total, (Py_ssize_t)first[1],
                            (Py_ssize_t)(j - i), (unsigned long)first[2]);
        if (run == NULL || PyList_Append(out, run) < 0) Py_CLEAR(out);
        Py_XDECREF(run);
        i = j;
    }
    PyBuffer_Release(&sv);
    return out;
}

/* segment_spans(nbytes, segment, tag, offset=0) -> bytearray: spans cutting a GRO read (lying at
 * `offset` of its buffer) into its datagrams. */
static PyObject *segment_spans(PyObject *mod, PyObject *args) {
    Py_ssize_t nbytes, segment, offset = 0;
    unsigned long tag;
    PyObject *out;
    size_t n;
    uint32_t *w;
    if (!PyArg_ParseTuple(args, "nnk|n", &nbytes, &segment, &tag, &offset)) return NULL;
    if (nbytes < 0 || segment < 1 || offset < 0 || (uint64_t)nbytes + (uint64_t)offset > UINT32_MAX ||
        tag > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad segment_spans arguments");
        return NULL;
    }
    n = ((size_t)nbytes + (size_t)segment - 1) / (size_t)segment;
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(n * SPAN_BYTES));
    if (out == NULL) return NULL;
    w = (uint32_t *)PyByteArray_AS_STRING(out);
    for (size_t k = 0; k < n; k++) {
        size_t at = k * (size_t)segment, len = (size_t)nbytes - at < (size_t)segment ? (size_t)nbytes - at : (size_t)segment;
        w[3 * k] = (uint32_t)(at + (size_t)offset);
        w[3 * k + 1] = (uint32_t)len;
        w[3 * k + 2] = (uint32_t)tag;
    }
    return out;
}

/* -- the TUN room's syscalls, one call per batch ------------------------------------------------ */
/* read_frames(fd, buf, spans, limit, frame_max) -> (count, errno)
 * Reads up to `limit` frames from a non-blocking descriptor into `buf`, back to back, each given
 * `frame_max` bytes of room, and their spans (offset, length, index) into `spans`; both bytearrays
 * are grown once to their full size and then reused. Stops at EAGAIN (errno 0), at end of file,
 * or at another error (its errno, after the frames read before it). */
int ef_read_frames_into(int fd, PyObject *buf, PyObject *spans, Py_ssize_t limit, Py_ssize_t frame_max,
                        Py_ssize_t *count, int *err) {
    Py_buffer bv, sv;
    size_t at = 0, n = 0;
    *count = 0;
    *err = 0;
    if (limit < 1 || frame_max < 1 || frame_max > (1 << 20) || limit > 4096) {
        PyErr_SetString(PyExc_ValueError, "bad read_frames arguments");
        return -1;
    }
    if (grow(buf, (size_t)limit * (size_t)frame_max) < 0 || grow(spans, (size_t)limit * SPAN_BYTES) < 0) return -1;
    if (PyObject_GetBuffer(buf, &bv, PyBUF_WRITABLE) < 0) return -1;
    if (PyObject_GetBuffer(spans, &sv, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&bv);
        return -1;
    }
    while (n < (size_t)limit && at + (size_t)frame_max <= (size_t)bv.len && (n + 1) * SPAN_BYTES <= (size_t)sv.len) {
        ssize_t r = read(fd, (uint8_t *)bv.buf + at, (size_t)frame_max);
        uint32_t w[SPAN_WORDS];
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) *err = errno;
            break;
        }
        if (r == 0) break;
        w[0] = (uint32_t)at;
        w[1] = (uint32_t)r;
        w[2] = (uint32_t)n;
        memcpy((uint8_t *)sv.buf + n * SPAN_BYTES, w, SPAN_BYTES);
        at += (size_t)r;
        n++;
    }
    PyBuffer_Release(&bv);
    PyBuffer_Release(&sv);
    *count = (Py_ssize_t)n;
    return 0;
}

static PyObject *read_frames(PyObject *mod, PyObject *args) {
    int fd, err;
    PyObject *buf, *spans;
    Py_ssize_t limit, frame_max, n;
    if (!PyArg_ParseTuple(args, "iO!O!nn", &fd, &PyByteArray_Type, &buf, &PyByteArray_Type, &spans, &limit,
                          &frame_max))
        return NULL;
    if (ef_read_frames_into(fd, buf, spans, limit, frame_max, &n, &err) < 0) return NULL;
    return Py_BuildValue("(ni)", n, err);
}

/* recv_gro(fd, buf, spans, max_reads, read_max, accept) -> (count, reads, spis, odd, errnos)
 * The UDP room's receive loop: up to `max_reads` recvmsg(2) calls (UDP_GRO batches) into `buf`,
 * back to back, each given `read_max` bytes of room, until EAGAIN. A read whose datagrams all
 * start with one SPI found in the set `accept` (the UDP-encapsulated SAs this worker owns) is
 * cut into spans (offset, length, 0) in `spans`: `count` of them, their SPIs in `spis`. Every
 * other read stays in the buffer for the caller, listed in `odd` as (offset, nbytes, segment,
 * (address, port), pktinfo) with pktinfo the raw IP_PKTINFO/IPV6_PKTINFO control message or
 * None. Truncated reads are dropped; `errnos` lists failed calls (ICMP errors queued on the
 * socket), which do not end the loop before max_reads calls. */
int ef_recv_gro(int fd, PyObject *buf, PyObject *spans, Py_ssize_t max_reads, Py_ssize_t read_max, PyObject *accept,
                ef_gro_reads *got) {
    PyObject *spis = NULL, *odd = NULL, *errnos = NULL;
    Py_buffer bv, sv;
    int have_b = 0, have_s = 0, status = -1;
    size_t at = 0, count = 0, reads = 0;
    long calls = 0;
    uint32_t last_spi = 0;
    int have_last = 0;
    memset(got, 0, sizeof(*got));
    if (!PyByteArray_Check(buf) || !PyByteArray_Check(spans) || !PyAnySet_Check(accept)) {
        PyErr_SetString(PyExc_TypeError, "recv_gro: buf and spans must be bytearrays, accept a set");
        return -1;
    }
    if (max_reads < 1 || max_reads > 1024 || read_max < 1 || read_max > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "bad recv_gro arguments");
        return -1;
    }
    /* at most read_max / 8 + 1 datagrams of at least 8 bytes per accepted read */
    if (grow(buf, (size_t)max_reads * (size_t)read_max) < 0 ||
        grow(spans, (size_t)max_reads * ((size_t)read_max / 8 + 1) * SPAN_BYTES) < 0)
        return -1;
    spis = PyList_New(0);
    odd = PyList_New(0);
    errnos = PyList_New(0);
    if (spis == NULL || odd == NULL || errnos == NULL) goto done;
    if (PyObject_GetBuffer(buf, &bv, PyBUF_WRITABLE) < 0) goto done;
    have_b = 1;
    if (PyObject_GetBuffer(spans, &sv, PyBUF_WRITABLE) < 0) goto done;
    have_s = 1;
    while (calls < max_reads && at + (size_t)read_max <= (size_t)bv.len) {
        struct sockaddr_storage from;
        union {
            char buf[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct in6_pktinfo))];
            struct cmsghdr align;
        } control;
        struct iovec iov = {(uint8_t *)bv.buf + at, (size_t)read_max};
        struct msghdr msg;
        struct cmsghdr *c;
        const uint8_t *p = (const uint8_t *)bv.buf + at;
        PyObject *pktinfo = Py_None;
        ssize_t r;
        size_t nbytes, segment, n, k;
        uint32_t spi;
        int uniform = 1;
        memset(&msg, 0, sizeof(msg));
        msg.msg_name = &from;
        msg.msg_namelen = sizeof(from);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        r = recvmsg(fd, &msg, MSG_DONTWAIT);
        if (r < 0) {
            PyObject *e;
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            calls++;
            e = PyLong_FromLong(errno);
            if (e == NULL || PyList_Append(errnos, e) < 0) {
                Py_XDECREF(e);
                goto done;
            }
            Py_DECREF(e);
            continue;
        }
        calls++;
        nbytes = (size_t)r;
        if ((msg.msg_flags & MSG_TRUNC) || nbytes == 0) {
            PyObject *e = PyLong_FromLong((msg.msg_flags & MSG_TRUNC) ? EMSGSIZE : 0);
            if (e == NULL || PyList_Append(errnos, e) < 0) {
                Py_XDECREF(e);
                goto done;
            }
            Py_DECREF(e);
            continue;
        }
        reads++;
        segment = nbytes;
        for (c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int g;
                memcpy(&g, CMSG_DATA(c), sizeof(int));
                if (g > 0 && (size_t)g < nbytes) segment = (size_t)g;
            } else if ((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) ||
                       (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO)) {
                size_t len = c->cmsg_len - CMSG_LEN(0);
                if (pktinfo == Py_None) {
                    pktinfo = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type, (const char *)CMSG_DATA(c),
                                            (Py_ssize_t)len);
                    if (pktinfo == NULL) goto done;
                }
            }
        }
        n = (nbytes + segment - 1) / segment;
        spi = nbytes >= 8 && segment >= 8 ? (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]
                                          : 0;
        if (spi == 0 || nbytes - (n - 1) * segment < 8) uniform = 0;
        for (k = 1; uniform && k < n; k++)
            if (memcmp(p, p + k * segment, 4) != 0) uniform = 0;
        if (uniform && !(have_last && spi == last_spi)) {
            PyObject *key = PyLong_FromUnsignedLong(spi);
            int found;
            if (key == NULL) goto done;
            found = PySet_Contains(accept, key);
            if (found > 0 && PyList_Append(spis, key) < 0) found = -1;
            Py_DECREF(key);
            if (found < 0) goto done;
            uniform = found;
            if (found) {
                last_spi = spi;
                have_last = 1;
            }
        }
        if (uniform) {
            if ((count + n) * SPAN_BYTES > (size_t)sv.len) { /* cannot happen: sized above */
                PyErr_SetString(PyExc_RuntimeError, "_espfast: recv_gro span bound miscomputed");
                Py_XDECREF(pktinfo == Py_None ? NULL : pktinfo);
                goto done;
            }
            for (k = 0; k < n; k++) {
                uint32_t w[SPAN_WORDS];
                size_t off = k * segment;
                w[0] = (uint32_t)(at + off);
                w[1] = (uint32_t)(nbytes - off < segment ? nbytes - off : segment);
                w[2] = 0;
                memcpy((uint8_t *)sv.buf + (count + k) * SPAN_BYTES, w, SPAN_BYTES);
            }
            count += n;
            if (pktinfo != Py_None) Py_DECREF(pktinfo);
        } else {
            char host[INET6_ADDRSTRLEN] = "";
            int port = 0;
            PyObject *entry;
            if (from.ss_family == AF_INET) {
                struct sockaddr_in *a = (struct sockaddr_in *)&from;
                inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
                port = ntohs(a->sin_port);
            } else if (from.ss_family == AF_INET6) {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *)&from;
                inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
                port = ntohs(a->sin6_port);
            }
            entry = Py_BuildValue("(nnn(si)O)", (Py_ssize_t)at, (Py_ssize_t)nbytes, (Py_ssize_t)segment, host, port,
                                  pktinfo);
            if (pktinfo != Py_None) Py_DECREF(pktinfo);
            if (entry == NULL || PyList_Append(odd, entry) < 0) {
                Py_XDECREF(entry);
                goto done;
            }
            Py_DECREF(entry);
        }
        at += nbytes;
    }
    got->count = (Py_ssize_t)count;
    got->reads = (Py_ssize_t)reads;
    got->spis = spis;
    got->odd = odd;
    got->errnos = errnos;
    spis = odd = errnos = NULL;
    status = 0;
done:
    if (have_b) PyBuffer_Release(&bv);
    if (have_s) PyBuffer_Release(&sv);
    Py_XDECREF(spis);
    Py_XDECREF(odd);
    Py_XDECREF(errnos);
    return status;
}

static PyObject *recv_gro(PyObject *mod, PyObject *args) {
    int fd;
    PyObject *buf, *spans, *accept;
    Py_ssize_t max_reads, read_max;
    ef_gro_reads got;
    if (!PyArg_ParseTuple(args, "iO!O!nnO!", &fd, &PyByteArray_Type, &buf, &PyByteArray_Type, &spans, &max_reads,
                          &read_max, &PySet_Type, &accept))
        return NULL;
    if (ef_recv_gro(fd, buf, spans, max_reads, read_max, accept, &got) < 0) return NULL;
    return Py_BuildValue("(nnNNN)", got.count, got.reads, got.spis, got.odd, got.errnos);
}

/* send_runs(fd, data, spans, count, dests, gso, max_segments, max_bytes) -> (sent, sends, aside)
 * The UDP room's send loop for a batch of ESP payloads (tags: slot index): runs of contiguous
 * payloads with one tag, all of the first one's size but a shorter last one (as gso_runs plans
 * them), each sent with one sendmsg(2) carrying UDP_SEGMENT (`gso` true and more than one
 * payload) or one sendto(2) per payload. `dests[tag]` is the packed sockaddr of the slot's
 * endpoint, or None for a slot the caller sends itself (plain ESP). Runs not sent - None
 * destination, or a failed call - come back in `aside` as (offset, length, segment, count,
 * tag, errno) with errno 0 for a None destination; the caller falls back or counts them. */
int ef_send_runs_from(int fd, const uint8_t *data, size_t data_len, const uint8_t *spans, size_t spans_len,
                      Py_ssize_t count, PyObject *dests, int gso, Py_ssize_t max_segments, Py_ssize_t max_bytes,
                      Py_ssize_t *sent_out, Py_ssize_t *sends_out, PyObject **aside_out) {
    Py_ssize_t sent = 0, sends = 0;
    PyObject *aside = NULL;
    size_t i = 0;
    *aside_out = NULL;
    if (count < 0 || (size_t)count > spans_len / SPAN_BYTES || max_segments < 1 || max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "bad send_runs arguments");
        return -1;
    }
    aside = PyList_New(0);
    if (aside == NULL) return -1;
    while (i < (size_t)count) {
        uint32_t first[SPAN_WORDS], w[SPAN_WORDS];
        size_t j = i + 1, total, end, n;
        PyObject *dest;
        int err = 0;
        if (span_within(spans, i, data_len, first) < 0) goto done;
        total = first[1];
        end = (size_t)first[0] + first[1];
        while (j < (size_t)count && j - i < (size_t)max_segments) {
            memcpy(w, spans + j * SPAN_BYTES, SPAN_BYTES);
            if (w[2] != first[2] || w[0] != end || w[1] > first[1] || total + w[1] > (size_t)max_bytes) break;
            if (span_within(spans, j, data_len, w) < 0) goto done; /* the run goes out whole: all of it inside */
            total += w[1];
            end += w[1];
            j++;
            if (w[1] < first[1]) break;
        }
        n = j - i;
        dest = first[2] < (uint32_t)PyTuple_GET_SIZE(dests) ? PyTuple_GET_ITEM(dests, first[2]) : Py_None;
        if (dest != Py_None && (!PyBytes_Check(dest) || PyBytes_GET_SIZE(dest) < (Py_ssize_t)sizeof(sa_family_t))) {
            PyErr_SetString(PyExc_TypeError, "send_runs: a destination is not a packed sockaddr");
            goto done;
        }
        if (dest != Py_None) {
            const uint8_t *p = data + first[0];
            struct sockaddr *to = (struct sockaddr *)PyBytes_AS_STRING(dest);
            socklen_t tolen = (socklen_t)PyBytes_GET_SIZE(dest);
            if (gso && n > 1) {
                union {
                    char buf[CMSG_SPACE(sizeof(uint16_t))];
                    struct cmsghdr align;
                } control;
                struct iovec iov = {(void *)p, total};
                struct msghdr msg;
                struct cmsghdr *c;
                uint16_t segment = (uint16_t)first[1];
                memset(&msg, 0, sizeof(msg));
                memset(&control, 0, sizeof(control));
                msg.msg_name = to;
                msg.msg_namelen = tolen;
                msg.msg_iov = &iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.buf;
                msg.msg_controllen = sizeof(control.buf);
                c = CMSG_FIRSTHDR(&msg);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                memcpy(CMSG_DATA(c), &segment, sizeof(segment));
                if (sendmsg(fd, &msg, 0) < 0 && (errno != EINTR || sendmsg(fd, &msg, 0) < 0)) {
                    err = errno;
                } else {
                    sent += (Py_ssize_t)n;
                    sends++;
                }
            } else {
                for (size_t k = 0; k < n; k++) {
                    size_t off = (size_t)first[1] * k, len = total - off < first[1] ? total - off : first[1];
                    if (sendto(fd, p + off, len, 0, to, tolen) < 0 &&
                        (errno != EINTR || sendto(fd, p + off, len, 0, to, tolen) < 0)) {
                        err = errno; /* the rest of this run comes back to the caller */
                        first[0] += (uint32_t)off;
                        total -= off;
                        n -= k;
                        break;
                    }
                    sent++;
                    sends++;
                }
            }
        }
        if (dest == Py_None || err) {
            PyObject *entry = Py_BuildValue("(kknnki)", (unsigned long)first[0], (unsigned long)total,
                                            (Py_ssize_t)first[1], (Py_ssize_t)n, (unsigned long)first[2], err);
            if (entry == NULL || PyList_Append(aside, entry) < 0) {
                Py_XDECREF(entry);
                goto done;
            }
            Py_DECREF(entry);
        }
        i = j;
    }
    *sent_out = sent;
    *sends_out = sends;
    *aside_out = aside;
    return 0;
done:
    Py_XDECREF(aside);
    return -1;
}

static PyObject *send_runs(PyObject *mod, PyObject *args) {
    int fd, gso;
    Py_buffer dv, sv;
    Py_ssize_t count, max_segments, max_bytes, sent, sends;
    PyObject *dests, *aside, *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*nO!pnn", &fd, &dv, &sv, &count, &PyTuple_Type, &dests, &gso, &max_segments,
                          &max_bytes))
        return NULL;
    if (ef_send_runs_from(fd, dv.buf, (size_t)dv.len, sv.buf, (size_t)sv.len, count, dests, gso, max_segments,
                          max_bytes, &sent, &sends, &aside) == 0)
        result = Py_BuildValue("(nnN)", sent, sends, aside);
    PyBuffer_Release(&dv);
    PyBuffer_Release(&sv);
    return result;
}

/* write_frames(fd, data, spans, count) -> (written, errnos)
 * One write(2) per span (a TUN frame each); `errnos` lists the errno of every write that failed
 * (empty when all went through). */
int ef_write_frames(int fd, const uint8_t *data, size_t data_len, const uint8_t *spans, size_t spans_len,
                    Py_ssize_t count, Py_ssize_t *written, PyObject *errnos) {
    *written = 0;
    if (count < 0 || (size_t)count * SPAN_BYTES > spans_len) {
        PyErr_SetString(PyExc_ValueError, "count exceeds the spans");
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t w[SPAN_WORDS];
        ssize_t r;
        if (span_within(spans, (size_t)i, data_len, w) < 0) return -1;
        r = write(fd, data + w[0], w[1]);
        if (r < 0 && errno == EINTR) r = write(fd, data + w[0], w[1]);
        if (r >= 0) {
            (*written)++;
        } else {
            PyObject *e = PyLong_FromLong(errno);
            if (e == NULL || PyList_Append(errnos, e) < 0) {
                Py_XDECREF(e);
                return -1;
            }
            Py_DECREF(e);
        }
    }
    return 0;
}

static PyObject *write_frames(PyObject *mod, PyObject *args) {
    int fd;
    Py_buffer dv, sv;
    Py_ssize_t count, written = 0;
    PyObject *errnos = NULL, *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*n", &fd, &dv, &sv, &count)) return NULL;
    errnos = PyList_New(0);
    if (errnos != NULL && ef_write_frames(fd, (const uint8_t *)dv.buf, (size_t)dv.len, (const uint8_t *)sv.buf,
                                          (size_t)sv.len, count, &written, errnos) == 0)
        result = Py_BuildValue("(nO)", written, errnos);
    Py_XDECREF(errnos);
    PyBuffer_Release(&dv);
    PyBuffer_Release(&sv);
    return result;
}

/* select_by_tag(spans, count, table) -> bytearray: u16 per packet, table[tag] (table: u16 per tag).
 * Turns one decision per TUN frame into encrypt_batch's `which` for the packets split from it. */
static PyObject *select_by_tag(PyObject *mod, PyObject *args) {
    Py_buffer sv, tv;
    Py_ssize_t count;
    PyObject *out = NULL;
    size_t ntags;
    if (!PyArg_ParseTuple(args, "y*ny*", &sv, &count, &tv)) return NULL;
    ntags = (size_t)tv.len / 2;
    if (count < 0 || (size_t)count * SPAN_BYTES > (size_t)sv.len) {
        PyErr_SetString(PyExc_ValueError, "count exceeds the spans");
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, count * 2 + 1);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t w[SPAN_WORDS];
        uint16_t k;
        memcpy(w, (uint8_t *)sv.buf + (size_t)i * SPAN_BYTES, SPAN_BYTES);
        if (w[2] >= ntags) {
            PyErr_SetString(PyExc_IndexError, "select_by_tag: a tag outside the table");
            Py_CLEAR(out);
            goto done;
        }
        memcpy(&k, (uint8_t *)tv.buf + 2 * (size_t)w[2], 2);
        memcpy(PyByteArray_AS_STRING(out) + 2 * i, &k, 2);
    }
    if (PyByteArray_Resize(out, count * 2) < 0) Py_CLEAR(out);
done:
    PyBuffer_Release(&sv);
    PyBuffer_Release(&tv);
    return out;
}

/* clamp_mss(data, spans, count, mss4, mss6) -> int: MSS of TCP SYNs lowered in place; how many. */
long ef_clamp_mss_spans(uint8_t *data, size_t data_len, const uint8_t *spans, size_t spans_len, Py_ssize_t count,
                        int mss4, int mss6) {
    long clamped = 0;
    if (count < 0 || (size_t)count > spans_len / SPAN_BYTES || mss4 < 0 || mss4 > 0xFFFF || mss6 < 0 ||
        mss6 > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "bad clamp_mss arguments");
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t w[SPAN_WORDS];
        if (span_within(spans, (size_t)i, data_len, w) < 0) return -1;
        clamped += ef_clamp_mss(data + w[0], w[1], (uint16_t)mss4, (uint16_t)mss6);
    }
    return clamped;
}

static PyObject *clamp_mss(PyObject *mod, PyObject *args) {
    Py_buffer dv, sv;
    Py_ssize_t count;
    int mss4, mss6;
    long clamped;
    if (!PyArg_ParseTuple(args, "w*y*nii", &dv, &sv, &count, &mss4, &mss6)) return NULL;
    clamped = ef_clamp_mss_spans(dv.buf, (size_t)dv.len, sv.buf, (size_t)sv.len, count, mss4, mss6);
    PyBuffer_Release(&dv);
    PyBuffer_Release(&sv);
    return clamped < 0 ? NULL : PyLong_FromLong(clamped);
}

/* -- module -------------------------------------------------------------------------------------- */
static PyObject *configure(PyObject *mod, PyObject *args) {
    PyObject *reasons, *enc, *dec;
    if (!PyArg_ParseTuple(args, "O!OO", &PyTuple_Type, &reasons, &enc, &dec)) return NULL;
    if (PyTuple_GET_SIZE(reasons) != EF_NREASONS) {
        PyErr_Format(PyExc_ValueError, "expected %d drop reasons (index 0 unused)", EF_NREASONS);
        return NULL;
    }
    for (int i = 0; i < EF_NREASONS; i++) {
        PyObject *r = PyTuple_GET_ITEM(reasons, i);
        Py_INCREF(r);
        Py_XSETREF(drop_reasons[i], r);
    }
    Py_INCREF(enc);
    Py_XSETREF(py_encrypt_esp, enc);
    Py_INCREF(dec);
    Py_XSETREF(py_decrypt_esp, dec);
    Py_RETURN_NONE;
}

static PyObject *build_info(PyObject *mod, PyObject *unused) {
    /* aes_gcm: who seals and opens the AES-128/256-GCM SAs keyed from now on */
    const char *aes_gcm = ef_gcm_policy_get() == EF_GCM_AUTO && ef_gcm_supported() ? ef_gcm_name() : "openssl";
    return Py_BuildValue("{s:s,s:s,s:s,s:i}", "openssl", OpenSSL_version(OPENSSL_VERSION), "compiled_against",
                         OPENSSL_VERSION_TEXT, "aes_gcm", aes_gcm, "sanitized",
#if defined(__SANITIZE_ADDRESS__)
                         1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
                         1
#else
                         0
#endif
#else
                         0
#endif
    );
}

/* -- AES-GCM implementation choice and single-message entry points (tests, diagnostics) ------- */
static PyObject *aesgcm_policy(PyObject *mod, PyObject *args) {
    const char *name = NULL, *was = ef_gcm_policy_get() == EF_GCM_OPENSSL ? "openssl" : "auto";
    if (!PyArg_ParseTuple(args, "|z", &name)) return NULL;
    if (name != NULL) {
        if (strcmp(name, "auto") == 0)
            ef_gcm_policy_set(EF_GCM_AUTO);
        else if (strcmp(name, "openssl") == 0)
            ef_gcm_policy_set(EF_GCM_OPENSSL);
        else {
            PyErr_SetString(PyExc_ValueError, "the AES-GCM policy is 'auto' or 'openssl'");
            return NULL;
        }
    }
    return PyUnicode_FromString(was);
}

static PyObject *aesgcm_accelerated(PyObject *mod, PyObject *unused) {
    if (!ef_gcm_supported()) Py_RETURN_NONE;
    return PyUnicode_FromString(ef_gcm_name());
}

/* Key one AEAD context for a single message; 0, or -1 with ValueError. */
static int single_aead(ef_aead *a, int kind, Py_buffer *key, Py_buffer *salt, int encrypt) {
    if ((kind != EF_AEAD_AES_GCM && kind != EF_AEAD_CHACHA20_POLY1305) || salt->len != 4 ||
        ef_aead_init(a, kind, key->buf, (size_t)key->len, salt->buf, encrypt) < 0) {
        PyErr_SetString(PyExc_ValueError, "bad AEAD parameters");
        return -1;
    }
    return 0;
}

/* aead_seal(kind, key, salt, iv, aad, body, trailer=b"", in_place=False) -> (implementation, ct || tag) */
static PyObject *aead_seal(PyObject *mod, PyObject *args) {
    int kind, in_place = 0, r = -1;
    Py_buffer key, salt, iv, aad, body, trailer = {0};
    PyObject *result = NULL, *out = NULL;
    ef_aead a;
    memset(&a, 0, sizeof(a));
    if (!PyArg_ParseTuple(args, "iy*y*y*y*y*|y*p", &kind, &key, &salt, &iv, &aad, &body, &trailer, &in_place))
        return NULL;
    if (iv.len != 8 || aad.len > INT32_MAX || single_aead(&a, kind, &key, &salt, 1) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad AEAD parameters");
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, body.len + trailer.len + EF_AEAD_ICV);
    if (out == NULL) goto done;
    {
        uint8_t *o = (uint8_t *)PyByteArray_AS_STRING(out);
        const uint8_t *b = body.buf, *t = trailer.buf;
        if (in_place) { /* the inputs are the output's own bytes, as ef_esp_seal calls it */
            if (body.len) memcpy(o, body.buf, (size_t)body.len);
            if (trailer.len) memcpy(o + body.len, trailer.buf, (size_t)trailer.len);
            b = o;
            t = o + body.len;
        }
        r = ef_aead_seal(&a, iv.buf, aad.buf, (int)aad.len, b, (size_t)body.len, t, (size_t)trailer.len, o,
                         o + body.len + trailer.len);
    }
    if (r != 0) {
        PyErr_SetString(PyExc_RuntimeError, "the AEAD seal failed");
        goto done;
    }
    result = Py_BuildValue("sO", ef_aead_implementation(&a), out);
done:
    Py_XDECREF(out);
    ef_aead_free(&a);
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&aad);
    PyBuffer_Release(&body);
    if (trailer.obj != NULL || trailer.buf != NULL) PyBuffer_Release(&trailer);
    return result;
}

/* aead_open(kind, key, salt, iv, aad, ct, tag, in_place=False) -> (implementation, plaintext or None, output)
 * `output` is the output buffer as the open left it, also after a failed open, so that tests can
 * check that no unauthenticated plaintext is left in it. */
static PyObject *aead_open(PyObject *mod, PyObject *args) {
    int kind, in_place = 0, r = -1;
    Py_buffer key, salt, iv, aad, ct, tag;
    PyObject *result = NULL, *out = NULL;
    uint8_t *src;
    ef_aead a;
    memset(&a, 0, sizeof(a));
    if (!PyArg_ParseTuple(args, "iy*y*y*y*y*y*|p", &kind, &key, &salt, &iv, &aad, &ct, &tag, &in_place)) return NULL;
    if (iv.len != 8 || tag.len != EF_AEAD_ICV || aad.len > INT32_MAX || single_aead(&a, kind, &key, &salt, 0) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad AEAD parameters");
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, ct.len);
    if (out == NULL) goto done;
    src = (uint8_t *)ct.buf;
    if (in_place) {
        if (ct.len) memcpy(PyByteArray_AS_STRING(out), ct.buf, (size_t)ct.len);
        src = (uint8_t *)PyByteArray_AS_STRING(out);
    } else if (ct.len) {
        memset(PyByteArray_AS_STRING(out), 0, (size_t)ct.len);
    }
    r = ef_aead_open(&a, iv.buf, aad.buf, (int)aad.len, src, (size_t)ct.len, tag.buf,
                     (uint8_t *)PyByteArray_AS_STRING(out));
    if (r < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the AEAD open failed");
        goto done;
    }
    result = Py_BuildValue("sOO", ef_aead_implementation(&a), r == 1 ? out : Py_None, out);
done:
    Py_XDECREF(out);
    ef_aead_free(&a);
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&aad);
    PyBuffer_Release(&ct);
    PyBuffer_Release(&tag);
    return result;
}

static PyMethodDef module_methods[] = {
    {"aesgcm_policy", aesgcm_policy, METH_VARARGS,
     "aesgcm_policy(policy=None) -> the previous policy: 'auto' (VAES AES-GCM when the CPU has it) or 'openssl', "
     "for AEAD contexts keyed from now on (default: ESPLANADE_ESP_AESGCM)."},
    {"aesgcm_accelerated", aesgcm_accelerated, METH_NOARGS,
     "The name of the accelerated AES-GCM this CPU runs ('vaes-avx2'), or None."},
    {"aead_seal", aead_seal, METH_VARARGS,
     "aead_seal(kind, key, salt, iv, aad, body, trailer=b'', in_place=False) -> (implementation, ct + tag)"},
    {"aead_open", aead_open, METH_VARARGS,
     "aead_open(kind, key, salt, iv, aad, ct, tag, in_place=False) -> (implementation, plaintext or None, output)"},
    {"configure", configure, METH_VARARGS, "configure(drop_reasons, encrypt_esp, decrypt_esp)"},
    {"encrypt_batch", encrypt_batch, METH_VARARGS,
     "encrypt_batch(slots, which, packets, spans, count, now, out, out_spans, flows) -> int"},
    {"decrypt_batch", decrypt_batch, METH_VARARGS,
     "decrypt_batch(table, packets, spans, count, now, out, out_spans, flows, non_esp=None) -> int"},
    {"split_frames", split_frames, METH_VARARGS, "split_frames(frames, spans, count, out, out_spans) -> (n, dropped)"},
    {"coalesce", coalesce, METH_VARARGS, "coalesce(packets, spans, count, merge_udp, out, out_spans) -> int"},
    {"gso_runs", gso_runs, METH_VARARGS, "gso_runs(spans, count, max_segments, max_bytes) -> [(offset, length, segment, count, tag)]"},
    {"segment_spans", segment_spans, METH_VARARGS, "segment_spans(nbytes, segment, tag, offset=0) -> bytearray"},
    {"read_frames", read_frames, METH_VARARGS, "read_frames(fd, buf, spans, limit, frame_max) -> (count, errno)"},
    {"recv_gro", recv_gro, METH_VARARGS,
     "recv_gro(fd, buf, spans, max_reads, read_max, accept) -> (count, reads, spis, odd, errnos)"},
    {"send_runs", send_runs, METH_VARARGS,
     "send_runs(fd, data, spans, count, dests, gso, max_segments, max_bytes) -> (sent, sends, aside)"},
    {"write_frames", write_frames, METH_VARARGS, "write_frames(fd, data, spans, count) -> (written, errnos)"},
    {"select_by_tag", select_by_tag, METH_VARARGS, "select_by_tag(spans, count, table) -> bytearray of u16"},
    {"clamp_mss", clamp_mss, METH_VARARGS, "clamp_mss(data, spans, count, mss4, mss6) -> int"},
    {"build_info", build_info, METH_NOARGS, "OpenSSL version and build flags."},
    {NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_espfast", "The compiled ESP batch loop.", -1,
                                        module_methods};

#define INTERN(var, text)                                                                                              \
    do {                                                                                                               \
        if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL;                                            \
    } while (0)

PyMODINIT_FUNC PyInit__espfast(void) {
    PyObject *m, *names;
    INTERN(s_next_seq, "next_seq");
    INTERN(s_seq_mark, "seq_mark");
    INTERN(s_counters, "counters");
    INTERN(s_packets, "packets");
    INTERN(s_bytes, "bytes");
    INTERN(s_drops, "drops");
    INTERN(s_packet_mark, "packet_mark");
    INTERN(s_byte_mark, "byte_mark");
    INTERN(s_time_mark, "time_mark");
    INTERN(s_hard_expired, "hard_expired");
    INTERN(s_replay, "replay");
    INTERN(s_top, "top");
    INTERN(s_blocks, "blocks");
    INTERN(s_persist_mark, "persist_mark");
    INTERN(s_on_time, "on_time");
    INTERN(s_on_volume, "on_volume");
    INTERN(s_take_sequence, "take_sequence");
    INTERN(s_on_replay_top, "on_replay_top");
    INTERN(s_size, "size");
    if (PyType_Ready(&FilterType) < 0 || PyType_Ready(&FlowTableType) < 0 || PyType_Ready(&SlotType) < 0 ||
        PyType_Ready(&TableType) < 0)
        return NULL;
    m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    names = PyTuple_New(EF_NREASONS);
    if (names == NULL) return NULL;
    for (int i = 0; i < EF_NREASONS; i++) PyTuple_SET_ITEM(names, i, PyUnicode_FromString(DROP_NAMES[i]));
    if (PyModule_AddObject(m, "DROP_REASON_NAMES", names) < 0) return NULL;
    Py_INCREF(&FilterType);
    Py_INCREF(&FlowTableType);
    Py_INCREF(&SlotType);
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Filter", (PyObject *)&FilterType) < 0 ||
        PyModule_AddObject(m, "FlowTable", (PyObject *)&FlowTableType) < 0 ||
        PyModule_AddObject(m, "Slot", (PyObject *)&SlotType) < 0 ||
        PyModule_AddObject(m, "InboundTable", (PyObject *)&TableType) < 0 ||
        PyModule_AddIntConstant(m, "SPAN_BYTES", (long)SPAN_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "AEAD_OVERHEAD", EF_AEAD_OVERHEAD) < 0)
        return NULL;
    if (ef_pump_init(m) < 0) return NULL;
    return m;
}
