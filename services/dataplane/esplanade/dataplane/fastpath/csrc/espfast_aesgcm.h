/* AES-GCM (NIST SP 800-38D) with a 96-bit nonce and a 128-bit tag, for 128- and 256-bit keys,
 * on x86-64 CPUs with AES-NI, PCLMULQDQ, AVX2, VAES and VPCLMULQDQ: the counter mode runs two
 * blocks per 256-bit VAES instruction, GHASH multiplies two blocks per VPCLMULQDQ over
 * precomputed powers of H with one reduction per eight blocks. No table lookups on secret
 * data; the tag is compared in constant time.
 *
 * The rest of the extension is compiled for baseline x86-64 (or another architecture): the
 * instructions are enabled per function, and ef_gcm_supported() says at run time whether this
 * CPU has them. Off x86-64 the module compiles to stubs that say "not supported".
 *
 * ESP (RFC 4106) uses it as nonce = salt (4) || IV (8), AAD = SPI || sequence (8 or 12 bytes).
 */
#ifndef ESPFAST_AESGCM_H
#define ESPFAST_AESGCM_H

#include <stddef.h>
#include <stdint.h>

#define EF_GCM_POWERS 16 /* blocks per GHASH reduction */

/* The expanded key: round keys, H^1..H^17 in GHASH's byte-reversed form, and H^16..H^1 in the
 * pairs the 256-bit loop loads. Allocate with ef_gcm_new (32-byte aligned). */
typedef struct {
    uint8_t h_pairs[EF_GCM_POWERS / 2][32]; /* [j] = (H^(16-2j) low lane, H^(15-2j) high lane); 32-aligned */
    uint8_t h_folds[EF_GCM_POWERS / 2][32]; /* the same, each lane's low 64 bits = its two halves xored */
    uint8_t round_keys[15][16];
    uint8_t h_powers[EF_GCM_POWERS + 1][16]; /* [i] = H^(i+1) (times x^-1, see the .c) */
    int rounds;                          /* 10 or 14 */
} __attribute__((aligned(32))) ef_gcm_key;

/* 1 if this CPU runs this implementation (checked once). */
int ef_gcm_supported(void);
/* The implementation's name for diagnostics ("vaes-avx2"). */
const char *ef_gcm_name(void);

/* A keyed context (16- or 32-byte key), or NULL (unsupported CPU or key length, no memory). */
ef_gcm_key *ef_gcm_new(const uint8_t *key, size_t key_len);
/* Wipe the round keys and the powers of H, then free. NULL is fine. */
void ef_gcm_free(ef_gcm_key *k);

/* Encrypt in1 (len1 bytes) then in2 (len2 bytes) into out (len1 + len2 bytes, contiguous) and
 * write the 16-byte tag. Either input may be the same memory as its place in out (in place);
 * otherwise inputs and output must not overlap. */
void ef_gcm_seal2(const ef_gcm_key *k, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                  const uint8_t *in1, size_t len1, const uint8_t *in2, size_t len2, uint8_t *out, uint8_t tag[16]);

/* Decrypt ct into out (ct == out is fine) and check the tag over aad and ct: 1 if it verifies.
 * On a mismatch return 0, with out's first len rounded down to 256 bytes wiped (the fused pass
 * decrypts those before the tag is known) and the rest untouched: in place, a failed open
 * destroys that part of the ciphertext. No unauthenticated plaintext is left in out. */
int ef_gcm_open(const ef_gcm_key *k, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len, const uint8_t *ct,
                size_t len, const uint8_t tag[16], uint8_t *out);

#endif
