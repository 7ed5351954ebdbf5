/* Nanoseconds per AES-GCM seal and open of one ESP-sized message through the compiled loop's
 * AEAD entry points (ef_aead_seal / ef_aead_open, what ef_esp_seal / ef_esp_open call), for
 * each implementation this CPU runs: the VAES one (espfast_aesgcm.c) and OpenSSL's EVP.
 * Built and run by bench/aesgcm.py. Prints one JSON object per line.
 *
 *   aesgcm_micro SIZE ITERATIONS
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "espfast_core.h"

#define REPEATS 5

static double cpu_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    size_t size = argc > 1 ? (size_t)atol(argv[1]) : 1400, iterations = argc > 2 ? (size_t)atol(argv[2]) : 200000;
    static const int policies[2] = {EF_GCM_AUTO, EF_GCM_OPENSSL};
    uint8_t key[32], salt[4] = {1, 2, 3, 4}, iv[8] = {0}, aad[8] = {0, 0, 0x10, 0, 0, 0, 0, 1};
    uint8_t *body = calloc(size + 16, 1), *ct = calloc(size + 16, 1), *pt = calloc(size + 16, 1);
    if (body == NULL || ct == NULL || pt == NULL || size < 2) return 2;
    for (int i = 0; i < 32; i++) key[i] = (uint8_t)(i * 7 + 1);
    for (int p = 0; p < 2; p++) {
        for (size_t key_len = 16; key_len <= 32; key_len += 16) {
            ef_aead enc, dec;
            double best_seal = 1e30, best_open = 1e30;
            ef_gcm_policy_set(policies[p]);
            if (ef_aead_init(&enc, EF_AEAD_AES_GCM, key, key_len, salt, 1) < 0 ||
                ef_aead_init(&dec, EF_AEAD_AES_GCM, key, key_len, salt, 0) < 0)
                return 1;
            if (p == 0 && enc.gcm == NULL) continue; /* this CPU has only OpenSSL's */
            for (int r = 0; r < REPEATS; r++) {
                double t0 = cpu_ns();
                for (size_t i = 0; i < iterations; i++) {
                    iv[7] = (uint8_t)i;
                    /* in place, the body then a 2-byte ESP trailer, as ef_esp_seal does */
                    if (ef_aead_seal(&enc, iv, aad, 8, ct, size - 2, ct + size - 2, 2, ct, ct + size) != 0) return 1;
                }
                double t1 = cpu_ns();
                if (t1 - t0 < best_seal) best_seal = t1 - t0;
            }
            if (ef_aead_seal(&enc, iv, aad, 8, body, size, body + size, 0, ct, ct + size) != 0) return 1;
            for (int r = 0; r < REPEATS; r++) {
                double t0 = cpu_ns();
                for (size_t i = 0; i < iterations; i++)
                    if (ef_aead_open(&dec, iv, aad, 8, ct, size, ct + size, pt) != 1) return 1;
                double t1 = cpu_ns();
                if (t1 - t0 < best_open) best_open = t1 - t0;
            }
            printf("{\"implementation\": \"%s\", \"key_bits\": %zu, \"size\": %zu, \"seal_ns\": %.1f, \"open_ns\": %.1f}\n",
                   ef_aead_implementation(&enc), key_len * 8, size, best_seal / (double)iterations,
                   best_open / (double)iterations);
            ef_aead_free(&enc);
            ef_aead_free(&dec);
        }
    }
    free(body);
    free(ct);
    free(pt);
    return 0;
}
