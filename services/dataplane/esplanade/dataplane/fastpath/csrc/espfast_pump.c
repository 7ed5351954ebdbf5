/* The per-wake-up pumps of the userspace datapath: one call per direction and wake-up.
 *
 *   pump_out: TUN reads -> split -> MSS clamp -> flow -> slot lookup -> seal -> GSO sends
 *   pump_in:  UDP GRO reads -> open (replay, ICV, selectors, filter, flows) -> MSS clamp
 *             -> GRO-style merge -> TUN writes
 *
 * Each pump is the datapath's existing chain of compiled calls (read_frames, split_frames,
 * clamp_mss, encrypt_batch, send_runs / recv_gro, decrypt_batch, clamp_mss, coalesce,
 * write_frames) run from C: the same functions with the same arguments and bounds checks,
 * without a Python frame, a PacketBatch or a wrapper per step. Both pumps call the steps' C
 * bodies (espfast_steps.h) directly, without an argument tuple or a result
 * object per step; when every frame hits the cache, pump_out splits each TSO frame in place and
 * seals each packet before building the next (no payload copy). Python keeps every decision:
 * the outbound pump seals only when every frame of the wake-up hits the flow -> slot cache
 * (`SlotCache`), which holds nothing but what the transform's SPD lookup taught it
 * (`learn`) and is emptied whenever the transform's own flow cache or the core's slots
 * change (`clear`). On a miss the pump stops after the clamp and hands the frames and packets
 * to Python, which takes its usual path (SPD per frame, hand-offs, the engine) and teaches
 * the cache. Odd UDP reads (IKE, keep-alives, mixed SPIs) come back to Python as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <string.h>

#include "espfast_core.h"
#include "espfast_steps.h"

#define PUMP_SPAN_BYTES 12
#define SLOT_SKIP 0xFFFF

int ef_pump_init(PyObject *module); /* called by PyInit__espfast */

/* -- the flow -> slot cache ---------------------------------------------------------------------- */
#define KEY_BYTES 37 /* protocol + IPv6 addresses + ports */
#define CACHE_CAPACITY 4096 /* a power of two; emptied when half full, as the transform's cache is */

typedef struct {
    uint64_t hash;
    uint16_t slot;
    uint8_t used, len;
    uint8_t key[KEY_BYTES];
} cache_entry;

typedef struct {
    PyObject_HEAD cache_entry *entries;
    uint32_t count;
    unsigned long long hits, misses, learned;
} SlotCacheObject;

/* EspTransform._decision_at's flow-cache key for a TUN frame (virtio_net_hdr + packet): TCP or
 * UDP over IPv4 with IHL 5, not a fragment (protocol, addresses, ports: 12 bytes at 12), or over
 * IPv6 (next header, addresses, ports: 36 bytes at 8), packet at least 40 / 44 bytes. Its length,
 * or 0 when the transform does not cache the frame's decision. */
static size_t frame_key(const uint8_t *frame, size_t len, uint8_t key[KEY_BYTES]) {
    const uint8_t *p = frame + EF_VNET_HDR_LEN;
    size_t n;
    if (len < EF_VNET_HDR_LEN) return 0;
    n = len - EF_VNET_HDR_LEN;
    if (n >= 40 && p[0] == 0x45) {
        if ((p[6] & 0x3F) || p[7] || (p[9] != 6 && p[9] != 17)) return 0;
        key[0] = p[9];
        memcpy(key + 1, p + 12, 12);
        return 13;
    }
    if (n >= 44 && p[0] >> 4 == 6) {
        if (p[6] != 6 && p[6] != 17) return 0;
        key[0] = p[6];
        memcpy(key + 1, p + 8, 36);
        return 37;
    }
    return 0;
}

static uint64_t key_hash(const uint8_t *key, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) h = (h ^ key[i]) * 0x100000001b3ull;
    return h | 1;
}

static cache_entry *cache_find(SlotCacheObject *c, const uint8_t *key, size_t len, uint64_t hash) {
    uint32_t mask = CACHE_CAPACITY - 1, i = (uint32_t)(hash >> 20) & mask;
    for (uint32_t probes = 0; probes < CACHE_CAPACITY; probes++, i = (i + 1) & mask) {
        cache_entry *e = &c->entries[i];
        if (!e->used || (e->hash == hash && e->len == len && memcmp(e->key, key, len) == 0)) return e;
    }
    return NULL; /* cannot happen: the cache is never more than half full */
}

static int SlotCache_init(SlotCacheObject *self, PyObject *args, PyObject *kw) {
    if (!PyArg_ParseTuple(args, "")) return -1;
    PyMem_Free(self->entries);
    self->entries = PyMem_Calloc(CACHE_CAPACITY, sizeof(cache_entry));
    if (self->entries == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->count = 0;
    return 0;
}

static void SlotCache_dealloc(SlotCacheObject *self) {
    PyMem_Free(self->entries);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* learn(frame_data, offset, length, slot) -> bool: the frame's flow seals with `slot`. */
static PyObject *SlotCache_learn(SlotCacheObject *self, PyObject *args) {
    Py_buffer dv;
    Py_ssize_t offset, length;
    int slot;
    uint8_t key[KEY_BYTES];
    size_t klen = 0;
    if (!PyArg_ParseTuple(args, "y*nni", &dv, &offset, &length, &slot)) return NULL;
    if (self->entries == NULL || offset < 0 || length < 0 || offset > dv.len || length > dv.len - offset || slot < 0 ||
        slot >= SLOT_SKIP) {
        PyBuffer_Release(&dv);
        PyErr_SetString(PyExc_ValueError, "bad SlotCache.learn arguments");
        return NULL;
    }
    klen = frame_key((const uint8_t *)dv.buf + offset, (size_t)length, key);
    PyBuffer_Release(&dv);
    if (klen == 0) Py_RETURN_FALSE;
    {
        uint64_t h = key_hash(key, klen);
        cache_entry *e = cache_find(self, key, klen, h);
        if (e == NULL || !e->used) {
            if (self->count + 1 > CACHE_CAPACITY / 2) {
                memset(self->entries, 0, CACHE_CAPACITY * sizeof(cache_entry));
                self->count = 0;
                e = cache_find(self, key, klen, h);
                if (e == NULL) Py_RETURN_FALSE;
            }
            e->used = 1;
            e->hash = h;
            e->len = (uint8_t)klen;
            memcpy(e->key, key, klen);
            self->count++;
        }
        e->slot = (uint16_t)slot;
        self->learned++;
    }
    Py_RETURN_TRUE;
}

static PyObject *SlotCache_clear(SlotCacheObject *self, PyObject *unused) {
    if (self->entries != NULL) memset(self->entries, 0, CACHE_CAPACITY * sizeof(cache_entry));
    self->count = 0;
    Py_RETURN_NONE;
}

/* lookup(frame_data, offset, length) -> slot or -1 (for tests). */
static int cache_lookup(SlotCacheObject *c, const uint8_t *frame, size_t len) {
    uint8_t key[KEY_BYTES];
    size_t klen = c->entries != NULL && c->count ? frame_key(frame, len, key) : 0;
    cache_entry *e;
    if (klen == 0) return -1;
    e = cache_find(c, key, klen, key_hash(key, klen));
    return e != NULL && e->used ? e->slot : -1;
}

static PyObject *SlotCache_lookup(SlotCacheObject *self, PyObject *args) {
    Py_buffer dv;
    Py_ssize_t offset, length;
    int slot;
    if (!PyArg_ParseTuple(args, "y*nn", &dv, &offset, &length)) return NULL;
    if (offset < 0 || length < 0 || offset > dv.len || length > dv.len - offset) {
        PyBuffer_Release(&dv);
        PyErr_SetString(PyExc_ValueError, "bad SlotCache.lookup arguments");
        return NULL;
    }
    slot = cache_lookup(self, (const uint8_t *)dv.buf + offset, (size_t)length);
    PyBuffer_Release(&dv);
    return PyLong_FromLong(slot);
}

static Py_ssize_t SlotCache_len(SlotCacheObject *self) { return (Py_ssize_t)self->count; }

static PyMethodDef SlotCache_methods[] = {
    {"learn", (PyCFunction)SlotCache_learn, METH_VARARGS, "learn(data, offset, length, slot) -> bool"},
    {"lookup", (PyCFunction)SlotCache_lookup, METH_VARARGS, "lookup(data, offset, length) -> slot or -1"},
    {"clear", (PyCFunction)SlotCache_clear, METH_NOARGS, "forget every flow"},
    {NULL}};

static PyMemberDef SlotCache_members[] = {
    {"hits", T_ULONGLONG, offsetof(SlotCacheObject, hits), READONLY, "frames sealed through the cache"},
    {"misses", T_ULONGLONG, offsetof(SlotCacheObject, misses), READONLY, "wake-ups handed to Python"},
    {"learned", T_ULONGLONG, offsetof(SlotCacheObject, learned), READONLY, "learn calls"},
    {NULL}};

static PySequenceMethods SlotCache_as_sequence = {.sq_length = (lenfunc)SlotCache_len};

static PyTypeObject SlotCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_espfast.SlotCache",
    .tp_basicsize = sizeof(SlotCacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SlotCache_init,
    .tp_dealloc = (destructor)SlotCache_dealloc,
    .tp_methods = SlotCache_methods,
    .tp_members = SlotCache_members,
    .tp_as_sequence = &SlotCache_as_sequence,
    .tp_doc = "SlotCache(): flow key of a TUN frame -> outbound slot, taught by the SPD lookup",
};

/* -- helpers ------------------------------------------------------------------------------------- */
/* A read (flags 0) or writable export of a bytearray and a read export of its spans. */
static int two_views(PyObject *data, int flags, Py_buffer *dv, PyObject *spans, Py_buffer *sv) {
    if (PyObject_GetBuffer(data, dv, flags | PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(spans, sv, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(dv);
        return -1;
    }
    return 0;
}

/* -- outbound ------------------------------------------------------------------------------------ */
/* pump_out(tun_fd, frames, frame_spans, limit, frame_max, cache, packets, packet_spans, mss4, mss6,
 *          slots, now, flows, esp, esp_spans, udp_fd, dests, gso, max_segments, max_bytes)
 * -> (nframes, read_errno, npackets, dropped, super_frames, clamped, sealed, used, sent, sends, aside)
 * mss4 < 0: no clamp. sealed: ESP payloads written to esp/esp_spans and sent (send_runs' sent,
 * sends and aside), `used` the slots they used; -1 when a frame missed the cache (nothing
 * sealed: the frames and packets wait in their bytearrays for the caller). The steps are the C
 * cores behind read_frames, split_frames, clamp_mss, encrypt_batch and send_runs
 * (espfast_steps.h), called directly: a failing step raises what its entry point raises. */
static PyObject *pump_out(PyObject *mod, PyObject *args) {
    int tun_fd, udp_fd, mss4, mss6, gso, read_err = 0;
    PyObject *frames, *frame_spans, *cache_obj, *packets, *packet_spans, *slots, *flows, *esp, *esp_spans, *dests;
    Py_ssize_t limit, frame_max, max_segments, max_bytes, nframes = 0, npackets = 0, dropped = 0, clamped = 0,
                                                          super_frames = 0, sealed = 0, sent = 0, sends = 0;
    double now;
    PyObject *used = NULL, *aside = NULL, *result = NULL;
    uint16_t *frame_slot = NULL;
    int miss = 0;
    if (!PyArg_ParseTuple(args, "iO!O!nnO!O!O!iiO!dOO!O!iO!pnn", &tun_fd, &PyByteArray_Type, &frames,
                          &PyByteArray_Type, &frame_spans, &limit, &frame_max, &SlotCacheType, &cache_obj,
                          &PyByteArray_Type, &packets, &PyByteArray_Type, &packet_spans, &mss4, &mss6, &PyTuple_Type,
                          &slots, &now, &flows, &PyByteArray_Type, &esp, &PyByteArray_Type, &esp_spans, &udp_fd,
                          &PyTuple_Type, &dests, &gso, &max_segments, &max_bytes))
        return NULL;
    /* The steps' C cores, called directly. Each input bytearray is exported (locked) while a step
     * reads it, as the Python-level entry points' buffer arguments lock theirs, so an output that
     * aliases an input fails to grow instead of moving the input under the step. */
    if (ef_read_frames_into(tun_fd, frames, frame_spans, limit, frame_max, &nframes, &read_err) < 0) goto done;
    /* one decision per frame, through the cache (bounds: read_frames wrote nframes spans inside `frames`) */
    frame_slot = PyMem_Calloc((size_t)nframes + 1, sizeof(uint16_t));
    if (frame_slot == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        SlotCacheObject *cache = (SlotCacheObject *)cache_obj;
        const uint8_t *fd_ = (const uint8_t *)PyByteArray_AS_STRING(frames);
        const uint8_t *sp = (const uint8_t *)PyByteArray_AS_STRING(frame_spans);
        size_t flen = (size_t)PyByteArray_GET_SIZE(frames), slen = (size_t)PyByteArray_GET_SIZE(frame_spans);
        Py_ssize_t nslots = PyTuple_GET_SIZE(slots);
        if ((size_t)nframes * PUMP_SPAN_BYTES > slen) {
            PyErr_SetString(PyExc_RuntimeError, "_espfast pump: frame spans miscounted");
            goto done;
        }
        for (Py_ssize_t i = 0; i < nframes; i++) {
            uint32_t w[3];
            int s;
            memcpy(w, sp + (size_t)i * PUMP_SPAN_BYTES, PUMP_SPAN_BYTES);
            if ((uint64_t)w[0] + w[1] > flen) {
                PyErr_SetString(PyExc_RuntimeError, "_espfast pump: a frame span runs past its buffer");
                goto done;
            }
            if (w[1] > 1 && (fd_[w[0]] || fd_[w[0] + 1])) super_frames++;
            if (miss) continue;
            s = cache_lookup(cache, fd_ + w[0], w[1]);
            if (s < 0 || s >= nslots) {
                miss = 1;
                continue;
            }
            frame_slot[i] = (uint16_t)s;
        }
        if (miss)
            cache->misses++;
        else
            cache->hits += (unsigned long long)nframes;
    }
    if (miss) { /* split and clamp only: the frames and packets wait in their bytearrays for Python */
        Py_buffer fv, sv;
        int rc;
        if (two_views(frames, 0, &fv, frame_spans, &sv) < 0) goto done;
        rc = ef_split_frames_into(fv.buf, (size_t)fv.len, sv.buf, (size_t)sv.len, nframes, packets, packet_spans,
                                  &npackets, &dropped);
        PyBuffer_Release(&fv);
        PyBuffer_Release(&sv);
        if (rc < 0) goto done;
        if (npackets > 0 && mss4 >= 0) {
            Py_buffer pv, psv;
            if (two_views(packets, PyBUF_WRITABLE, &pv, packet_spans, &psv) < 0) goto done;
            clamped = ef_clamp_mss_spans(pv.buf, (size_t)pv.len, psv.buf, (size_t)psv.len, npackets, mss4, mss6);
            PyBuffer_Release(&pv);
            PyBuffer_Release(&psv);
            if (clamped < 0) goto done;
        }
        sealed = -1;
        used = PyTuple_New(0);
        goto finish;
    }
    if (nframes > 0) { /* every frame known: split in place, clamped and sealed in one pass */
        Py_buffer fv, sv;
        if (two_views(frames, PyBUF_WRITABLE, &fv, frame_spans, &sv) < 0) goto done;
        sealed = ef_split_seal_frames(slots, frame_slot, fv.buf, (size_t)fv.len, sv.buf, (size_t)sv.len, nframes,
                                      mss4, mss6, now, esp, esp_spans, flows, &npackets, &dropped, &clamped);
        PyBuffer_Release(&fv);
        PyBuffer_Release(&sv);
        if (sealed < 0) goto done;
    }
    if (npackets == 0) {
        used = PyTuple_New(0);
        goto finish;
    }
    {
        Py_ssize_t nused = 0;
        int seen[8] = {-1, -1, -1, -1, -1, -1, -1, -1}; /* the slots used: few per wake-up */
        PyObject *list = PyList_New(0);
        if (list == NULL) goto done;
        for (Py_ssize_t i = 0; i < nframes; i++) {
            int s = frame_slot[i], known = 0;
            for (Py_ssize_t j = 0; j < nused && j < 8; j++) known |= seen[j] == s;
            if (known) continue;
            if (nused < 8) seen[nused++] = s;
            {
                PyObject *v = PyLong_FromLong(s);
                if (v == NULL || PyList_Append(list, v) < 0) {
                    Py_XDECREF(v);
                    Py_DECREF(list);
                    goto done;
                }
                Py_DECREF(v);
            }
        }
        used = PyList_AsTuple(list);
        Py_DECREF(list);
        if (used == NULL) goto done;
    }
    if (sealed > 0) {
        Py_buffer ev, sv;
        int rc;
        if (two_views(esp, 0, &ev, esp_spans, &sv) < 0) goto done;
        rc = ef_send_runs_from(udp_fd, ev.buf, (size_t)ev.len, sv.buf, (size_t)sv.len, sealed, dests, gso,
                               max_segments, max_bytes, &sent, &sends, &aside);
        PyBuffer_Release(&ev);
        PyBuffer_Release(&sv);
        if (rc < 0) goto done;
    }
finish:
    if (used == NULL) goto done;
    if (aside == NULL && (aside = PyList_New(0)) == NULL) goto done;
    result = Py_BuildValue("(nnnnnnnOnnO)", nframes, (Py_ssize_t)read_err, npackets, dropped, super_frames, clamped,
                           sealed, used, sent, sends, aside);
done:
    Py_XDECREF(used);
    Py_XDECREF(aside);
    PyMem_Free(frame_slot);
    return result;
}

/* -- inbound ------------------------------------------------------------------------------------- */
/* pump_in(udp_fd, buf, spans, max_reads, read_max, accept, table, now, flows, inner, inner_spans,
 *         mss4, mss6, merge_udp, tun_frames, tun_spans, tun_fd)
 * -> (count, reads, spis, odd, errnos, failure, ninner, clamped, written, write_errnos)
 * recv_gro's result, then the whole reads opened, clamped (mss4 < 0: not), merged and written.
 * failure: None, or the exception the open/merge/write steps raised (the odd reads are still
 * the caller's to handle). */
static PyObject *pump_in(PyObject *mod, PyObject *args) {
    int udp_fd, tun_fd, mss4, mss6, merge_udp;
    PyObject *buf, *spans, *accept, *table, *flows, *inner, *inner_spans, *tun_frames, *tun_spans;
    Py_ssize_t max_reads, read_max, ninner = 0, clamped = 0, nframes = 0, written = 0;
    double now;
    PyObject *write_errnos = NULL, *failure = NULL, *result = NULL;
    ef_gro_reads got;
    if (!PyArg_ParseTuple(args, "iO!O!nnO!OdOO!O!iipO!O!i", &udp_fd, &PyByteArray_Type, &buf, &PyByteArray_Type,
                          &spans, &max_reads, &read_max, &PySet_Type, &accept, &table, &now, &flows,
                          &PyByteArray_Type, &inner, &PyByteArray_Type, &inner_spans, &mss4, &mss6, &merge_udp,
                          &PyByteArray_Type, &tun_frames, &PyByteArray_Type, &tun_spans, &tun_fd))
        return NULL;
    if (ef_recv_gro(udp_fd, buf, spans, max_reads, read_max, accept, &got) < 0) return NULL;
    write_errnos = PyList_New(0);
    if (write_errnos == NULL) goto done;
    if (got.count > 0) { /* the steps as C calls: the same checks as their Python-level functions */
        ninner = ef_decrypt_batch(table, buf, spans, got.count, now, inner, inner_spans, flows, Py_None);
        if (ninner > 0 && mss4 >= 0)
            clamped = ef_clamp_mss_spans((uint8_t *)PyByteArray_AS_STRING(inner), (size_t)PyByteArray_GET_SIZE(inner),
                                         (const uint8_t *)PyByteArray_AS_STRING(inner_spans),
                                         (size_t)PyByteArray_GET_SIZE(inner_spans), ninner, mss4, mss6);
        if (ninner > 0 && clamped >= 0)
            nframes = ef_coalesce(inner, inner_spans, ninner, merge_udp, tun_frames, tun_spans);
        if (ninner > 0 && clamped >= 0 && nframes > 0)
            ef_write_frames(tun_fd, (const uint8_t *)PyByteArray_AS_STRING(tun_frames),
                            (size_t)PyByteArray_GET_SIZE(tun_frames), (const uint8_t *)PyByteArray_AS_STRING(tun_spans),
                            (size_t)PyByteArray_GET_SIZE(tun_spans), nframes, &written, write_errnos);
        if (PyErr_Occurred()) { /* the open/merge/write steps: the caller counts it, the odd reads stay */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
            failure = value != NULL ? value : Py_NewRef(Py_None);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            ninner = clamped = written = 0;
            Py_SETREF(write_errnos, PyList_New(0));
            if (write_errnos == NULL) goto done;
        }
    }
    result = Py_BuildValue("(nnOOOOnnnO)", got.count, got.reads, got.spis, got.odd, got.errnos,
                           failure ? failure : Py_None, ninner < 0 ? 0 : ninner, clamped < 0 ? 0 : clamped, written,
                           write_errnos);
done:
    Py_XDECREF(got.spis);
    Py_XDECREF(got.odd);
    Py_XDECREF(got.errnos);
    Py_XDECREF(write_errnos);
    Py_XDECREF(failure);
    return result;
}

static PyMethodDef pump_methods[] = {
    {"pump_out", pump_out, METH_VARARGS,
     "pump_out(tun_fd, frames, frame_spans, limit, frame_max, cache, packets, packet_spans, mss4, mss6, slots, now, "
     "flows, esp, esp_spans, udp_fd, dests, gso, max_segments, max_bytes) -> (nframes, read_errno, npackets, "
     "dropped, super_frames, clamped, sealed, used, sent, sends, aside)"},
    {"pump_in", pump_in, METH_VARARGS,
     "pump_in(udp_fd, buf, spans, max_reads, read_max, accept, table, now, flows, inner, inner_spans, mss4, mss6, "
     "merge_udp, tun_frames, tun_spans, tun_fd) -> (count, reads, spis, odd, errnos, failure, ninner, clamped, "
     "written, write_errnos)"},
    {NULL}};

int ef_pump_init(PyObject *module) {
    if (PyType_Ready(&SlotCacheType) < 0) return -1;
    Py_INCREF(&SlotCacheType);
    if (PyModule_AddObject(module, "SlotCache", (PyObject *)&SlotCacheType) < 0) return -1;
    for (PyMethodDef *d = pump_methods; d->ml_name != NULL; d++) {
        PyObject *f = PyCFunction_NewEx(d, NULL, NULL);
        if (f == NULL || PyModule_AddObject(module, d->ml_name, f) < 0) {
            Py_XDECREF(f);
            return -1;
        }
    }
    return 0;
}
