/* AES-GCM with VAES + VPCLMULQDQ (see espfast_aesgcm.h).
 *
 * The math (NIST SP 800-38D):
 *   H = E(K, 0^128), J0 = nonce || 0x00000001, counter blocks inc32(J0), inc32(inc32(J0)), ...
 *   C = P xor E(K, counter blocks); S = GHASH_H(A || 0* || C || 0* || [len(A)]64 || [len(C)]64)
 *   tag = E(K, J0) xor S, where GHASH_H(X1..Xm) = X1*H^m xor X2*H^(m-1) xor ... xor Xm*H.
 *
 * GF(2^128) here is GCM's bit order: bit 0 of byte 0 (its most significant bit) is the
 * coefficient of x^0, modulo P = x^128 + x^7 + x^2 + x + 1. Reversing the 16 bytes of a block
 * turns it into a 128-bit integer whose bit 127 is the x^0 coefficient (bit-reflected). The
 * carry-less product of two reflected values is the reflected 255-bit product one position too
 * far right. reduce_exact() (key setup only) shifts it left by one and folds the low 128 bits
 * (the coefficients of x^128..x^255) into the high 128 bits with x^128 = x^7 + x^2 + x + 1 in
 * two shift-and-xor phases (the method of Gueron and Kounavis' Intel carry-less multiplication
 * paper, written out for the reflected layout). The bulk skips the shift: unshifted, the
 * reduction yields a*b*x, so the stored powers of H carry a factor x^-1; and it folds with two
 * carry-less multiplications by the reflected x^-1 constant instead of the shift phases (the
 * same bits, checked bit for bit in the tests against OpenSSL).
 *
 * Aggregated reduction: sixteen (or eight) blocks are multiplied by H^16..H^1 and their
 * 256-bit products summed unreduced (carry-less sums are xors), then reduced once: GHASH's
 * Horner form (((Y xor X1) H xor X2) H ...) rearranged. The 256-bit registers carry two blocks
 * each; each block takes three 64x64 multiplications (Karatsuba).
 *
 * The counter blocks keep their 32-bit counter in native (little-endian) order in the last
 * lane dword, where VPADDD wraps it modulo 2^32 exactly like inc32; a byte shuffle turns it
 * big-endian right before the AES rounds.
 */
#include "espfast_aesgcm.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

/* The vaes and vpclmulqdq targets need GCC 8 or clang 6; older compilers build the stubs below
 * (OpenSSL's EVP runs), not a failed extension. */
#if defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 6) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 8))
#include <cpuid.h>
#include <immintrin.h>

#define GCM_TARGET __attribute__((target("aes,pclmul,ssse3,sse4.1,avx,avx2,vaes,vpclmulqdq")))
#define GCM_INLINE static inline __attribute__((always_inline)) GCM_TARGET

/* CPUID (Intel SDM vol. 2, CPUID): leaf 1 ECX: PCLMULQDQ bit 1, OSXSAVE 27, AVX 28, AES 25;
 * leaf 7.0 EBX: AVX2 bit 5; ECX: VAES bit 9, VPCLMULQDQ bit 10; and XCR0 must show the OS
 * saves the XMM and YMM state (bits 1, 2). Read directly: clang 14's __builtin_cpu_supports
 * does not know "vaes". */
static int cpu_has_vaes_avx2(void) {
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & (1u << 1)) || !(c & (1u << 25)) || !(c & (1u << 27)) || !(c & (1u << 28))) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6u) != 6u) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b & (1u << 5)) && (c & (1u << 9)) && (c & (1u << 10));
}

int ef_gcm_supported(void) {
    static int cached = -1;
    if (cached < 0) cached = cpu_has_vaes_avx2();
    return cached;
}

const char *ef_gcm_name(void) { return "vaes-avx2"; }

/* -- key schedule (FIPS 197 §5.2 via AESKEYGENASSIST) ------------------------------------------ */
GCM_INLINE __m128i key_step(__m128i prev, __m128i assist) {
    /* w[i] = w[i-Nk] xor w[i-1] for the four words, the first one also xor `assist` */
    prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
    prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
    prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
    return _mm_xor_si128(prev, assist);
}

/* 0xff: RotWord(SubWord(last word)) xor rcon; 0xaa: SubWord(last word) (AES-256's odd steps). */
#define KEY_ROT(rk, i, back, rcon)                                                                                     \
    rk[i] = key_step(rk[i - back], _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[i - 1], rcon), 0xff))
#define KEY_SUB(rk, i) rk[i] = key_step(rk[i - 2], _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[i - 1], 0), 0xaa))

static GCM_TARGET void expand_key(const uint8_t *key, size_t key_len, __m128i rk[15]) {
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    if (key_len == 16) {
        KEY_ROT(rk, 1, 1, 0x01);
        KEY_ROT(rk, 2, 1, 0x02);
        KEY_ROT(rk, 3, 1, 0x04);
        KEY_ROT(rk, 4, 1, 0x08);
        KEY_ROT(rk, 5, 1, 0x10);
        KEY_ROT(rk, 6, 1, 0x20);
        KEY_ROT(rk, 7, 1, 0x40);
        KEY_ROT(rk, 8, 1, 0x80);
        KEY_ROT(rk, 9, 1, 0x1b);
        KEY_ROT(rk, 10, 1, 0x36);
        return;
    }
    rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
    KEY_ROT(rk, 2, 2, 0x01);
    KEY_SUB(rk, 3);
    KEY_ROT(rk, 4, 2, 0x02);
    KEY_SUB(rk, 5);
    KEY_ROT(rk, 6, 2, 0x04);
    KEY_SUB(rk, 7);
    KEY_ROT(rk, 8, 2, 0x08);
    KEY_SUB(rk, 9);
    KEY_ROT(rk, 10, 2, 0x10);
    KEY_SUB(rk, 11);
    KEY_ROT(rk, 12, 2, 0x20);
    KEY_SUB(rk, 13);
    KEY_ROT(rk, 14, 2, 0x40);
}

GCM_INLINE __m128i round_key(const ef_gcm_key *k, int r) { return _mm_load_si128((const __m128i *)k->round_keys[r]); }

GCM_INLINE __m128i aes_block(const ef_gcm_key *k, __m128i b) {
    b = _mm_xor_si128(b, round_key(k, 0));
    for (int r = 1; r < k->rounds; r++) b = _mm_aesenc_si128(b, round_key(k, r));
    return _mm_aesenclast_si128(b, round_key(k, k->rounds));
}

/* -- GF(2^128) ----------------------------------------------------------------------------------- */
GCM_INLINE __m128i reverse_mask(void) { return _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
GCM_INLINE __m256i reverse_mask2(void) { return _mm256_broadcastsi128_si256(reverse_mask()); }

/* Add a*b's four 64x64 partial products into (lo, mid, hi): a*b = hi<<128 ^ mid<<64 ^ lo. */
GCM_INLINE void mul_add(__m128i a, __m128i b, __m128i *lo, __m128i *mid, __m128i *hi) {
    *lo = _mm_xor_si128(*lo, _mm_clmulepi64_si128(a, b, 0x00));
    *hi = _mm_xor_si128(*hi, _mm_clmulepi64_si128(a, b, 0x11));
    *mid = _mm_xor_si128(*mid, _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x01), _mm_clmulepi64_si128(a, b, 0x10)));
}

/* The reflected field element of the unreduced product (lo, mid, hi): a*b exactly. Used for
 * the key setup only; the bulk uses reduce() on powers of H that carry a factor x^-1. */
GCM_INLINE __m128i reduce_exact(__m128i lo, __m128i mid, __m128i hi) {
    __m128i carry_lo, carry_hi, across, a, b;
    lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
    hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
    /* (hi:lo) <<= 1 as one 256-bit value */
    carry_lo = _mm_srli_epi32(lo, 31);
    carry_hi = _mm_srli_epi32(hi, 31);
    across = _mm_srli_si128(carry_lo, 12);
    lo = _mm_or_si128(_mm_slli_epi32(lo, 1), _mm_slli_si128(carry_lo, 4));
    hi = _mm_or_si128(_mm_or_si128(_mm_slli_epi32(hi, 1), _mm_slli_si128(carry_hi, 4)), across);
    /* phase 1: the x^7 + x^2 + x terms of the low words that land back inside `lo` */
    a = _mm_xor_si128(_mm_xor_si128(_mm_slli_epi32(lo, 31), _mm_slli_epi32(lo, 30)), _mm_slli_epi32(lo, 25));
    b = _mm_srli_si128(a, 4);
    lo = _mm_xor_si128(lo, _mm_slli_si128(a, 12));
    /* phase 2: fold everything into the high half */
    a = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi32(lo, 1), _mm_srli_epi32(lo, 2)), _mm_srli_epi32(lo, 7));
    a = _mm_xor_si128(a, b);
    return _mm_xor_si128(hi, _mm_xor_si128(lo, a));
}

GCM_INLINE __m128i field_mul_exact(__m128i a, __m128i b) {
    __m128i lo = _mm_setzero_si128(), mid = lo, hi = lo;
    mul_add(a, b, &lo, &mid, &hi);
    return reduce_exact(lo, mid, hi);
}

/* x^-1 = x^127 + x^6 + x + 1 (x * x^-1 = x^128 + x^7 + x^2 + x = 1 mod P), reflected. */
GCM_INLINE __m128i x_inverse(void) { return _mm_set_epi64x((long long)0xC200000000000000ull, 1); }

/* The bulk reduction. Without the shift left by one, reducing the raw carry-less product of a
 * and b yields a*b*x; the stored powers of H carry a factor x^-1 to cancel it. The fold of the
 * low 128 bits is then two carry-less multiplications by the reflected x^-1 constant's high
 * half (each moves 64 bits up with x^128 = x^7 + x^2 + x + 1 applied): the same result as
 * reduce_exact's shift-and-xor phases without the shift (checked by the tests, bit for bit
 * against OpenSSL), with a shorter dependency chain. */
GCM_INLINE __m128i reduce(__m128i lo, __m128i mid, __m128i hi) {
    const __m128i poly = x_inverse();
    __m128i t;
    lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
    hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
    t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), t);
    t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), t);
    return _mm_xor_si128(hi, lo);
}

GCM_INLINE __m128i field_mul(__m128i a, __m128i b) {
    __m128i lo = _mm_setzero_si128(), mid = lo, hi = lo;
    mul_add(a, b, &lo, &mid, &hi);
    return reduce(lo, mid, hi);
}

GCM_INLINE __m128i lanes_xor(__m256i v) {
    return _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

/* Add the products of four registers of two byte-reversed blocks with the power pairs
 * h_pairs[base .. base + 3] into (lo, mid, hi), Karatsuba style: three multiplications per
 * block, a*b = hi<<128 ^ mid<<64 ^ lo with mid = (a1^a0)(b1^b0) ^ hi ^ lo, where (b1^b0) of
 * each power is precomputed (h_folds) and the "^ hi ^ lo" is left to the caller, once for the
 * sum. */
#define KARATSUBA_PAIR(x, j)                                                                                           \
    do {                                                                                                               \
        __m256i h_ = _mm256_load_si256((const __m256i *)k->h_pairs[j]);                                               \
        __m256i hk_ = _mm256_load_si256((const __m256i *)k->h_folds[j]);                                              \
        __m256i xk_ = _mm256_xor_si256(x, _mm256_shuffle_epi32(x, 0x4e));                                             \
        *lo = _mm256_xor_si256(*lo, _mm256_clmulepi64_epi128(x, h_, 0x00));                                           \
        *hi = _mm256_xor_si256(*hi, _mm256_clmulepi64_epi128(x, h_, 0x11));                                           \
        *mid = _mm256_xor_si256(*mid, _mm256_clmulepi64_epi128(xk_, hk_, 0x00));                                      \
    } while (0)

GCM_INLINE void karatsuba4(const ef_gcm_key *k, int base, __m256i x0, __m256i x1, __m256i x2, __m256i x3, __m256i *lo,
                           __m256i *mid, __m256i *hi) {
    KARATSUBA_PAIR(x0, base);
    KARATSUBA_PAIR(x1, base + 1);
    KARATSUBA_PAIR(x2, base + 2);
    KARATSUBA_PAIR(x3, base + 3);
}

GCM_INLINE __m128i karatsuba_reduce(__m256i lo, __m256i mid, __m256i hi) {
    __m128i l = lanes_xor(lo), h = lanes_xor(hi);
    return reduce(l, _mm_xor_si128(lanes_xor(mid), _mm_xor_si128(l, h)), h);
}

/* Y' = (Y xor X1) H^8 xor X2 H^7 xor ... xor X8 H: eight blocks, one reduction. */
GCM_INLINE __m128i ghash8(const ef_gcm_key *k, __m128i y, __m256i x0, __m256i x1, __m256i x2, __m256i x3) {
    __m256i lo = _mm256_setzero_si256(), mid = lo, hi = lo;
    x0 = _mm256_xor_si256(x0, _mm256_inserti128_si256(_mm256_setzero_si256(), y, 0));
    karatsuba4(k, EF_GCM_POWERS / 2 - 4, x0, x1, x2, x3, &lo, &mid, &hi);
    return karatsuba_reduce(lo, mid, hi);
}

/* The same over sixteen blocks (H^16 .. H), one reduction: half the reductions on GHASH's
 * serial chain per byte. */
GCM_INLINE __m128i ghash16(const ef_gcm_key *k, __m128i y, __m256i x0, __m256i x1, __m256i x2, __m256i x3, __m256i x4,
                           __m256i x5, __m256i x6, __m256i x7) {
    __m256i lo = _mm256_setzero_si256(), mid = lo, hi = lo;
    karatsuba4(k, 4, x4, x5, x6, x7, &lo, &mid, &hi); /* independent of y: first */
    x0 = _mm256_xor_si256(x0, _mm256_inserti128_si256(_mm256_setzero_si256(), y, 0));
    karatsuba4(k, 0, x0, x1, x2, x3, &lo, &mid, &hi);
    return karatsuba_reduce(lo, mid, hi);
}

/* Y after absorbing n bytes (a multiple of 16) at p; Y is reflected. */
static GCM_TARGET __m128i ghash_blocks(const ef_gcm_key *k, __m128i y, const uint8_t *p, size_t n) {
    const __m128i rev = reverse_mask();
    const __m256i rev2 = reverse_mask2();
#define LOAD_REVERSED(at) _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(at)), rev2)
    while (n >= 256) {
        y = ghash16(k, y, LOAD_REVERSED(p), LOAD_REVERSED(p + 32), LOAD_REVERSED(p + 64), LOAD_REVERSED(p + 96),
                    LOAD_REVERSED(p + 128), LOAD_REVERSED(p + 160), LOAD_REVERSED(p + 192), LOAD_REVERSED(p + 224));
        p += 256;
        n -= 256;
    }
    if (n >= 128) {
        y = ghash8(k, y, LOAD_REVERSED(p), LOAD_REVERSED(p + 32), LOAD_REVERSED(p + 64), LOAD_REVERSED(p + 96));
        p += 128;
        n -= 128;
    }
#undef LOAD_REVERSED
    if (n) {
        size_t m = n / 16;
        __m128i lo = _mm_setzero_si128(), mid = lo, hi = lo;
        for (size_t i = 0; i < m; i++) {
            __m128i x = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * i)), rev);
            if (i == 0) x = _mm_xor_si128(x, y);
            mul_add(x, _mm_load_si128((const __m128i *)k->h_powers[m - 1 - i]), &lo, &mid, &hi);
        }
        y = reduce(lo, mid, hi);
    }
    return y;
}

/* Y after absorbing the AAD zero-padded to a block boundary (ESP's 8 or 12 bytes: one load). */
static GCM_TARGET __m128i ghash_aad(const ef_gcm_key *k, const uint8_t *p, size_t n) {
    __m128i x;
    uint32_t word;
    size_t full = n & ~(size_t)15;
    if (n == 8 || n == 12) {
        x = _mm_loadl_epi64((const __m128i *)p);
        if (n == 12) {
            memcpy(&word, p + 8, 4);
            x = _mm_insert_epi32(x, (int)word, 2);
        }
        return field_mul(_mm_shuffle_epi8(x, reverse_mask()), _mm_load_si128((const __m128i *)k->h_powers[0]));
    }
    x = ghash_blocks(k, _mm_setzero_si128(), p, full);
    if (n > full) {
        uint8_t last[16] = {0};
        memcpy(last, p + full, n - full);
        x = ghash_blocks(k, x, last, 16);
    }
    return x;
}

/* GHASH's end: absorb the last n bytes of the ciphertext (zero-padded) and the length block
 * into y, the blocks after the last whole 128 bytes in one reduction; S in GCM byte order
 * (the tag before the E(K, J0) mask). */
static GCM_TARGET __m128i ghash_finish(const ef_gcm_key *k, __m128i y, const uint8_t *ct, size_t n, size_t aad_len,
                                      size_t len) {
    const __m128i rev = reverse_mask();
    size_t bulk = n & ~(size_t)127, full, m, i;
    __m128i lo = _mm_setzero_si128(), mid = lo, hi = lo, x;
    y = ghash_blocks(k, y, ct, bulk);
    ct += bulk;
    n -= bulk;
    full = n / 16;
    m = full + (n % 16 != 0) + 1; /* <= 9 blocks: whole, partial, lengths */
    for (i = 0; i < full; i++) {
        x = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(ct + 16 * i)), rev);
        if (i == 0) x = _mm_xor_si128(x, y);
        mul_add(x, _mm_load_si128((const __m128i *)k->h_powers[m - 1 - i]), &lo, &mid, &hi);
    }
    if (n % 16) {
        uint8_t last[16] = {0};
        memcpy(last, ct + 16 * full, n % 16);
        x = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)last), rev);
        if (i == 0) x = _mm_xor_si128(x, y);
        mul_add(x, _mm_load_si128((const __m128i *)k->h_powers[m - 1 - i]), &lo, &mid, &hi);
        i++;
    }
    /* the length block [len(A)]64 || [len(C)]64, already in the reflected layout */
    x = _mm_set_epi64x((long long)((uint64_t)aad_len * 8), (long long)((uint64_t)len * 8));
    if (i == 0) x = _mm_xor_si128(x, y);
    mul_add(x, _mm_load_si128((const __m128i *)k->h_powers[0]), &lo, &mid, &hi);
    return _mm_shuffle_epi8(reduce(lo, mid, hi), rev); /* back to GCM byte order */
}

/* nonce || the 32-bit word `last` (as stored: pass a big-endian value for a GCM block). */
GCM_INLINE __m128i nonce_block(const uint8_t nonce[12], uint32_t last) {
    uint32_t word;
    memcpy(&word, nonce + 8, 4);
    return _mm_insert_epi32(_mm_insert_epi32(_mm_loadl_epi64((const __m128i *)nonce), (int)word, 2), (int)last, 3);
}

/* -- counter mode ------------------------------------------------------------------------------- */
GCM_INLINE __m128i counter_mask(void) { /* bytes 12..15 reversed: the native counter goes big-endian */
    return _mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
}

/* The two counter blocks in `*next` (lanes ctr, ctr + 1) in GCM byte order; `*next` moves on
 * by two. */
GCM_INLINE __m256i take_counters(__m256i *next, __m256i mask) {
    __m256i blocks = _mm256_shuffle_epi8(*next, mask);
    *next = _mm256_add_epi32(*next, _mm256_set_epi32(2, 0, 0, 0, 2, 0, 0, 0));
    return blocks;
}

GCM_INLINE __m256i round_key2(const ef_gcm_key *k, int r) {
    return _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)k->round_keys[r]));
}

/* Four registers of two blocks each through the rounds (written out: GCC -O2 keeps an array
 * of vectors in memory and does not unroll the loop over it). */
#define AES_X4(k, b0, b1, b2, b3)                                                                                      \
    do {                                                                                                               \
        __m256i key_ = round_key2(k, 0);                                                                               \
        b0 = _mm256_xor_si256(b0, key_);                                                                               \
        b1 = _mm256_xor_si256(b1, key_);                                                                               \
        b2 = _mm256_xor_si256(b2, key_);                                                                               \
        b3 = _mm256_xor_si256(b3, key_);                                                                               \
        for (int r_ = 1; r_ < (k)->rounds; r_++) {                                                                     \
            key_ = round_key2(k, r_);                                                                                  \
            b0 = _mm256_aesenc_epi128(b0, key_);                                                                       \
            b1 = _mm256_aesenc_epi128(b1, key_);                                                                       \
            b2 = _mm256_aesenc_epi128(b2, key_);                                                                       \
            b3 = _mm256_aesenc_epi128(b3, key_);                                                                       \
        }                                                                                                              \
        key_ = round_key2(k, (k)->rounds);                                                                             \
        b0 = _mm256_aesenclast_epi128(b0, key_);                                                                       \
        b1 = _mm256_aesenclast_epi128(b1, key_);                                                                       \
        b2 = _mm256_aesenclast_epi128(b2, key_);                                                                       \
        b3 = _mm256_aesenclast_epi128(b3, key_);                                                                       \
    } while (0)

GCM_INLINE __m256i aes_x1(const ef_gcm_key *k, __m256i b) {
    b = _mm256_xor_si256(b, round_key2(k, 0));
    for (int r = 1; r < k->rounds; r++) b = _mm256_aesenc_epi128(b, round_key2(k, r));
    return _mm256_aesenclast_epi128(b, round_key2(k, k->rounds));
}

/* out = in xor keystream from counter `ctr` on (n bytes; a partial last block uses the start
 * of its keystream block). Returns the next counter. in == out is fine. */
static GCM_TARGET uint32_t ctr_crypt(const ef_gcm_key *k, const uint8_t nonce[12], uint32_t ctr, const uint8_t *in,
                                     uint8_t *out, size_t n) {
    const __m256i mask = _mm256_broadcastsi128_si256(counter_mask());
    __m256i next;
    uint32_t blocks = (uint32_t)((n + 15) / 16);
    if (n == 0) return ctr;
    next = _mm256_broadcastsi128_si256(nonce_block(nonce, ctr));
    next = _mm256_add_epi32(next, _mm256_set_epi32(1, 0, 0, 0, 0, 0, 0, 0)); /* lanes: ctr, ctr + 1 */
    while (n >= 128) {
        __m256i b0 = take_counters(&next, mask), b1 = take_counters(&next, mask), b2 = take_counters(&next, mask),
                b3 = take_counters(&next, mask);
        AES_X4(k, b0, b1, b2, b3);
        b0 = _mm256_xor_si256(b0, _mm256_loadu_si256((const __m256i *)in));
        b1 = _mm256_xor_si256(b1, _mm256_loadu_si256((const __m256i *)(in + 32)));
        b2 = _mm256_xor_si256(b2, _mm256_loadu_si256((const __m256i *)(in + 64)));
        b3 = _mm256_xor_si256(b3, _mm256_loadu_si256((const __m256i *)(in + 96)));
        _mm256_storeu_si256((__m256i *)out, b0);
        _mm256_storeu_si256((__m256i *)(out + 32), b1);
        _mm256_storeu_si256((__m256i *)(out + 64), b2);
        _mm256_storeu_si256((__m256i *)(out + 96), b3);
        in += 128;
        out += 128;
        n -= 128;
    }
    if (n) { /* the last 1..127 bytes: their keystream into a buffer, then xor */
        uint8_t ks[128];
        size_t i = 0, full = n & ~(size_t)15;
        if (n <= 32) {
            _mm256_storeu_si256((__m256i *)ks, aes_x1(k, take_counters(&next, mask)));
        } else {
            __m256i b0 = take_counters(&next, mask), b1 = take_counters(&next, mask),
                    b2 = take_counters(&next, mask), b3 = take_counters(&next, mask);
            AES_X4(k, b0, b1, b2, b3);
            _mm256_storeu_si256((__m256i *)ks, b0);
            _mm256_storeu_si256((__m256i *)(ks + 32), b1);
            _mm256_storeu_si256((__m256i *)(ks + 64), b2);
            _mm256_storeu_si256((__m256i *)(ks + 96), b3);
        }
        for (; i < full; i += 16)
            _mm_storeu_si128((__m128i *)(out + i), _mm_xor_si128(_mm_loadu_si128((const __m128i *)(in + i)),
                                                                 _mm_loadu_si128((const __m128i *)(ks + i))));
        for (; i < n; i++) out[i] = (uint8_t)(in[i] ^ ks[i]);
        OPENSSL_cleanse(ks, sizeof(ks)); /* keystream */
    }
    return ctr + blocks;
}

/* Counter mode and GHASH together over `chunks` 256-byte chunks from counter `ctr`: GHASH
 * absorbs the output when sealing, the input when opening (before it is overwritten, so
 * in == out works). One pass; the AES rounds of one chunk overlap the multiplications of the
 * previous one in the out-of-order core. Returns y. */
static GCM_TARGET __m128i ctr_ghash(const ef_gcm_key *k, const uint8_t nonce[12], uint32_t ctr, const uint8_t *in,
                                   uint8_t *out, size_t chunks, __m128i y, int seal) {
    const __m256i mask = _mm256_broadcastsi128_si256(counter_mask()), rev2 = reverse_mask2();
    __m256i next = _mm256_broadcastsi128_si256(nonce_block(nonce, ctr));
    next = _mm256_add_epi32(next, _mm256_set_epi32(1, 0, 0, 0, 0, 0, 0, 0));
    for (; chunks; chunks--) {
        __m256i b0 = take_counters(&next, mask), b1 = take_counters(&next, mask), b2 = take_counters(&next, mask),
                b3 = take_counters(&next, mask), b4 = take_counters(&next, mask), b5 = take_counters(&next, mask),
                b6 = take_counters(&next, mask), b7 = take_counters(&next, mask);
        __m256i c0, c1, c2, c3, c4, c5, c6, c7;
        c0 = _mm256_loadu_si256((const __m256i *)in);
        c1 = _mm256_loadu_si256((const __m256i *)(in + 32));
        c2 = _mm256_loadu_si256((const __m256i *)(in + 64));
        c3 = _mm256_loadu_si256((const __m256i *)(in + 96));
        c4 = _mm256_loadu_si256((const __m256i *)(in + 128));
        c5 = _mm256_loadu_si256((const __m256i *)(in + 160));
        c6 = _mm256_loadu_si256((const __m256i *)(in + 192));
        c7 = _mm256_loadu_si256((const __m256i *)(in + 224));
        AES_X4(k, b0, b1, b2, b3);
        AES_X4(k, b4, b5, b6, b7);
        b0 = _mm256_xor_si256(b0, c0);
        b1 = _mm256_xor_si256(b1, c1);
        b2 = _mm256_xor_si256(b2, c2);
        b3 = _mm256_xor_si256(b3, c3);
        b4 = _mm256_xor_si256(b4, c4);
        b5 = _mm256_xor_si256(b5, c5);
        b6 = _mm256_xor_si256(b6, c6);
        b7 = _mm256_xor_si256(b7, c7);
        _mm256_storeu_si256((__m256i *)out, b0);
        _mm256_storeu_si256((__m256i *)(out + 32), b1);
        _mm256_storeu_si256((__m256i *)(out + 64), b2);
        _mm256_storeu_si256((__m256i *)(out + 96), b3);
        _mm256_storeu_si256((__m256i *)(out + 128), b4);
        _mm256_storeu_si256((__m256i *)(out + 160), b5);
        _mm256_storeu_si256((__m256i *)(out + 192), b6);
        _mm256_storeu_si256((__m256i *)(out + 224), b7);
        if (seal) {
            c0 = b0;
            c1 = b1;
            c2 = b2;
            c3 = b3;
            c4 = b4;
            c5 = b5;
            c6 = b6;
            c7 = b7;
        }
        y = ghash16(k, y, _mm256_shuffle_epi8(c0, rev2), _mm256_shuffle_epi8(c1, rev2), _mm256_shuffle_epi8(c2, rev2),
                    _mm256_shuffle_epi8(c3, rev2), _mm256_shuffle_epi8(c4, rev2), _mm256_shuffle_epi8(c5, rev2),
                    _mm256_shuffle_epi8(c6, rev2), _mm256_shuffle_epi8(c7, rev2));
        in += 256;
        out += 256;
    }
    return y;
}

/* E(K, J0), J0 = nonce || 1: the tag's mask (computed first: it overlaps the bulk). */
GCM_INLINE __m128i tag_mask(const ef_gcm_key *k, const uint8_t nonce[12]) {
    return aes_block(k, nonce_block(nonce, 0x01000000u)); /* bytes 00 00 00 01 */
}

GCM_TARGET void ef_gcm_seal2(const ef_gcm_key *k, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                             const uint8_t *in1, size_t len1, const uint8_t *in2, size_t len2, uint8_t *out,
                             uint8_t tag[16]) {
    size_t chunks = len1 / 256, done = chunks * 256, full1 = len1 & ~(size_t)15, rest = len1 - full1, joined = 0;
    uint32_t ctr = 2 + 16 * (uint32_t)chunks;
    __m128i mask = tag_mask(k, nonce), y = ghash_aad(k, aad, aad_len);
    y = ctr_ghash(k, nonce, 2, in1, out, chunks, y, 1);
    ctr = ctr_crypt(k, nonce, ctr, in1 + done, out + done, full1 - done);
    if (rest) { /* the block that straddles the two inputs */
        uint8_t block[16];
        joined = 16 - rest < len2 ? 16 - rest : len2;
        memcpy(block, in1 + full1, rest);
        if (joined) memcpy(block + rest, in2, joined);
        ctr = ctr_crypt(k, nonce, ctr, block, block, rest + joined);
        memcpy(out + full1, block, rest);
        if (joined) memcpy(out + len1, block + rest, joined);
        OPENSSL_cleanse(block, sizeof(block)); /* plaintext */
    }
    if (len2 > joined) ctr_crypt(k, nonce, ctr, in2 + joined, out + len1 + joined, len2 - joined);
    y = ghash_finish(k, y, out + done, len1 + len2 - done, aad_len, len1 + len2);
    _mm_storeu_si128((__m128i *)tag, _mm_xor_si128(mask, y));
}

GCM_TARGET int ef_gcm_open(const ef_gcm_key *k, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                           const uint8_t *ct, size_t len, const uint8_t tag[16], uint8_t *out) {
    uint8_t expected[16];
    size_t chunks = len / 256, done = chunks * 256;
    __m128i mask = tag_mask(k, nonce), y = ghash_aad(k, aad, aad_len);
    y = ctr_ghash(k, nonce, 2, ct, out, chunks, y, 0);
    y = ghash_finish(k, y, ct + done, len - done, aad_len, len);
    _mm_storeu_si128((__m128i *)expected, _mm_xor_si128(mask, y));
    if (CRYPTO_memcmp(expected, tag, 16) != 0) {
        OPENSSL_cleanse(out, done); /* no unauthenticated plaintext stays behind */
        OPENSSL_cleanse(expected, sizeof(expected)); /* the right tag for this ciphertext */
        return 0;
    }
    OPENSSL_cleanse(expected, sizeof(expected));
    ctr_crypt(k, nonce, 2 + 16 * (uint32_t)chunks, ct + done, out + done, len - done);
    return 1;
}

static GCM_TARGET void derive(ef_gcm_key *k, const uint8_t *key, size_t key_len) {
    __m128i rk[15], h, power;
    expand_key(key, key_len, rk);
    k->rounds = key_len == 16 ? 10 : 14;
    for (int r = 0; r <= k->rounds; r++) _mm_store_si128((__m128i *)k->round_keys[r], rk[r]);
    h = _mm_shuffle_epi8(aes_block(k, _mm_setzero_si128()), reverse_mask());
    h = field_mul_exact(h, x_inverse()); /* H x^-1: see reduce() */
    power = h;
    for (int i = 0; i <= EF_GCM_POWERS; i++) {
        _mm_store_si128((__m128i *)k->h_powers[i], power);
        power = field_mul(power, h);
    }
    for (int j = 0; j < EF_GCM_POWERS / 2; j++) {
        memcpy(k->h_pairs[j], k->h_powers[EF_GCM_POWERS - 1 - 2 * j], 16);
        memcpy(k->h_pairs[j] + 16, k->h_powers[EF_GCM_POWERS - 2 - 2 * j], 16);
        for (int i = 0; i < 8; i++) {
            k->h_folds[j][i] = k->h_pairs[j][i] ^ k->h_pairs[j][8 + i];
            k->h_folds[j][16 + i] = k->h_pairs[j][16 + i] ^ k->h_pairs[j][24 + i];
        }
    }
    OPENSSL_cleanse(rk, sizeof(rk));
}

ef_gcm_key *ef_gcm_new(const uint8_t *key, size_t key_len) {
    void *memory = NULL;
    if ((key_len != 16 && key_len != 32) || !ef_gcm_supported()) return NULL;
    if (posix_memalign(&memory, 32, sizeof(ef_gcm_key)) != 0) return NULL;
    memset(memory, 0, sizeof(ef_gcm_key));
    derive((ef_gcm_key *)memory, key, key_len);
    return (ef_gcm_key *)memory;
}

#else /* not x86-64: always the OpenSSL path */

int ef_gcm_supported(void) { return 0; }
const char *ef_gcm_name(void) { return "none"; }
ef_gcm_key *ef_gcm_new(const uint8_t *key, size_t key_len) { return NULL; }
void ef_gcm_seal2(const ef_gcm_key *k, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                  const uint8_t *in1, size_t len1, const uint8_t *in2, size_t len2, uint8_t *out, uint8_t tag[16]) {}
int ef_gcm_open(const ef_gcm_key *k, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len, const uint8_t *ct,
                size_t len, const uint8_t tag[16], uint8_t *out) {
    return 0;
}

#endif

void ef_gcm_free(ef_gcm_key *k) {
    if (k == NULL) return;
    OPENSSL_cleanse(k, sizeof(*k));
    free(k);
}
