/* The compiled ESP hot loop, pure C (see espfast_core.h). */
#include "espfast_core.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#if OPENSSL_VERSION_MAJOR >= 3
#include <openssl/core_names.h>
#include <openssl/params.h>
#endif

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}
static inline void put16le(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static inline ef_addr addr4(const uint8_t *p) {
    ef_addr a = {0, be32(p)};
    return a;
}
static inline ef_addr addr16(const uint8_t *p) {
    ef_addr a;
    a.hi = (uint64_t)be32(p) << 32 | be32(p + 4);
    a.lo = (uint64_t)be32(p + 8) << 32 | be32(p + 12);
    return a;
}
#define addr_lt ef_addr_lt
static inline int addr_le(ef_addr a, ef_addr b) { return !addr_lt(b, a); }

/* -- checksums ------------------------------------------------------------------------------ */
uint16_t ef_fold(uint64_t sum) {
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)sum;
}

/* The folded one's-complement sum of p[0..n) as big-endian 16-bit words (odd tail padded),
 * plus `initial`. Sums native 32-bit loads and swaps at the end (RFC 1071 §2(B)). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
/* The 32-bit words of p[0..n & ~31) summed into 64 bits, 32 bytes per step: the TCP checksum
 * of each TSO segment was 5 % of the encrypting worker (perf) with the portable loop below
 * (54-66 ns per 1400 bytes here); this takes 24-25 ns. Each 64-bit lane takes at most n / 32
 * words, so nothing overflows for any n a buffer can have. */
__attribute__((target("avx2"))) static uint64_t sum32_avx2(const uint8_t *p, size_t n) {
    __m256i zero = _mm256_setzero_si256(), a = zero, b = zero, c = zero, d = zero;
    uint64_t lanes[4];
    size_t i = 0;
    for (; i + 64 <= n; i += 64) { /* two loads a step: independent adds */
        __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(p + i));
        __m256i w = _mm256_loadu_si256((const __m256i *)(const void *)(p + i + 32));
        a = _mm256_add_epi64(a, _mm256_unpacklo_epi32(v, zero));
        b = _mm256_add_epi64(b, _mm256_unpackhi_epi32(v, zero));
        c = _mm256_add_epi64(c, _mm256_unpacklo_epi32(w, zero));
        d = _mm256_add_epi64(d, _mm256_unpackhi_epi32(w, zero));
    }
    if (i + 32 <= n) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(p + i));
        a = _mm256_add_epi64(a, _mm256_unpacklo_epi32(v, zero));
        b = _mm256_add_epi64(b, _mm256_unpackhi_epi32(v, zero));
    }
    _mm256_storeu_si256((__m256i *)(void *)lanes, _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
static int have_avx2 = -1; /* decided at the first call */
#endif

uint32_t ef_sum16(const uint8_t *p, size_t n, uint32_t initial) {
    uint64_t s, a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (have_avx2 < 0) have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (have_avx2 && n >= 64) {
        a0 = sum32_avx2(p, n);
        p += n & ~(size_t)31;
        n &= 31;
    }
#endif
    while (n >= 16) { /* four independent sums: 2.4x the speed of one on this machine */
        uint32_t w[4];
        memcpy(w, p, 16);
        a0 += w[0];
        a1 += w[1];
        a2 += w[2];
        a3 += w[3];
        p += 16;
        n -= 16;
    }
    s = a0 + a1 + a2 + a3;
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        s += w;
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        s += w;
        p += 2;
        n -= 2;
    }
    if (n) {
        uint8_t tail[2] = {p[0], 0};
        uint16_t w;
        memcpy(&w, tail, 2);
        s += w;
    }
    uint16_t folded = ef_fold(s);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    folded = (uint16_t)(folded >> 8 | folded << 8);
#endif
    return ef_fold((uint64_t)folded + initial);
}

static uint32_t pseudo_sum(const uint8_t *src, const uint8_t *dst, size_t alen, uint8_t proto, uint32_t length) {
    return ef_fold((uint64_t)ef_sum16(src, alen, 0) + ef_sum16(dst, alen, 0) + proto + length);
}

/* -- AEAD ----------------------------------------------------------------------------------- */
static int gcm_policy = -1; /* -1: not read from the environment yet */

int ef_gcm_policy_get(void) {
    if (gcm_policy < 0) {
        const char *v = getenv("ESPLANADE_ESP_AESGCM");
        gcm_policy = v != NULL && strcmp(v, "openssl") == 0 ? EF_GCM_OPENSSL : EF_GCM_AUTO;
    }
    return gcm_policy;
}

void ef_gcm_policy_set(int policy) { gcm_policy = policy == EF_GCM_OPENSSL ? EF_GCM_OPENSSL : EF_GCM_AUTO; }

int ef_aead_init(ef_aead *aead, int kind, const uint8_t *key, size_t key_len, const uint8_t salt[4], int encrypt) {
    const EVP_CIPHER *cipher = NULL;
    memset(aead, 0, sizeof(*aead));
    if (kind == EF_AEAD_AES_GCM) {
        if ((key_len == 16 || key_len == 32) && ef_gcm_policy_get() == EF_GCM_AUTO && ef_gcm_supported()) {
            aead->gcm = ef_gcm_new(key, key_len);
            if (aead->gcm != NULL) {
                memcpy(aead->salt, salt, 4);
                aead->encrypt = encrypt;
                aead->kind = kind;
                return 0;
            } /* no memory: OpenSSL may still have some */
        }
        if (key_len == 16)
            cipher = EVP_aes_128_gcm();
        else if (key_len == 24)
            cipher = EVP_aes_192_gcm();
        else if (key_len == 32)
            cipher = EVP_aes_256_gcm();
    } else if (kind == EF_AEAD_CHACHA20_POLY1305 && key_len == 32) {
        cipher = EVP_chacha20_poly1305();
    }
    if (cipher == NULL) return -1;
    aead->ctx = EVP_CIPHER_CTX_new();
    if (aead->ctx == NULL) return -1;
    if (EVP_CipherInit_ex(aead->ctx, cipher, NULL, NULL, NULL, encrypt) != 1 ||
        EVP_CIPHER_CTX_ctrl(aead->ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) != 1 ||
        EVP_CipherInit_ex(aead->ctx, NULL, NULL, key, NULL, encrypt) != 1) {
        ef_aead_free(aead);
        return -1;
    }
    memcpy(aead->salt, salt, 4);
    aead->encrypt = encrypt;
    aead->kind = kind;
    return 0;
}

void ef_aead_free(ef_aead *aead) {
    if (aead->ctx != NULL) EVP_CIPHER_CTX_free(aead->ctx); /* clears the key schedule */
    aead->ctx = NULL;
    ef_gcm_free(aead->gcm); /* wipes the round keys and the powers of H */
    aead->gcm = NULL;
}

const char *ef_aead_implementation(const ef_aead *aead) {
    if (aead->gcm != NULL) return ef_gcm_name();
    return aead->ctx != NULL ? "openssl" : NULL;
}

/* Set (`set`) or get the 16-byte tag through the provider's parameters directly: the same as
 * EVP_CTRL_AEAD_SET_TAG / GET_TAG, without EVP_CIPHER_CTX_ctrl's translation of the control
 * into parameters on every packet (OpenSSL 3). 1 on success. */
static int aead_tag(EVP_CIPHER_CTX *ctx, uint8_t tag[EF_AEAD_ICV], int set) {
#if OPENSSL_VERSION_MAJOR >= 3
    OSSL_PARAM params[2] = {OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, EF_AEAD_ICV), OSSL_PARAM_END};
    return set ? EVP_CIPHER_CTX_set_params(ctx, params) : EVP_CIPHER_CTX_get_params(ctx, params);
#else
    return EVP_CIPHER_CTX_ctrl(ctx, set ? EVP_CTRL_AEAD_SET_TAG : EVP_CTRL_AEAD_GET_TAG, EF_AEAD_ICV, tag);
#endif
}

/* Start a message with this 12-byte nonce; 1 on success. AES-GCM on OpenSSL 3 takes the whole
 * IV through the provider's TLS1_IV_FIXED parameter with length -1 ("restore the whole IV":
 * the provider's setivfixed copies it and marks it buffered, exactly what an Init with only an
 * IV does). That skips EVP_CipherInit_ex's per-call EVP_CIPHER_CTX_get_iv_length, which on
 * OpenSSL 3.0 is a parameter query of its own: 40 ns less per packet here, same bytes (the
 * differential tests compare every AES-GCM packet with the Python engine). ChaCha20-Poly1305's
 * provider takes only the 4-byte fixed part that way, so it keeps the Init. */
static int aead_nonce(ef_aead *a, uint8_t nonce[12]) {
#if OPENSSL_VERSION_MAJOR >= 3
    if (a->kind == EF_AEAD_AES_GCM) {
        OSSL_PARAM params[2] = {
            OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TLS1_IV_FIXED, nonce, (size_t)-1), OSSL_PARAM_END};
        return EVP_CIPHER_CTX_set_params(a->ctx, params);
    }
#endif
    return EVP_CipherInit_ex(a->ctx, NULL, NULL, NULL, nonce, a->encrypt);
}

/* EVP's tag check after its updates wrote n bytes: 1, or 0 with the unauthenticated plaintext
 * wiped from out (as the VAES path leaves none behind). */
static int evp_open_final(ef_aead *a, uint8_t *out, size_t ct_len, int n) {
    int fin = 0;
    if (EVP_DecryptFinal_ex(a->ctx, out + n, &fin) > 0) return 1;
    OPENSSL_cleanse(out, ct_len);
    return 0;
}

int ef_aead_open(ef_aead *a, const uint8_t iv[8], const uint8_t *aad, int aad_len, const uint8_t *ct, size_t ct_len,
                 const uint8_t *tag, uint8_t *out) {
    uint8_t nonce[12], t[EF_AEAD_ICV];
    int n = 0;
    if ((a->ctx == NULL && a->gcm == NULL) || a->encrypt || ct_len > INT32_MAX || aad_len < 0) return -1;
    memcpy(nonce, a->salt, 4);
    memcpy(nonce + 4, iv, 8);
    if (a->gcm != NULL) return ef_gcm_open(a->gcm, nonce, aad, (size_t)aad_len, ct, ct_len, tag, out);
    memcpy(t, tag, EF_AEAD_ICV);
#if OPENSSL_VERSION_MAJOR >= 3
    if (a->kind == EF_AEAD_AES_GCM) {
        /* The expected tag and the nonce in one call to the provider: its set_ctx_params copies
         * the tag into the context (kept until the final) and restores the whole IV, so one
         * walk of its parameter names instead of two per packet. */
        OSSL_PARAM params[3] = {OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, t, EF_AEAD_ICV),
                                OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TLS1_IV_FIXED, nonce, (size_t)-1),
                                OSSL_PARAM_END};
        if (EVP_CIPHER_CTX_set_params(a->ctx, params) != 1) return -1;
        if (EVP_DecryptUpdate(a->ctx, NULL, &n, aad, aad_len) != 1) return -1;
        if (EVP_DecryptUpdate(a->ctx, out, &n, ct, (int)ct_len) != 1) return -1;
        if (n < 0 || (size_t)n > ct_len) return -1;
        return evp_open_final(a, out, ct_len, n);
    }
#endif
    if (aead_nonce(a, nonce) != 1) return -1;
    if (EVP_DecryptUpdate(a->ctx, NULL, &n, aad, aad_len) != 1) return -1;
    if (EVP_DecryptUpdate(a->ctx, out, &n, ct, (int)ct_len) != 1) return -1;
    if (aead_tag(a->ctx, t, 1) != 1) return -1;
    if (n < 0 || (size_t)n > ct_len) return -1;
    return evp_open_final(a, out, ct_len, n);
}

/* -- replay window (replay.py) ------------------------------------------------------------ */
#define LOW32 0xFFFFFFFFull

static int replay_infer(const ef_replay *r, uint32_t seq_lo, uint64_t *seq) {
    uint64_t window, top_hi, top_lo, seq_hi;
    if (!r->esn) {
        *seq = seq_lo;
        return 0;
    }
    window = r->size ? r->size : (1ull << 31);
    top_hi = r->top >> 32;
    top_lo = r->top & LOW32;
    if (top_lo >= window - 1) {
        /* Case A: the window lies inside one 2^32 subspace. */
        seq_hi = seq_lo >= top_lo - window + 1 ? top_hi : top_hi + 1;
    } else {
        /* Case B: the window spans two subspaces. */
        uint32_t edge = (uint32_t)(top_lo - window + 1); /* mod 2^32, as Python's & LOW32 */
        if (seq_lo >= edge) {
            if (top_hi == 0) return -1;
            seq_hi = top_hi - 1;
        } else {
            seq_hi = top_hi;
        }
    }
    if (seq_hi > LOW32) return -1; /* past 2^64 - 1: no such sequence number */
    *seq = seq_hi << 32 | seq_lo;
    return 0;
}

int ef_replay_check(const ef_replay *r, uint32_t seq_lo, uint64_t *out) {
    uint64_t seq, word;
    if (replay_infer(r, seq_lo, &seq) < 0 || seq == 0) return -1;
    if (seq > r->top || !r->size) {
        *out = seq;
        return 0;
    }
    if (r->top - seq >= r->size) return -1; /* seq + size <= top, without overflow */
    word = r->blocks[(seq >> 6) % r->nblocks];
    if (word >> (seq & 63) & 1) return -1;
    *out = seq;
    return 0;
}

int ef_replay_accept(ef_replay *r, uint64_t seq) {
    uint64_t *blocks = r->blocks, bit;
    uint32_t nblocks = r->nblocks, slot;
    if (!r->size) {
        if (seq > r->top) r->top = seq;
        return 1;
    }
    if (seq > r->top) {
        uint64_t index = seq >> 6, top_index = r->top >> 6;
        if (index - top_index >= nblocks) {
            memset(blocks, 0, (size_t)nblocks * sizeof(uint64_t));
        } else {
            for (uint64_t i = top_index + 1; i <= index; i++) blocks[i % nblocks] = 0;
        }
        r->top = seq;
    } else if (r->top - seq >= r->size) {
        return 0;
    }
    slot = (uint32_t)((seq >> 6) % nblocks);
    bit = 1ull << (seq & 63);
    if (blocks[slot] & bit) return 0;
    blocks[slot] |= bit;
    return 1;
}

/* -- packet parsing (packet.py parse_flow) ---------------------------------------------------- */
static int is_port_protocol(uint8_t p) { return p == 6 || p == 17 || p == 132 || p == 136 || p == 33; }

int ef_parse_flow(const uint8_t *p, size_t n, ef_flow_key *k) {
    size_t offset, end;
    uint8_t proto;
    int first = 1;
    memset(k, 0, sizeof(*k));
    if (n == 0) return -1;
    k->version = p[0] >> 4;
    if (k->version == 4) {
        size_t ihl = (size_t)(p[0] & 0x0F) * 4, total;
        uint16_t frag;
        if (ihl < 20 || n < ihl) return -1;
        total = be16(p + 2);
        if (total < ihl || total > n) return -1;
        frag = be16(p + 6) & 0x3FFF;
        if (frag) {
            k->fragment = 1;
            first = (frag & 0x1FFF) == 0;
        }
        k->src = addr4(p + 12);
        k->dst = addr4(p + 16);
        proto = p[9];
        offset = ihl;
        end = total;
    } else if (k->version == 6) {
        if (n < 40) return -1;
        end = 40 + (size_t)be16(p + 4);
        if (end > n) return -1;
        k->src = addr16(p + 8);
        k->dst = addr16(p + 24);
        proto = p[6];
        offset = 40;
        while (proto == 0 || proto == 43 || proto == 60 || proto == 44 || proto == 51) {
            size_t length;
            if (offset + 8 > n) return -1;
            if (proto == 44)
                length = 8;
            else if (proto == 51)
                length = ((size_t)p[offset + 1] + 2) * 4;
            else
                length = ((size_t)p[offset + 1] + 1) * 8;
            if (offset + length > end) return -1;
            if (proto == 44) {
                k->fragment = 1;
                first = (be16(p + offset + 2) >> 3) == 0;
            }
            proto = p[offset];
            offset += length;
            if (!first) break;
        }
    } else {
        return -1;
    }
    k->protocol = proto;
    k->src_port = k->dst_port = -1;
    if (!first) {
        k->fragment = 1;
        return 0;
    }
    if (is_port_protocol(proto)) {
        if (offset + 4 > end) return -1;
        k->src_port = be16(p + offset);
        k->dst_port = be16(p + offset + 2);
    } else if (proto == 1 || proto == 58) {
        if (offset + 2 > end) return -1;
        k->src_port = k->dst_port = be16(p + offset);
    }
    return 0;
}

static int selector_matches(const ef_selector *s, uint8_t version, ef_addr addr, uint8_t proto, int32_t port) {
    if (s->version != version || !addr_le(s->lo, addr) || !addr_le(addr, s->hi)) return 0;
    if (s->protocol && s->protocol != proto) return 0;
    if (s->port_lo == -1) return 1;
    if (s->port_lo == -2) return port < 0;
    return s->port_lo <= port && port <= s->port_hi;
}

int ef_selectors_allow_inbound(const ef_selectors *s, const ef_flow_key *f) {
    int ok = 0;
    for (uint32_t i = 0; i < s->nremote && !ok; i++)
        ok = selector_matches(&s->remote[i], f->version, f->src, f->protocol, f->src_port);
    if (!ok) return 0;
    for (uint32_t i = 0; i < s->nlocal; i++)
        if (selector_matches(&s->local[i], f->version, f->dst, f->protocol, f->dst_port)) return 1;
    return 0;
}

/* -- ESP (esp_codec.py) ----------------------------------------------------------------------- */
long ef_inner_ip_length(const uint8_t *p, size_t limit) {
    if (limit < 1) return -1;
    if (p[0] >> 4 == 4) {
        size_t ihl4 = (size_t)(p[0] & 0x0F) * 4, length;
        if (limit < 20 || (p[0] & 0x0F) < 5) return -1;
        length = be16(p + 2);
        return ihl4 <= length && length <= limit ? (long)length : -1;
    }
    if (p[0] >> 4 == 6) {
        size_t length;
        if (limit < 40) return -1;
        length = 40 + (size_t)be16(p + 4);
        return length <= limit ? (long)length : -1;
    }
    return -1;
}

int ef_esp_open(ef_inbound *sa, const uint8_t *esp, size_t len, uint8_t *out, size_t out_cap, size_t *inner_len,
                int *accepted) {
    uint8_t aad[12];
    int aad_len, r;
    uint64_t seq;
    size_t n, data_len, padlen;
    uint8_t next_header;
    long length;
    int version, expected;

    *accepted = 0;
    *inner_len = 0;
    if (len < EF_AEAD_OVERHEAD + EF_AEAD_ALIGN || (len - EF_AEAD_OVERHEAD) % EF_AEAD_ALIGN) return EF_MALFORMED;
    if (be32(esp) != sa->spi) return EF_UNKNOWN_SPI;
    if (ef_replay_check(&sa->replay, be32(esp + 4), &seq) < 0) return EF_REPLAY;
    n = len - EF_AEAD_OVERHEAD;
    if (out_cap < n) return EF_CRYPTO_ERROR; /* the caller sized `out` wrongly */
    memcpy(aad, esp, 4);
    if (sa->esn) {
        put32(aad + 4, (uint32_t)(seq >> 32));
        memcpy(aad + 8, esp + 4, 4);
        aad_len = 12;
    } else {
        memcpy(aad + 4, esp + 4, 4);
        aad_len = 8;
    }
    r = ef_aead_open(&sa->aead, esp + 8, aad, aad_len, esp + 16, n, esp + len - EF_AEAD_ICV, out);
    if (r < 0) return EF_CRYPTO_ERROR;
    if (r == 0) return EF_ICV_FAILURE;
    /* Authentic from here on: the window moves even if the content turns out malformed. */
    if (!ef_replay_accept(&sa->replay, seq)) return EF_REPLAY;
    *accepted = 1;
    padlen = out[n - 2];
    next_header = out[n - 1];
    if (padlen > n - 2) return EF_MALFORMED;
    data_len = n - 2 - padlen;
    for (size_t i = 0; i < padlen; i++)
        if (out[data_len + i] != (uint8_t)(i + 1)) return EF_MALFORMED;
    if (next_header == 59) return EF_DUMMY;
    version = data_len ? out[0] >> 4 : 0;
    expected = version == 4 ? 4 : version == 6 ? 41 : -1;
    if (expected != next_header) return EF_MALFORMED;
    length = ef_inner_ip_length(out, data_len);
    if (length < 0) return EF_MALFORMED;
    *inner_len = (size_t)length; /* also on EF_POLICY_MISMATCH: the caller may sample the packet */
    if (sa->selectors != NULL) {
        ef_flow_key flow;
        if (ef_parse_flow(out, (size_t)length, &flow) < 0) {
            *inner_len = 0;
            return EF_MALFORMED;
        }
        if (!ef_selectors_allow_inbound(sa->selectors, &flow)) return EF_POLICY_MISMATCH;
    }
    return EF_OK;
}

size_t ef_esp_sealed_length(size_t size, size_t pad_to) {
    size_t tfc = pad_to > size ? pad_to - size : 0;
    size_t padlen = (EF_AEAD_ALIGN - (size + tfc + 2) % EF_AEAD_ALIGN) % EF_AEAD_ALIGN;
    return EF_AEAD_OVERHEAD + size + tfc + padlen + 2;
}

long ef_esp_seal(ef_aead *a, uint32_t spi, uint64_t seq, int esn, const uint8_t *body, size_t size, size_t pad_to,
                 uint8_t next_header, uint8_t *out, size_t out_cap) {
    size_t total = ef_esp_sealed_length(size, pad_to);
    size_t tail = total - EF_AEAD_OVERHEAD - size; /* TFC zeros, padding, pad length, next header */
    size_t tfc = pad_to > size ? pad_to - size : 0, padlen = tail - tfc - 2;
    uint8_t aad[12], *ct = out + EF_ESP_HEADER + EF_AEAD_IV, *t;
    int aad_len;

    if ((a->ctx == NULL && a->gcm == NULL) || !a->encrypt || total > out_cap || total > INT32_MAX) return -1;
    put32(out, spi);
    put32(out + 4, (uint32_t)seq);
    put32(out + 8, (uint32_t)(seq >> 32)); /* the explicit IV is the 64-bit sequence number */
    put32(out + 12, (uint32_t)seq);
    put32(aad, spi);
    if (esn) {
        put32(aad + 4, (uint32_t)(seq >> 32));
        put32(aad + 8, (uint32_t)seq);
        aad_len = 12;
    } else {
        put32(aad + 4, (uint32_t)seq);
        aad_len = 8;
    }
    t = ct + size;
    memset(t, 0, tfc);
    for (size_t i = 0; i < padlen; i++) t[tfc + i] = (uint8_t)(i + 1);
    t[tail - 2] = (uint8_t)padlen;
    t[tail - 1] = next_header;
    if (ef_aead_seal(a, out + 8, aad, aad_len, body, size, t, tail, ct, ct + size + tail) != 0) return -1;
    return (long)total;
}

int ef_aead_seal(ef_aead *a, const uint8_t iv[8], const uint8_t *aad, int aad_len, const uint8_t *body, size_t size,
                 const uint8_t *trailer, size_t tail, uint8_t *ct, uint8_t tag[EF_AEAD_ICV]) {
    uint8_t nonce[12];
    int n = 0;
    if ((a->ctx == NULL && a->gcm == NULL) || !a->encrypt || size > INT32_MAX || tail > INT32_MAX - size ||
        aad_len < 0)
        return -1;
    memcpy(nonce, a->salt, 4);
    memcpy(nonce + 4, iv, 8);
    if (a->gcm != NULL) {
        ef_gcm_seal2(a->gcm, nonce, aad, (size_t)aad_len, body, size, trailer, tail, ct, tag);
        return 0;
    }
    if (aead_nonce(a, nonce) != 1) return -1;
    if (EVP_EncryptUpdate(a->ctx, NULL, &n, aad, aad_len) != 1) return -1;
    if (size && EVP_EncryptUpdate(a->ctx, ct, &n, body, (int)size) != 1) return -1;
    if (tail && EVP_EncryptUpdate(a->ctx, ct + size, &n, trailer, (int)tail) != 1) return -1;
    if (EVP_EncryptFinal_ex(a->ctx, ct + size + tail, &n) != 1) return -1;
    if (aead_tag(a->ctx, tag, 0) != 1) return -1;
    return 0;
}

/* -- the packet filter (filters.py) ------------------------------------------------------------ */
static int filter_port_protocol(uint8_t p) { return p == 6 || p == 17 || p == 132 || p == 136; }

static int inner_ports(const uint8_t *p, size_t n, size_t at, uint8_t proto, ef_inner_header *h) {
    if (filter_port_protocol(proto)) {
        if (n < at + 4) return -1;
        h->src_port = be16(p + at);
        h->dst_port = be16(p + at + 2);
    } else if (proto == 1 || proto == 58) {
        if (n < at + 2) return -1;
        h->src_port = 0;
        h->dst_port = be16(p + at);
    } else {
        h->src_port = h->dst_port = 0;
    }
    return 0;
}

int ef_parse_inner(const uint8_t *p, size_t n, ef_inner_header *h) {
    memset(h, 0, sizeof(*h));
    if (n < 20) return -1;
    h->version = p[0] >> 4;
    if (h->version == 4) {
        size_t ihl = (size_t)(p[0] & 0x0F) * 4;
        uint16_t offset;
        if (ihl < 20 || n < ihl) return -1;
        h->protocol = p[9];
        h->src = addr4(p + 12);
        h->dst = addr4(p + 16);
        offset = (uint16_t)((p[6] & 0x1F) << 8 | p[7]);
        if (offset) {
            if (offset == 1 && h->protocol == 6) return -1; /* RFC 1858 §3.2 */
            h->src_port = h->dst_port = -1;
            return 0;
        }
        return inner_ports(p, n, ihl, h->protocol, h);
    }
    if (h->version == 6) {
        size_t at = 40;
        uint8_t proto;
        int i;
        if (n < 40) return -1;
        h->src = addr16(p + 8);
        h->dst = addr16(p + 24);
        proto = p[6];
        for (i = 0; i < 9; i++) {
            if (proto == 0 || proto == 43 || proto == 60) {
                if (n < at + 2) return -1;
                proto = p[at];
                at += ((size_t)p[at + 1] + 1) * 8;
            } else if (proto == 44) {
                uint16_t frag_offset;
                if (n < at + 8) return -1;
                frag_offset = be16(p + at + 2) >> 3;
                proto = p[at];
                at += 8;
                if (frag_offset) {
                    h->protocol = proto;
                    h->src_port = h->dst_port = -1;
                    return 0;
                }
            } else {
                break;
            }
        }
        if (i == 9) return -1; /* too many extension headers */
        h->protocol = proto;
        return inner_ports(p, n, at, proto, h);
    }
    return -1;
}

int ef_filter_allows(const ef_filter *f, const ef_inner_header *h) {
    const ef_filter_table *t;
    uint32_t lo = 0, hi, k;
    int v, index;
    if (h->version != 4 && h->version != 6) return 0;
    v = h->version == 6;
    index = f->index[v][h->protocol];
    if (index < 0) index = f->index[v][0];
    if (index < 0 || (uint32_t)index >= f->ntables) return 0;
    t = &f->tables[index];
    hi = t->nseg;
    while (lo < hi) { /* bisect_right(starts, dst) */
        uint32_t mid = lo + (hi - lo) / 2;
        if (addr_lt(h->dst, t->starts[mid]))
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo == 0) return 0; /* below the first start: Python's segments[-1], always a gap */
    k = lo - 1;
    if (t->kind[k] == 0) return 0;
    if (t->kind[k] == 1 || h->dst_port < 0) return 1;
    {
        const uint32_t *los = t->port_lo + t->first[k], *his = t->port_hi + t->first[k];
        uint32_t plo = 0, phi = t->count[k], port = (uint32_t)h->dst_port;
        while (plo < phi) {
            uint32_t mid = plo + (phi - plo) / 2;
            if (port < los[mid])
                phi = mid;
            else
                plo = mid + 1;
        }
        return plo > 0 && port <= his[plo - 1];
    }
}

/* -- flow accounting --------------------------------------------------------------------------- */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static inline int flow_is(const ef_flow *f, uint32_t spi, int direction, const ef_inner_header *h) {
    return f->used && f->spi == spi && f->direction == direction && f->version == h->version &&
           f->protocol == h->protocol && f->src_port == h->src_port && f->dst_port == h->dst_port &&
           f->src.hi == h->src.hi && f->src.lo == h->src.lo && f->dst.hi == h->dst.hi && f->dst.lo == h->dst.lo;
}

void ef_flows_add(ef_flows *t, uint32_t spi, int direction, const ef_inner_header *h, uint64_t bytes) {
    ef_inner_header none;
    uint64_t hash;
    uint32_t mask = t->capacity - 1, i;
    if (h == NULL) {
        memset(&none, 0, sizeof(none));
        h = &none;
    }
    if (t->last < t->capacity && flow_is(&t->slots[t->last], spi, direction, h)) { /* a run of one flow */
        t->slots[t->last].packets++;
        t->slots[t->last].bytes += bytes;
        return;
    }
    hash = mix64(((uint64_t)spi << 32 | (uint64_t)direction << 16 | (uint64_t)h->version << 8 | h->protocol) ^
                 mix64(h->src.hi ^ mix64(h->src.lo ^ mix64(h->dst.hi ^ mix64(h->dst.lo)))) ^
                 ((uint64_t)(uint32_t)h->src_port << 32 | (uint32_t)h->dst_port));
    for (i = (uint32_t)hash & mask;; i = (i + 1) & mask) {
        ef_flow *f = &t->slots[i];
        if (!f->used) {
            if (t->count >= t->limit) {
                t->overflow_packets++;
                t->overflow_bytes += bytes;
                return;
            }
            f->used = 1;
            f->spi = spi;
            f->direction = (uint8_t)direction;
            f->version = h->version;
            f->protocol = h->protocol;
            f->src = h->src;
            f->dst = h->dst;
            f->src_port = h->src_port;
            f->dst_port = h->dst_port;
            f->packets = 1;
            f->bytes = bytes;
            t->count++;
            t->last = i;
            return;
        }
        if (flow_is(f, spi, direction, h)) {
            f->packets++;
            f->bytes += bytes;
            t->last = i;
            return;
        }
    }
}

/* -- TSO/USO splitting (segmentation.py split_super_packet) ------------------------------------ */
enum { GSO_NONE = 0, GSO_TCPV4 = 1, GSO_UDP = 3, GSO_TCPV6 = 4, GSO_UDP_L4 = 5 };
#define F_NEEDS_CSUM 0x01
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

typedef ef_split_cursor split_plan;

static long plan_split(const uint8_t *frame, size_t len, split_plan *s) {
    size_t seg_max;
    if (len < EF_VNET_HDR_LEN) return -1;
    memset(s, 0, offsetof(split_plan, head));
    s->flags = frame[0];
    s->gso_type = frame[1] & 0x7F; /* without the ECN bit */
    s->gso_size = le16(frame + 4);
    s->csum_start = le16(frame + 6);
    s->csum_offset = le16(frame + 8);
    s->p = (uint8_t *)frame + EF_VNET_HDR_LEN; /* written only by the in-place split */
    s->n = len - EF_VNET_HDR_LEN;
    if (s->gso_type == GSO_NONE) {
        if ((s->flags & F_NEEDS_CSUM) &&
            ((size_t)s->csum_start >= s->n || (size_t)s->csum_start + s->csum_offset + 2 > s->n))
            return -1;
        s->count = 1;
        return 1;
    }
    if (s->gso_type != GSO_TCPV4 && s->gso_type != GSO_TCPV6 && s->gso_type != GSO_UDP_L4) return -1;
    if (s->gso_size == 0 || s->n == 0) return -1;
    s->v6 = s->p[0] >> 4 == 6;
    if (!s->v6 && (s->p[0] >> 4 != 4 || (s->p[0] & 0x0F) < 5)) return -1; /* not IP: Python splits garbage */
    s->l3 = s->v6 ? 40 : (size_t)(s->p[0] & 0x0F) * 4;
    if (s->n < s->l3 + 8) return -1;
    if (s->gso_type == GSO_UDP_L4) {
        s->hlen = s->l3 + 8;
    } else {
        if (s->n < s->l3 + 20) return -1;
        if (s->p[s->l3 + 12] >> 4 < 5) return -1; /* TCP data offset below its own header */
        s->hlen = s->l3 + (size_t)(s->p[s->l3 + 12] >> 4) * 4;
        if (s->hlen > s->n) return -1;
    }
    s->payload = s->n - s->hlen;
    s->count = s->payload ? (s->payload + s->gso_size - 1) / s->gso_size : 1;
    seg_max = s->hlen + (s->payload < s->gso_size ? s->payload : s->gso_size);
    if (seg_max - (s->v6 ? 40 : 0) > EF_MAX_IP) return -1; /* a length field would overflow */
    s->src = s->v6 ? s->p + 8 : s->p + 12;
    s->dst = s->v6 ? s->p + 24 : s->p + 16;
    if (s->gso_type != GSO_UDP_L4) {
        s->seq0 = be32(s->p + s->l3 + 4);
        s->flags0 = s->p[s->l3 + 13];
    }
    return (long)s->count;
}

long ef_split_size(const uint8_t *frame, size_t len, size_t *bytes) {
    split_plan s;
    long count = plan_split(frame, len, &s);
    if (count < 0) return -1;
    *bytes = s.gso_type == GSO_NONE ? s.n : s.count * s.hlen + s.payload;
    return count;
}

static void finish_l3(uint8_t *seg, size_t total, int v6, size_t ip_id_step) {
    size_t ihl;
    if (v6) {
        put16(seg + 4, (uint32_t)(total - 40));
        return;
    }
    put16(seg + 2, (uint32_t)total);
    if (ip_id_step) put16(seg + 4, (uint32_t)((be16(seg + 4) + ip_id_step) & 0xFFFF));
    ihl = (size_t)(seg[0] & 0x0F) * 4;
    seg[10] = seg[11] = 0;
    put16(seg + 10, (uint16_t)~ef_sum16(seg, ihl, 0));
}

/* A frame without GSO: its partial checksum completed (the packet is `pkt`, s->n bytes). */
static void finish_plain(const split_plan *s, uint8_t *pkt) {
    if (s->flags & F_NEEDS_CSUM) {
        size_t field = (size_t)s->csum_start + s->csum_offset;
        uint16_t value = (uint16_t)~ef_sum16(pkt + s->csum_start, s->n - s->csum_start, 0);
        if (value == 0 && s->csum_offset == 6) value = 0xFFFF;
        put16(pkt + field, value);
    }
}

/* Segment i (its headers and payload already in place at `seg`, `total` bytes): lengths, IP ID,
 * sequence number, flags, checksums. */
static void finish_segment(const split_plan *s, uint8_t *seg, size_t i, size_t total) {
    size_t alen = s->v6 ? 16 : 4;
    if (s->gso_type == GSO_UDP_L4) {
        uint16_t value;
        finish_l3(seg, total, s->v6, i);
        put16(seg + s->l3 + 4, (uint32_t)(total - s->l3));
        seg[s->l3 + 6] = seg[s->l3 + 7] = 0;
        value = (uint16_t)~ef_sum16(seg + s->l3, total - s->l3,
                                    pseudo_sum(s->src, s->dst, alen, 17, (uint32_t)(total - s->l3)));
        put16(seg + s->l3 + 6, value ? value : 0xFFFF);
    } else {
        uint8_t flags = s->flags0;
        put32(seg + s->l3 + 4, (uint32_t)(s->seq0 + i * s->gso_size));
        if (i != s->count - 1) flags &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (i != 0) flags &= (uint8_t)~TCP_CWR;
        seg[s->l3 + 13] = flags;
        finish_l3(seg, total, s->v6, i);
        seg[s->l3 + 16] = seg[s->l3 + 17] = 0;
        put16(seg + s->l3 + 16, (uint16_t)~ef_sum16(seg + s->l3, total - s->l3,
                                                   pseudo_sum(s->src, s->dst, alen, 6, (uint32_t)(total - s->l3))));
    }
}

static size_t segment_length(const split_plan *s, size_t i) {
    size_t off = i * s->gso_size;
    if (s->gso_type == GSO_NONE) return s->n;
    return s->hlen + (s->payload - off < s->gso_size ? s->payload - off : s->gso_size);
}

long ef_split_frame(const uint8_t *frame, size_t len, uint8_t *out, size_t out_cap, uint32_t *lens, size_t max_count) {
    split_plan s;
    size_t bytes, at = 0;
    long count = ef_split_size(frame, len, &bytes);
    if (count < 0 || bytes > out_cap || (size_t)count > max_count) return -1;
    plan_split(frame, len, &s);
    if (s.gso_type == GSO_NONE) {
        memcpy(out, s.p, s.n);
        finish_plain(&s, out);
        lens[0] = (uint32_t)s.n;
        return 1;
    }
    for (size_t i = 0; i < s.count; i++) {
        size_t total = segment_length(&s, i);
        uint8_t *seg = out + at;
        memcpy(seg, s.p, s.hlen);
        memcpy(seg + s.hlen, s.p + s.hlen + i * s.gso_size, total - s.hlen);
        finish_segment(&s, seg, i, total);
        lens[i] = (uint32_t)total;
        at += total;
    }
    return count;
}

long ef_split_start(ef_split_cursor *c, uint8_t *frame, size_t len) {
    long count = plan_split(frame, len, c);
    if (count < 0) return -1;
    if (c->gso_type != GSO_NONE) {
        if (c->hlen > EF_SPLIT_HEAD_MAX) return -1; /* cannot be: IHL and data offset are 4 bits */
        memcpy(c->head, c->p, c->hlen);
        c->src = c->v6 ? c->head + 8 : c->head + 12; /* the frame's own bytes get overwritten */
        c->dst = c->v6 ? c->head + 24 : c->head + 16;
    }
    return count;
}

size_t ef_split_length(const ef_split_cursor *c, size_t i) { return segment_length(c, i); }

uint8_t *ef_split_next(ef_split_cursor *c) {
    size_t i = c->next;
    uint8_t *seg;
    if (i >= c->count) return NULL;
    c->next++;
    if (c->gso_type == GSO_NONE) {
        finish_plain(c, c->p);
        return c->p;
    }
    /* segment i's payload lies at p + hlen + i * gso_size: its headers go just before it, over
     * bytes of segment i - 1 (already used) or, for i = 0, over the frame's own headers */
    seg = c->p + i * c->gso_size;
    memcpy(seg, c->head, c->hlen);
    finish_segment(c, seg, i, segment_length(c, i));
    return seg;
}

/* -- GRO-style merging for TUN writes (segmentation.py coalesce_for_tun) ------------------------ */
#define CLOSED (-1)

struct ef_merge {
    int32_t first, last;
    uint32_t nparts;
    uint32_t l3, hlen, gso_size, total, limit;
    int64_t next_seq;
    uint32_t sig_a, sig_b, sig_c; /* ack / tos|vtf / ttl|hop|frag: see coalesce_plan */
    const uint8_t *opts;
    uint32_t opt_len;
    const uint8_t *key;
    uint32_t key_len;
    uint64_t hash;
    uint8_t psh, udp, v6;
};

size_t ef_coalesce_scratch_bytes(size_t n) {
    size_t nbuckets = 16;
    while (nbuckets < 2 * n) nbuckets <<= 1;
    return n * (sizeof(ef_merge) + 2 * sizeof(int32_t)) + nbuckets * sizeof(int32_t);
}

static uint64_t key_hash(const uint8_t *key, size_t len, int udp) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)udp;
    for (size_t i = 0; i < len; i++) h = (h ^ key[i]) * 0x100000001B3ull;
    return mix64(h);
}

static int32_t open_find(const ef_coalesce_state *st, const uint8_t *key, uint32_t key_len, int udp, uint64_t hash,
                         uint32_t *slot) {
    uint32_t mask = st->nbuckets - 1;
    for (uint32_t i = (uint32_t)hash & mask;; i = (i + 1) & mask) {
        int32_t m = st->buckets[i];
        if (m < 0) {
            *slot = i;
            return -1;
        }
        const ef_merge *g = &st->merges[m];
        if (g->hash == hash && g->udp == udp && g->key_len == key_len && memcmp(g->key, key, key_len) == 0) {
            *slot = i;
            return m;
        }
    }
}

static void plain(ef_coalesce_state *st, size_t i) { st->item[st->nitems++] = -(int32_t)i - 1; }

/* One packet, TCP or UDP, IPv4 or IPv6: join the open merge of its flow or start one. */
static void merge_packet(ef_coalesce_state *st, const ef_span *pkts, size_t i, const uint8_t *key, uint32_t key_len,
                         int udp, int v6, uint32_t l3, uint32_t hlen, uint32_t plen, uint32_t seq, int psh,
                         uint32_t sig_a, uint32_t sig_b, uint32_t sig_c, const uint8_t *opts, uint32_t opt_len) {
    uint64_t hash = key_hash(key, key_len, udp);
    uint32_t slot;
    int32_t mi = open_find(st, key, key_len, udp, hash, &slot);
    if (mi >= 0) {
        ef_merge *m = &st->merges[mi];
        int64_t want = udp ? 0 : (int64_t)seq;
        if (m->next_seq == want && plen <= m->limit && m->sig_a == sig_a && m->sig_b == sig_b && m->sig_c == sig_c &&
            m->hlen == hlen && m->opt_len == opt_len && memcmp(m->opts, opts, opt_len) == 0) {
            st->next_part[m->last] = (int32_t)i;
            m->last = (int32_t)i;
            m->nparts++;
            m->total += plen;
            m->limit = m->gso_size < EF_MAX_IP - m->total ? m->gso_size : EF_MAX_IP - m->total;
            if (plen < m->gso_size || m->nparts >= EF_MAX_MERGED_SEGMENTS) m->next_seq = CLOSED;
            if (!udp) {
                if (m->next_seq != CLOSED) m->next_seq = (uint32_t)(seq + plen);
                if (psh) {
                    m->next_seq = CLOSED;
                    m->psh = 1;
                }
            }
            return;
        }
    }
    {
        int32_t ni = (int32_t)st->nmerges++;
        ef_merge *m = &st->merges[ni];
        memset(m, 0, sizeof(*m));
        m->first = m->last = (int32_t)i;
        m->nparts = 1;
        m->l3 = l3;
        m->hlen = hlen;
        m->gso_size = plen;
        m->total = pkts[i].len;
        m->limit = plen < EF_MAX_IP - m->total ? plen : EF_MAX_IP - m->total;
        m->next_seq = udp ? 0 : psh ? CLOSED : (int64_t)(uint32_t)(seq + plen);
        m->sig_a = sig_a;
        m->sig_b = sig_b;
        m->sig_c = sig_c;
        m->opts = opts;
        m->opt_len = opt_len;
        m->key = key;
        m->key_len = key_len;
        m->hash = hash;
        m->udp = (uint8_t)udp;
        m->v6 = (uint8_t)v6;
        st->buckets[slot] = ni; /* replaces an older open merge of the flow, as the dict does */
        st->item[st->nitems++] = ni;
    }
}

size_t ef_coalesce_plan(const ef_span *pkts, size_t n, int merge_udp, void *scratch, ef_coalesce_state *st) {
    uint8_t *mem = scratch;
    size_t out = 0;
    st->nbuckets = 16;
    while (st->nbuckets < 2 * n) st->nbuckets <<= 1;
    st->merges = (ef_merge *)mem;
    mem += n * sizeof(ef_merge);
    st->item = (int32_t *)mem;
    mem += n * sizeof(int32_t);
    st->next_part = (int32_t *)mem;
    mem += n * sizeof(int32_t);
    st->buckets = (int32_t *)mem;
    memset(st->buckets, 0xFF, st->nbuckets * sizeof(int32_t));
    memset(st->next_part, 0xFF, n * sizeof(int32_t));
    st->nitems = st->nmerges = 0;

    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = pkts[i].data;
        uint32_t len = pkts[i].len;
        uint8_t b0 = len > 28 ? p[0] : 0;
        if (b0 == 0x45) {
            uint8_t proto = p[9];
            if (proto == 6 && len > 40) {
                uint16_t total = be16(p + 2), frag = be16(p + 6);
                uint32_t hlen = 20 + (uint32_t)(p[32] >> 4) * 4, seq = be32(p + 24), ack = be32(p + 28);
                uint8_t flags = p[33];
                if (total != len || (frag & 0x3FFF) || len <= hlen || hlen < 40 || (flags != 0x10 && flags != 0x18)) {
                    plain(st, i);
                    continue;
                }
                merge_packet(st, pkts, i, p + 12, 12, 0, 0, 20, hlen, len - hlen, seq, flags == 0x18, ack,
                             (uint32_t)p[1] << 8 | p[8], frag, p + 40, hlen - 40);
                continue;
            }
            if (proto == 17 && merge_udp) {
                uint16_t total = be16(p + 2), frag = be16(p + 6), ulen = be16(p + 24);
                if (total != len || (frag & 0x3FFF) || len <= 28 || ulen != len - 20) {
                    plain(st, i);
                    continue;
                }
                merge_packet(st, pkts, i, p + 12, 12, 1, 0, 20, 28, len - 28, 0, 0, 0, (uint32_t)p[1] << 8 | p[8],
                             frag, p, 0);
                continue;
            }
        } else if (b0 >> 4 == 6 && len > 48) {
            uint8_t nh = p[6];
            if (nh == 6 && len > 60) {
                uint32_t hlen = 40 + (uint32_t)(p[52] >> 4) * 4, seq = be32(p + 44), ack = be32(p + 48);
                uint8_t flags = p[53];
                if ((uint32_t)be16(p + 4) + 40 != len || len <= hlen || hlen < 60 || (flags != 0x10 && flags != 0x18)) {
                    plain(st, i);
                    continue;
                }
                merge_packet(st, pkts, i, p + 8, 36, 0, 1, 40, hlen, len - hlen, seq, flags == 0x18, ack, be32(p),
                             p[7], p + 60, hlen - 60);
                continue;
            }
            if (nh == 17 && merge_udp) {
                if ((uint32_t)be16(p + 4) + 40 != len || len <= 48 || be16(p + 44) != len - 40) {
                    plain(st, i);
                    continue;
                }
                merge_packet(st, pkts, i, p + 8, 36, 1, 1, 40, 48, len - 48, 0, 0, 0, be32(p), p[7], p, 0);
                continue;
            }
        }
        plain(st, i);
    }
    for (uint32_t k = 0; k < st->nitems; k++) {
        int32_t it = st->item[k];
        out += EF_VNET_HDR_LEN + (it < 0 ? pkts[-it - 1].len : st->merges[it].total);
    }
    return out;
}

long ef_coalesce_write(const ef_span *pkts, const ef_coalesce_state *st, uint8_t *out, size_t out_cap, uint32_t *lens,
                       uint32_t *firsts, size_t max_frames) {
    size_t at = 0;
    if (st->nitems > max_frames) return -1;
    for (uint32_t k = 0; k < st->nitems; k++) {
        int32_t it = st->item[k];
        uint8_t *f = out + at;
        if (it < 0 || st->merges[it].nparts == 1) {
            const ef_span *s = &pkts[it < 0 ? -it - 1 : st->merges[it].first];
            if (at + EF_VNET_HDR_LEN + s->len > out_cap) return -1;
            memset(f, 0, EF_VNET_HDR_LEN);
            memcpy(f + EF_VNET_HDR_LEN, s->data, s->len);
            lens[k] = EF_VNET_HDR_LEN + s->len;
            firsts[k] = (uint32_t)(s - pkts);
            at += lens[k];
            continue;
        }
        {
            const ef_merge *m = &st->merges[it];
            const uint8_t *first = pkts[m->first].data;
            uint8_t *h = f + EF_VNET_HDR_LEN, *w;
            uint32_t l4len = m->total - m->l3;
            const uint8_t *src = m->v6 ? first + 8 : first + 12, *dst = m->v6 ? first + 24 : first + 16;
            size_t alen = m->v6 ? 16 : 4;
            if (at + EF_VNET_HDR_LEN + m->total > out_cap) return -1;
            memcpy(h, first, m->hlen);
            if (m->v6) {
                put16(h + 4, m->total - 40);
            } else {
                put16(h + 2, m->total);
                h[10] = h[11] = 0;
                put16(h + 10, (uint16_t)~ef_sum16(h, 20, 0));
            }
            if (m->udp) {
                put16(h + m->l3 + 4, l4len);
                put16(h + m->l3 + 6, pseudo_sum(src, dst, alen, 17, l4len));
            } else {
                if (m->psh) h[m->l3 + 13] |= TCP_PSH;
                put16(h + m->l3 + 16, pseudo_sum(src, dst, alen, 6, l4len));
            }
            f[0] = F_NEEDS_CSUM;
            f[1] = m->udp ? GSO_UDP_L4 : m->v6 ? GSO_TCPV6 : GSO_TCPV4;
            put16le(f + 2, m->hlen);
            put16le(f + 4, m->gso_size);
            put16le(f + 6, m->l3);
            put16le(f + 8, m->udp ? 6 : 16);
            w = h + m->hlen;
            for (int32_t p = m->first; p >= 0; p = st->next_part[p]) {
                uint32_t plen = pkts[p].len - m->hlen;
                memcpy(w, pkts[p].data + m->hlen, plen);
                w += plen;
            }
            lens[k] = EF_VNET_HDR_LEN + m->total;
            firsts[k] = (uint32_t)m->first;
            at += lens[k];
        }
    }
    return (long)st->nitems;
}

/* -- MSS clamping ---------------------------------------------------------------------------------- */
static uint16_t csum_update16(uint16_t old_sum, uint16_t old_word, uint16_t new_word) {
    uint32_t total = (uint32_t)(uint16_t)~old_sum + (uint16_t)~old_word + new_word;
    total = (total & 0xFFFF) + (total >> 16);
    total = (total & 0xFFFF) + (total >> 16);
    return (uint16_t)~total;
}

int ef_clamp_mss(uint8_t *p, size_t n, uint16_t mss4, uint16_t mss6) {
    size_t l4, end, pos;
    uint16_t limit;
    if (n < 40) return 0;
    if ((p[0] >> 4) == 4) {
        if (p[9] != 6 || (p[6] & 0x1F) || p[7]) return 0; /* not TCP, or a non-initial fragment */
        l4 = (size_t)(p[0] & 0x0F) * 4;
        if (l4 < 20) return 0;
        limit = mss4;
    } else if ((p[0] >> 4) == 6) {
        if (p[6] != 6 || n < 60) return 0;
        l4 = 40;
        limit = mss6;
    } else {
        return 0;
    }
    if (n < l4 + 20 || !(p[l4 + 13] & 0x02)) return 0; /* SYN only */
    end = l4 + (size_t)(p[l4 + 12] >> 4) * 4;
    if (end > n) return 0;
    pos = l4 + 20;
    while (pos < end) {
        uint8_t kind = p[pos], size;
        if (kind == 0) return 0;
        if (kind == 1) {
            pos++;
            continue;
        }
        if (pos + 1 >= end) return 0;
        size = p[pos + 1];
        if (size < 2 || pos + size > end) return 0;
        if (kind == 2 && size == 4) {
            uint16_t mss = (uint16_t)(p[pos + 2] << 8 | p[pos + 3]);
            uint16_t sum = (uint16_t)(p[l4 + 16] << 8 | p[l4 + 17]), new_sum;
            if (mss <= limit) return 0;
            if ((pos + 2 - l4) & 1) /* the value straddles two 16-bit words: it adds byte-swapped */
                new_sum = csum_update16(sum, (uint16_t)(mss << 8 | mss >> 8), (uint16_t)(limit << 8 | limit >> 8));
            else
                new_sum = csum_update16(sum, mss, limit);
            p[pos + 2] = (uint8_t)(limit >> 8);
            p[pos + 3] = (uint8_t)limit;
            p[l4 + 16] = (uint8_t)(new_sum >> 8);
            p[l4 + 17] = (uint8_t)new_sum;
            return 1;
        }
        pos += size;
    }
    return 0;
}
