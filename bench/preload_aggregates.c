/* The bench kit's preloader (its c/preload.c, compiled in as it is), with one
 * change when BENCH_AGGREGATES=K is set: each event's aggregate_id is one of
 * K fixed ids, taken in turn (event i gets id i mod K), so that K aggregates
 * each hold N/K events, interleaved. The ids have the length of the random
 * ones, so the bodies keep their size. Unset or 0: the kit's events as they are.
 * Built by bench/run.sh:
 *   gcc -O2 -I$KIT/c -o preload bench/preload_aggregates.c -lrabbitmq */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#else
#include <amqp.h>
#endif

static unsigned long long aggregates_ = 0, published_ = 0;

/* Rewrites the aggregate id in place, then publishes. */
static int publish_pooled(amqp_connection_state_t c, amqp_channel_t ch, amqp_bytes_t ex, amqp_bytes_t rk,
                          amqp_boolean_t mandatory, amqp_boolean_t immediate,
                          const struct amqp_basic_properties_t_ *props, amqp_bytes_t body) {
  static const char key[] = "\"aggregate_id\":\"";
  if (aggregates_ > 0) {
    char *at = memmem(body.bytes, body.len, key, sizeof key - 1);
    if (!at || (size_t)(at - (char *)body.bytes) + sizeof key - 1 + 36 > body.len) {
      fprintf(stderr, "error: no aggregate_id in a preloaded event\n");
      exit(1);
    }
    char id[37];
    snprintf(id, sizeof id, "00000000-0000-4000-8000-%012llu", (published_ % aggregates_) % 1000000000000ULL);
    memcpy(at + sizeof key - 1, id, 36);
  }
  ++published_;
  return amqp_basic_publish(c, ch, ex, rk, mandatory, immediate, props, body);
}

#define amqp_basic_publish publish_pooled
#define main kit_main
#include "preload.c"
#undef main

int main(int argc, char **argv) {
  const char *k = getenv("BENCH_AGGREGATES");
  aggregates_ = k && *k ? strtoull(k, NULL, 10) : 0;
  return kit_main(argc, argv);
}
