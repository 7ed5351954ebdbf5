/* The compiled ESP hot loop: pure C, no Python. The CPython binding (espfast_module.c) and
 * the libFuzzer harnesses (tests/dataplane/fastpath/fuzz/) both link this.
 *
 * Every function here mirrors one piece of the pure-Python engine exactly; the Python module
 * named in each comment is the reference, and tests/dataplane/fastpath/ checks the two
 * against each other byte for byte. Every length read from a packet is checked against the
 * buffer it came from before it is used. Nothing here allocates per packet.
 */
#ifndef ESPFAST_CORE_H
#define ESPFAST_CORE_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "espfast_aesgcm.h"

/* Why a packet was dropped: the order of esplanade.dataplane.esp.counters.DropReason. */
enum ef_status {
    EF_OK = 0,
    EF_REPLAY,
    EF_ICV_FAILURE,
    EF_UNKNOWN_SPI,
    EF_POLICY_MISMATCH,
    EF_MALFORMED,
    EF_LIFETIME,
    EF_DUMMY,
    EF_SEQUENCE_EXHAUSTED,
    EF_SEQUENCE_UNRESERVED,
    EF_NREASONS,
    EF_CRYPTO_ERROR = -1 /* an EVP call failed (not a property of the packet) */
};

#define EF_ESP_HEADER 8
#define EF_AEAD_IV 8
#define EF_AEAD_ICV 16
#define EF_AEAD_OVERHEAD (EF_ESP_HEADER + EF_AEAD_IV + EF_AEAD_ICV) /* 32 */
#define EF_AEAD_ALIGN 4
#define EF_MAX_IP 0xFFFF

/* -- AEAD (RFC 4106 AES-GCM-16, RFC 7634 ChaCha20-Poly1305) ------------------------------- */
enum ef_aead_kind { EF_AEAD_AES_GCM = 1, EF_AEAD_CHACHA20_POLY1305 = 2 };

typedef struct {
    EVP_CIPHER_CTX *ctx; /* keyed once; every packet only sets the nonce (NULL when gcm is set) */
    ef_gcm_key *gcm;     /* AES-GCM-128/256 on a CPU with VAES + VPCLMULQDQ (espfast_aesgcm.h) */
    uint8_t salt[4];
    int encrypt;
    int kind; /* ef_aead_kind */
} ef_aead;

/* Which AES-GCM implementation new AEAD contexts take: EF_GCM_AUTO (the VAES one when the CPU
 * has it, else OpenSSL) or EF_GCM_OPENSSL (always EVP). The initial value comes from the
 * environment variable ESPLANADE_ESP_AESGCM ("openssl" or "auto", read once); contexts already
 * keyed keep theirs. */
enum ef_gcm_policy { EF_GCM_AUTO = 0, EF_GCM_OPENSSL = 1 };
int ef_gcm_policy_get(void);
void ef_gcm_policy_set(int policy);

/* 0 on success, -1 if OpenSSL refused (unknown kind, wrong key length, no memory). */
int ef_aead_init(ef_aead *aead, int kind, const uint8_t *key, size_t key_len, const uint8_t salt[4], int encrypt);
void ef_aead_free(ef_aead *aead);
/* "vaes-avx2" or "openssl" for a keyed context, NULL before. Never anything about the key. */
const char *ef_aead_implementation(const ef_aead *aead);

/* One RFC 4106 / 7634 message, nonce = salt || iv: encrypt `body` (size bytes; may be `ct`
 * itself) then `trailer` (tail bytes; may be ct + size itself) into ct (contiguous) and the
 * 16-byte tag. 0, or -1 (EVP failure, wrong direction, size over INT32_MAX). */
int ef_aead_seal(ef_aead *a, const uint8_t iv[8], const uint8_t *aad, int aad_len, const uint8_t *body, size_t size,
                 const uint8_t *trailer, size_t tail, uint8_t *ct, uint8_t tag[EF_AEAD_ICV]);
/* 1: verified, plaintext in out (out may be ct); 0: ICV failure (whatever the open wrote to
 * out is wiped: no unauthenticated plaintext, and in place part of ct is gone); -1: EVP error. */
int ef_aead_open(ef_aead *a, const uint8_t iv[8], const uint8_t *aad, int aad_len, const uint8_t *ct, size_t ct_len,
                 const uint8_t *tag, uint8_t *out);

/* -- anti-replay window (replay.py: RFC 4303 §3.4.3 + RFC 6479 ring of 64-bit words) ------- */
typedef struct {
    uint64_t top;
    uint64_t *blocks; /* nblocks words (the Python ReplayWindow's array('Q') buffer) */
    uint32_t nblocks;
    uint32_t size; /* W; 0 disables anti-replay */
    int esn;
} ef_replay;

/* The 64-bit sequence number if it may be new (`*seq`, return 0), or -1 (replay, or invalid 0). */
int ef_replay_check(const ef_replay *r, uint32_t seq_lo, uint64_t *seq);
/* Record `seq` after its ICV verified; 0 if it turned out to be a replay after all. */
int ef_replay_accept(ef_replay *r, uint64_t seq);

/* -- addresses and selectors (selector_match.py) ------------------------------------------- */
typedef struct {
    uint64_t hi, lo; /* IPv4 in lo */
} ef_addr;

typedef struct {
    ef_addr lo, hi;
    uint8_t version;
    uint8_t protocol; /* 0: any */
    int32_t port_lo;  /* -1: any port, -2: OPAQUE */
    int32_t port_hi;
} ef_selector;

typedef struct {
    const ef_selector *local, *remote;
    uint32_t nlocal, nremote;
} ef_selectors;

/* packet.py parse_flow: what the SA selectors look at. */
typedef struct {
    ef_addr src, dst;
    int32_t src_port, dst_port; /* -1: none */
    uint8_t version, protocol, fragment;
} ef_flow_key;

int ef_parse_flow(const uint8_t *p, size_t n, ef_flow_key *out); /* 0, or -1 malformed */
int ef_selectors_allow_inbound(const ef_selectors *s, const ef_flow_key *flow);
static inline int ef_addr_lt(ef_addr a, ef_addr b) { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo); }

/* -- one ESP packet ------------------------------------------------------------------------ */
typedef struct {
    ef_aead aead;
    ef_replay replay;
    const ef_selectors *selectors; /* NULL: the SA covers everything */
    uint32_t spi;
    int esn;
} ef_inbound;

/* esp_codec.decrypt_esp for a tunnel-mode AEAD SA, from the length check to the selector
 * check. `out` receives the plaintext and needs len - EF_AEAD_OVERHEAD bytes (checked).
 * Returns EF_OK with the inner packet at out[0 .. *inner_len), or the drop reason (on
 * EF_POLICY_MISMATCH *inner_len is the dropped inner packet's length too, for sampling).
 * `*accepted` says whether the replay window moved (the caller's persistence mark check).
 */
int ef_esp_open(ef_inbound *sa, const uint8_t *esp, size_t len, uint8_t *out, size_t out_cap, size_t *inner_len,
                int *accepted);

/* Bytes of the ESP payload (SPI .. ICV) for a `size`-byte body TFC-padded to `pad_to`. */
size_t ef_esp_sealed_length(size_t size, size_t pad_to);
/* Seal one ESP packet into `out` (ef_esp_sealed_length bytes, checked against out_cap).
 * Returns the length written, or -1 (EVP failure or no room). */
long ef_esp_seal(ef_aead *aead, uint32_t spi, uint64_t seq, int esn, const uint8_t *body, size_t size, size_t pad_to,
                 uint8_t next_header, uint8_t *out, size_t out_cap);
/* esp_codec.inner_ip_length: the length the IP header claims if plausible and <= limit, else -1. */
long ef_inner_ip_length(const uint8_t *p, size_t limit);

/* -- the identity's packet filter (esplanade.policy.filters) ------------------------------- */
typedef struct {
    uint32_t nseg;
    const ef_addr *starts; /* sorted segment starts over the address line */
    const uint8_t *kind;   /* per segment: 0 gap, 1 any port, 2 port ranges */
    const uint32_t *first; /* per segment: index of its first port range */
    const uint32_t *count; /* per segment: number of port ranges */
    const uint32_t *port_lo, *port_hi;
} ef_filter_table;

typedef struct {
    int16_t index[2][256]; /* [v6][protocol] -> table, -1 none; protocol 0 is "any protocol" */
    const ef_filter_table *tables;
    uint32_t ntables;
} ef_filter;

/* filters.parse_inner_packet: the fields the filter and the flow accounting look at. */
typedef struct {
    ef_addr src, dst;
    int32_t src_port, dst_port; /* -1: a non-initial fragment */
    uint8_t version, protocol;
} ef_inner_header;

int ef_parse_inner(const uint8_t *p, size_t n, ef_inner_header *out); /* 0, or -1 malformed */
int ef_filter_allows(const ef_filter *f, const ef_inner_header *h);

/* -- flow accounting: per (SPI, direction, 5-tuple) packets and bytes ---------------------- */
typedef struct {
    uint64_t packets, bytes;
    ef_addr src, dst;
    uint32_t spi;
    int32_t src_port, dst_port;
    uint8_t used, direction, version, protocol;
} ef_flow;

typedef struct {
    ef_flow *slots;
    uint32_t capacity; /* a power of two */
    uint32_t count, limit;
    uint64_t overflow_packets, overflow_bytes;
    uint32_t last; /* the slot of the last packet counted: the next one is usually of the same flow */
} ef_flows;

/* Count one packet; a new flow past `limit` goes to the overflow counters instead. `h` NULL: unparsed. */
void ef_flows_add(ef_flows *t, uint32_t spi, int direction, const ef_inner_header *h, uint64_t bytes);

/* -- segmentation of TUN frames (vnet header + packet), GRO-style merging for TUN writes ----- */
#define EF_VNET_HDR_LEN 10
#define EF_MAX_MERGED_SEGMENTS 64

/* How many wire packets and bytes the frame becomes, or -1 for a frame that cannot be split. */
long ef_split_size(const uint8_t *frame, size_t len, size_t *bytes);
/* Split/complete one frame: `count` packets into out, their lengths into lens. -1 on error. */
long ef_split_frame(const uint8_t *frame, size_t len, uint8_t *out, size_t out_cap, uint32_t *lens, size_t max_count);

/* The same split done in place, for a caller that uses each packet before asking for the next
 * (the seal): segment i is built where its payload lies in the frame, its headers written over
 * the last bytes of segment i - 1, so no payload is copied. The packets are byte for byte those of
 * ef_split_frame; the frame is consumed. */
#define EF_SPLIT_HEAD_MAX 120 /* IPv4 with options + TCP with options */
typedef struct {
    uint8_t *p; /* the packet after the vnet header */
    size_t n;
    uint8_t flags, gso_type;
    uint16_t gso_size, csum_start, csum_offset;
    size_t l3, hlen, payload, count, next;
    int v6;
    const uint8_t *src, *dst; /* the pseudo-header's addresses */
    uint32_t seq0;
    uint8_t flags0;
    uint8_t head[EF_SPLIT_HEAD_MAX]; /* the frame's headers, each segment's template */
} ef_split_cursor;

/* Plan the split of `frame`: how many packets (0..), or -1 for a frame ef_split_frame drops. */
long ef_split_start(ef_split_cursor *c, uint8_t *frame, size_t len);
/* The length of packet i (i < count). */
size_t ef_split_length(const ef_split_cursor *c, size_t i);
/* Build the next packet in place: its start (length: ef_split_length), NULL past the last. */
uint8_t *ef_split_next(ef_split_cursor *c);

/* Lower the MSS option of a TCP SYN (or SYN-ACK) in place to mss4 (IPv4) / mss6 (IPv6), with the
 * TCP checksum updated incrementally (RFC 1624). 1 when changed, 0 otherwise (never reads past n). */
int ef_clamp_mss(uint8_t *p, size_t n, uint16_t mss4, uint16_t mss6);

typedef struct {
    const uint8_t *data;
    uint32_t len;
} ef_span;

/* Coalesce packets into TUN frames. `plan` (n entries of scratch) and the frame list are built
 * by ef_coalesce_plan; ef_coalesce_write writes them. */
typedef struct ef_merge ef_merge;
typedef struct {
    ef_merge *merges;   /* n entries */
    int32_t *item;      /* output order: >= 0 a merge index, < 0 -(packet index + 1) passed plain */
    int32_t *next_part; /* per packet: the next packet of its merge, -1 */
    int32_t *buckets;   /* hash of open merges */
    uint32_t nbuckets;
    uint32_t nitems, nmerges;
} ef_coalesce_state;

size_t ef_coalesce_scratch_bytes(size_t n);
/* Plan the frames; returns the output bytes needed. `scratch` has ef_coalesce_scratch_bytes(n). */
size_t ef_coalesce_plan(const ef_span *pkts, size_t n, int merge_udp, void *scratch, ef_coalesce_state *st);
/* Write the planned frames into out (cap checked), their lengths into lens and the index of each
 * frame's first packet into firsts; returns the frame count or -1. */
long ef_coalesce_write(const ef_span *pkts, const ef_coalesce_state *st, uint8_t *out, size_t out_cap,
                       uint32_t *lens, uint32_t *firsts, size_t max_frames);

/* The Internet checksum (RFC 1071) with end-around carry: a non-zero sum never folds to 0. */
uint32_t ef_sum16(const uint8_t *p, size_t n, uint32_t initial);
uint16_t ef_fold(uint64_t sum);

#endif
