/* libFuzzer harness for the compiled ESP hot loop's C core (espfast_core.c).
 *
 * Built by test_sanitizer_fuzz.py with clang -fsanitize=fuzzer,address,undefined. The first
 * input byte picks a target; every output buffer is malloc'ed at exactly the size the core
 * says it needs, so a write one byte past it is an AddressSanitizer report.
 *
 *   0 decap, unauthenticated: the input is an ESP payload under a fixed key
 *   1 decap, authentic: the input is a plaintext, sealed here with the SA's key, so the checks
 *     after the ICV (padding, next header, inner length, selectors) see arbitrary content
 *   2 TSO/USO split of one TUN frame, copied and in place (the same packets)
 *   3 GRO merge of length-prefixed packets
 *   4 inner packet parsing, packet filter, flow table
 *   5 replay window: a run of sequence numbers through check/accept
 *   6 seal: a body and a TFC size
 *   7 AES-GCM: the VAES implementation (espfast_aesgcm.c, when this CPU has it) against
 *     OpenSSL EVP on an arbitrary key, AAD, body and trailer split, in place or not: the same
 *     ciphertext and tag, both open it, both refuse it with one bit flipped
 *
 * EF_FUZZ_CANARY (test builds only) adds a deliberate one-byte overflow in the harness, reached
 * only when a split yields three or more segments: the test proves with it that a finding
 * fails the run.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "espfast_core.h"

static const uint8_t KEY[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static const uint8_t SALT[4] = {0xca, 0xfe, 0xba, 0xbe};
#define SPI 0x1000u

static ef_aead enc, dec;
static ef_selector sels[3];
static ef_selectors selectors = {&sels[0], &sels[1], 1, 2};
static ef_filter filter;
static ef_filter_table tables[2];
static const ef_addr starts4[3] = {{0, 0x0A000000}, {0, 0x0A000100}, {0, 0x0A000200}};
static const uint8_t kinds4[3] = {2, 1, 0};
static const uint32_t first4[3] = {0, 0, 0}, count4[3] = {2, 0, 0};
static const uint32_t plo4[2] = {22, 443}, phi4[2] = {80, 443};
static const ef_addr starts6[2] = {{0x20010db800000000ull, 0}, {0x20010db900000000ull, 0}};
static const uint8_t kinds6[2] = {1, 0};
static const uint32_t zero6[2] = {0, 0};

static void setup(void) {
    static int done;
    if (done) return;
    done = 1;
    if (ef_aead_init(&enc, EF_AEAD_AES_GCM, KEY, 16, SALT, 1) < 0 || ef_aead_init(&dec, EF_AEAD_AES_GCM, KEY, 16, SALT, 0) < 0)
        abort();
    sels[0] = (ef_selector){{0, 0x0A000000}, {0, 0x0A0000FF}, 4, 0, -1, -1};
    sels[1] = (ef_selector){{0, 0}, {0, 0xFFFFFFFF}, 4, 17, 53, 53};
    sels[2] = (ef_selector){{0, 0}, {~0ull, ~0ull}, 6, 6, -2, -2};
    memset(filter.index, 0xFF, sizeof(filter.index));
    tables[0] = (ef_filter_table){3, starts4, kinds4, first4, count4, plo4, phi4};
    tables[1] = (ef_filter_table){2, starts6, kinds6, zero6, zero6, plo4, phi4};
    filter.tables = tables;
    filter.ntables = 2;
    filter.index[0][0] = 0;
    filter.index[1][6] = 1;
}

/* Encrypt `pt` as it is (the trailer included) into an exact-size ESP packet. */
static uint8_t *seal_raw(uint64_t seq, int esn, const uint8_t *pt, size_t n, size_t *len) {
    uint8_t aad[12], *out = malloc(n + EF_AEAD_OVERHEAD);
    int aad_len = esn ? 12 : 8;
    if (out == NULL) abort();
    out[0] = SPI >> 24, out[1] = (SPI >> 16) & 0xFF, out[2] = (SPI >> 8) & 0xFF, out[3] = SPI & 0xFF;
    for (int i = 0; i < 4; i++) out[4 + i] = (uint8_t)(seq >> (24 - 8 * i));
    for (int i = 0; i < 8; i++) out[8 + i] = (uint8_t)(seq >> (56 - 8 * i));
    memcpy(aad, out, 4);
    if (esn) {
        for (int i = 0; i < 4; i++) aad[4 + i] = (uint8_t)(seq >> (56 - 8 * i));
        memcpy(aad + 8, out + 4, 4);
    } else {
        memcpy(aad + 4, out + 4, 4);
    }
    if (ef_aead_seal(&enc, out + 8, aad, aad_len, pt, n, pt + n, 0, out + 16, out + 16 + n) != 0) abort();
    *len = n + EF_AEAD_OVERHEAD;
    return out;
}

static uint64_t u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

static void decap(const uint8_t *d, size_t n, int authentic) {
    ef_inbound sa;
    uint64_t *blocks;
    uint32_t size;
    uint8_t *esp, *out;
    size_t len, inner;
    int accepted;
    if (n < 12) return;
    memset(&sa, 0, sizeof(sa));
    sa.aead = dec;
    sa.spi = SPI;
    sa.esn = d[0] & 1;
    sa.selectors = d[0] & 2 ? &selectors : NULL;
    size = d[1] & 1 ? 0 : 32u + (uint32_t)(d[1] << 3);
    sa.replay.size = size;
    sa.replay.nblocks = size ? (size + 63) / 64 + 1 : 1;
    sa.replay.esn = sa.esn;
    sa.replay.top = u64(d + 2) >> (d[10] & 63);
    blocks = calloc(sa.replay.nblocks, sizeof(uint64_t));
    sa.replay.blocks = blocks;
    d += 11;
    n -= 11;
    if (authentic) {
        uint64_t seq = sa.replay.top + (d[0] & 7) - 3;
        esp = seal_raw(seq, sa.esn, d + 1, (n - 1) & ~(size_t)3, &len);
    } else {
        esp = malloc(n ? n : 1);
        memcpy(esp, d, n);
        len = n;
    }
    out = malloc(len > EF_AEAD_OVERHEAD ? len - EF_AEAD_OVERHEAD : 1);
    for (int round = 0; round < 2; round++) /* the second time it is a replay */
        ef_esp_open(&sa, esp, len, out, len > EF_AEAD_OVERHEAD ? len - EF_AEAD_OVERHEAD : 0, &inner, &accepted);
    free(out);
    free(esp);
    free(blocks);
}

static void split(const uint8_t *d, size_t n) {
    size_t bytes = 0;
    long count = ef_split_size(d, n, &bytes);
    uint8_t *out;
    uint32_t *lens;
    if (count < 0) {
        if (ef_split_frame(d, n, NULL, 0, NULL, 0) != -1) abort();
        return;
    }
    out = malloc(bytes ? bytes : 1);
    lens = malloc((size_t)count * sizeof(uint32_t));
    if (ef_split_frame(d, n, out, bytes, lens, (size_t)count) != count) abort();
#ifdef EF_FUZZ_CANARY
    if (count >= 3) out[bytes] = 0; /* the planted overflow */
#endif
    { /* the in-place split of an exact copy gives the same packets, each inside the frame */
        uint8_t *frame = malloc(n ? n : 1), *p;
        ef_split_cursor c;
        size_t at = 0, i = 0;
        memcpy(frame, d, n);
        if (ef_split_start(&c, frame, n) != count) abort();
        while ((p = ef_split_next(&c)) != NULL) {
            size_t len = ef_split_length(&c, i);
            if (i >= (size_t)count || len != lens[i] || p < frame || p + len > frame + n ||
                memcmp(p, out + at, len) != 0)
                abort();
            at += len;
            i++;
        }
        if (i != (size_t)count) abort();
        free(frame);
    }
    free(out);
    free(lens);
}

static void merge(const uint8_t *d, size_t n) {
    ef_span pkts[64];
    uint8_t *copies[64];
    size_t count = 0, need;
    ef_coalesce_state st;
    void *scratch;
    uint8_t *out;
    uint32_t lens[64], firsts[64];
    int merge_udp = n && (d[0] & 1);
    if (n) d++, n--;
    while (n >= 2 && count < 64) { /* [u16 length][bytes]...; each packet in its own exact buffer */
        size_t len = (size_t)(d[0] << 8 | d[1]);
        d += 2, n -= 2;
        if (len > n) len = n;
        copies[count] = malloc(len ? len : 1);
        memcpy(copies[count], d, len);
        pkts[count].data = copies[count];
        pkts[count].len = (uint32_t)len;
        count++;
        d += len, n -= len;
    }
    scratch = malloc(ef_coalesce_scratch_bytes(count));
    need = ef_coalesce_plan(pkts, count, merge_udp, scratch, &st);
    out = malloc(need ? need : 1);
    if (ef_coalesce_write(pkts, &st, out, need, lens, firsts, count) < 0) abort();
    free(out);
    free(scratch);
    for (size_t i = 0; i < count; i++) free(copies[i]);
}

static void inspect(const uint8_t *d, size_t n) {
    static ef_flow slots[16];
    static ef_flows flows = {slots, 16, 0, 12, 0, 0};
    ef_inner_header h;
    ef_flow_key k;
    int parsed = ef_parse_inner(d, n, &h) == 0;
    if (parsed) (void)ef_filter_allows(&filter, &h);
    ef_flows_add(&flows, SPI, (int)(n & 1), parsed ? &h : NULL, n);
    if (flows.count >= flows.limit) {
        memset(slots, 0, sizeof(slots));
        flows.count = 0;
    }
    if (ef_parse_flow(d, n, &k) == 0) (void)ef_selectors_allow_inbound(&selectors, &k);
    (void)ef_inner_ip_length(d, n);
}

static void replay(const uint8_t *d, size_t n) {
    ef_replay r;
    if (n < 11) return;
    memset(&r, 0, sizeof(r));
    r.esn = d[0] & 1;
    r.size = d[1] & 1 ? 0 : (uint32_t)(d[1] << 4 | 1) * (d[0] >> 4 ? 1 : 3);
    r.nblocks = r.size ? (r.size + 63) / 64 + 1 : 1;
    r.top = u64(d + 2);
    r.blocks = calloc(r.nblocks, sizeof(uint64_t));
    for (size_t i = 10; i + 4 <= n; i += 4) {
        uint64_t seq;
        uint32_t lo = (uint32_t)d[i] << 24 | (uint32_t)d[i + 1] << 16 | (uint32_t)d[i + 2] << 8 | d[i + 3];
        if (ef_replay_check(&r, lo, &seq) == 0) (void)ef_replay_accept(&r, seq);
    }
    free(r.blocks);
}

static void seal(const uint8_t *d, size_t n) {
    size_t pad_to, total;
    uint8_t *out;
    if (n < 2) return;
    pad_to = (size_t)(d[0] << 8 | d[1]) % 2048;
    total = ef_esp_sealed_length(n - 2, pad_to);
    out = malloc(total);
    if (ef_esp_seal(&enc, SPI, n >= 8 ? u64(d) : n, n & 1, d + 2, n - 2, pad_to, 4, out, total) != (long)total) abort();
    if (ef_esp_seal(&enc, SPI, 1, 0, d + 2, n - 2, pad_to, 4, out, total - 1) != -1) abort();
    free(out);
}

static uint8_t *copy_of(const uint8_t *p, size_t n) {
    uint8_t *c = malloc(n ? n : 1);
    if (c == NULL) abort();
    if (n) memcpy(c, p, n);
    return c;
}

static void gcm_vs_evp(const uint8_t *d, size_t n) {
    ef_aead fast_enc, fast_dec, evp_enc, evp_dec;
    uint8_t key[32], salt[4], iv[8], *aad, *body, *ct1, *ct2, *pt;
    size_t key_len, aad_len, m, cut, flip;
    int policy = ef_gcm_policy_get(), in_place;
    if (n < 4) return;
    key_len = d[0] & 1 ? 32 : 16;
    in_place = d[0] & 2;
    aad_len = d[1] % 33 < n - 4 ? d[1] % 33 : n - 4;
    for (size_t i = 0; i < 32; i++) key[i] = (uint8_t)(d[i % n] ^ i);
    for (size_t i = 0; i < 4; i++) salt[i] = (uint8_t)(d[(i + 7) % n] + 1);
    for (size_t i = 0; i < 8; i++) iv[i] = (uint8_t)(d[(i + 3) % n] ^ 0x5a);
    aad = copy_of(d + 4, aad_len);
    m = n - 4 - aad_len;
    body = copy_of(d + 4 + aad_len, m);
    cut = m ? d[2] * 31u % (m + 1) : 0;
    flip = (size_t)d[3] * 131u % ((m + EF_AEAD_ICV) * 8);
    ef_gcm_policy_set(EF_GCM_AUTO);
    if (ef_aead_init(&fast_enc, EF_AEAD_AES_GCM, key, key_len, salt, 1) < 0 ||
        ef_aead_init(&fast_dec, EF_AEAD_AES_GCM, key, key_len, salt, 0) < 0)
        abort();
    ef_gcm_policy_set(EF_GCM_OPENSSL);
    if (ef_aead_init(&evp_enc, EF_AEAD_AES_GCM, key, key_len, salt, 1) < 0 ||
        ef_aead_init(&evp_dec, EF_AEAD_AES_GCM, key, key_len, salt, 0) < 0 || evp_enc.gcm != NULL)
        abort();
    ef_gcm_policy_set(policy);
    ct1 = malloc(m + EF_AEAD_ICV); /* exact: ciphertext then tag */
    ct2 = malloc(m + EF_AEAD_ICV);
    pt = malloc(m ? m : 1);
    if (ct1 == NULL || ct2 == NULL || pt == NULL) abort();
    if (in_place) {
        if (m) memcpy(ct1, body, m);
        if (ef_aead_seal(&fast_enc, iv, aad, (int)aad_len, ct1, cut, ct1 + cut, m - cut, ct1, ct1 + m) != 0) abort();
    } else if (ef_aead_seal(&fast_enc, iv, aad, (int)aad_len, body, cut, body + cut, m - cut, ct1, ct1 + m) != 0) {
        abort();
    }
    if (ef_aead_seal(&evp_enc, iv, aad, (int)aad_len, body, m, body + m, 0, ct2, ct2 + m) != 0) abort();
    if (memcmp(ct1, ct2, m + EF_AEAD_ICV) != 0) abort(); /* the two implementations disagree */
    if (ef_aead_open(&fast_dec, iv, aad, (int)aad_len, ct1, m, ct1 + m, pt) != 1 || (m && memcmp(pt, body, m) != 0))
        abort();
    if (ef_aead_open(&evp_dec, iv, aad, (int)aad_len, ct2, m, ct2 + m, pt) != 1 || (m && memcmp(pt, body, m) != 0))
        abort();
    ct1[flip / 8] ^= (uint8_t)(1u << (flip % 8));
    ct2[flip / 8] ^= (uint8_t)(1u << (flip % 8));
    if (ef_aead_open(&fast_dec, iv, aad, (int)aad_len, ct1, m, ct1 + m, in_place ? ct1 : pt) != 0) abort();
    if (ef_aead_open(&evp_dec, iv, aad, (int)aad_len, ct2, m, ct2 + m, pt) != 0) abort();
    ef_aead_free(&fast_enc);
    ef_aead_free(&fast_dec);
    ef_aead_free(&evp_enc);
    ef_aead_free(&evp_dec);
    free(aad);
    free(body);
    free(ct1);
    free(ct2);
    free(pt);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *d;
    setup();
    if (size < 1) return 0;
    d = malloc(size - 1 ? size - 1 : 1); /* the input without the selector byte, in an exact buffer */
    memcpy(d, data + 1, size - 1);
    switch (data[0] % 8) {
    case 0: decap(d, size - 1, 0); break;
    case 1: decap(d, size - 1, 1); break;
    case 2: split(d, size - 1); break;
    case 3: merge(d, size - 1); break;
    case 4: inspect(d, size - 1); break;
    case 5: replay(d, size - 1); break;
    case 6: seal(d, size - 1); break;
    default: gcm_vs_evp(d, size - 1); break;
    }
    free(d);
    return 0;
}
