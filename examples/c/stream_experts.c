/* Streams every expert of every MoE layer of a model through sluice's C
 * ABI, a few at a time under a small slot budget, and checks each matrix's
 * bytes against the model file read directly.
 *
 * cc examples/c/stream_experts.c -I crates/sluice-capi/include \
 *    target/release/libsluice_capi.a -lpthread -ldl -lm -o stream_experts
 * ./stream_experts MODEL.gguf
 */
#include "sluice.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, SluiceStatus s) {
    fprintf(stderr, "%s failed (%d): %s\n", what, (int)s, sluice_last_error());
    return 1;
}

/* Compares `len` bytes at `data` with the file's bytes at `offset`. */
static int same_as_file(const char *path, uint64_t offset, const uint8_t *data, uint64_t len) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    uint8_t *buf = malloc(len ? len : 1);
    int ok = buf && fseeko(f, (off_t)offset, SEEK_SET) == 0 && fread(buf, 1, len, f) == len &&
             memcmp(buf, data, len) == 0;
    free(buf);
    fclose(f);
    return ok;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL\n", argv[0]);
        return 2;
    }
    SluiceOptions opts;
    sluice_options_default(&opts);
    opts.slots = 4;
    opts.prefetch = 3; /* token: told each token's id, guesses ahead */
    SluiceStore *store = NULL;
    SluiceStatus s = sluice_store_open(argv[1], &opts, &store);
    if (s != SLUICE_OK) return fail("sluice_store_open", s);
    if ((s = sluice_store_begin_token(store, 1)) != SLUICE_OK) return fail("begin_token", s);

    SluiceGeometry g;
    if ((s = sluice_store_geometry(store, &g)) != SLUICE_OK) return fail("geometry", s);
    uint64_t checked = 0;
    for (uint32_t m = 0; m < g.moe_layers; m++) {
        uint32_t layer;
        if ((s = sluice_store_moe_layer(store, m, &layer)) != SLUICE_OK) return fail("moe_layer", s);
        for (uint32_t first = 0; first < g.experts; first += 2) {
            uint32_t ids[2] = {first, first + 1 < g.experts ? first + 1 : first};
            size_t n = ids[0] == ids[1] ? 1 : 2;
            SluiceExpert *ex[2] = {NULL, NULL};
            if ((s = sluice_experts_acquire(store, layer, ids, n, ex)) != SLUICE_OK)
                return fail("sluice_experts_acquire", s);
            for (size_t i = 0; i < n; i++) {
                for (uint32_t which = 0; which < 3; which++) {
                    SluiceMatrix mat;
                    char path[4096];
                    uint64_t off, len;
                    if ((s = sluice_expert_matrix(ex[i], which, &mat)) != SLUICE_OK) return fail("matrix", s);
                    if ((s = sluice_expert_source(store, layer, ids[i], which, path, sizeof path, &off, &len)) != SLUICE_OK)
                        return fail("source", s);
                    if (len != mat.len || !same_as_file(path, off, mat.data, mat.len)) {
                        fprintf(stderr, "layer %u expert %u matrix %u differs from %s\n", layer, ids[i], which, path);
                        return 1;
                    }
                    checked += mat.len;
                }
                sluice_expert_release(ex[i]);
            }
        }
    }
    /* Bad input is an error with a message, not a crash. */
    uint32_t bad = g.experts + 5;
    SluiceExpert *none = NULL;
    s = sluice_experts_acquire(store, 0xFFFF, &bad, 1, &none);
    if (s == SLUICE_OK || strlen(sluice_last_error()) == 0) {
        fprintf(stderr, "an out-of-range request was accepted\n");
        return 1;
    }
    SluiceStats st;
    sluice_store_stats(store, &st);
    printf("ok: %llu bytes of %u MoE layers x %u experts match the file; %llu misses, %llu slots\n",
           (unsigned long long)checked, g.moe_layers, g.experts, (unsigned long long)st.misses,
           (unsigned long long)st.slots);
    sluice_store_close(store);

    SluiceOptions bad_opts;
    sluice_options_default(&bad_opts);
    bad_opts.prefetch = 9;
    SluiceStore *refused = NULL;
    s = sluice_store_open(argv[1], &bad_opts, &refused);
    if (s != SLUICE_ERR_INVALID || strstr(sluice_last_error(), "predictor") == NULL) {
        fprintf(stderr, "an unknown predictor gave %d: %s\n", (int)s, sluice_last_error());
        return 1;
    }

    SluiceStore *missing = NULL;
    s = sluice_store_open("/nonexistent/model.gguf", NULL, &missing);
    if (s != SLUICE_ERR_IO || strstr(sluice_last_error(), "/nonexistent/model.gguf") == NULL) {
        fprintf(stderr, "a missing file gave %d: %s\n", (int)s, sluice_last_error());
        return 1;
    }
    return 0;
}
