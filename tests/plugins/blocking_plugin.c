/* Test plugin: neither CONCURRENT nor NONBLOCKING, so the daemon runs it on
 * the worker pool, one call at a time. Records the largest overlap seen. */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <event_router/plugin.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static atomic_int running;
static atomic_int max_overlap;

ER_PLUGIN_EXPORT int blocking_plugin_max_overlap(void) { return atomic_load(&max_overlap); }

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  for (int i = 0; i < n; ++i)
    if (versions[i] == 1) return 1;
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)user_data; (void)host; (void)config; (void)config_len;
  info->flags = 0;
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *r) {
  (void)user_data;
  int now = atomic_fetch_add(&running, 1) + 1;
  int prev = atomic_load(&max_overlap);
  while (now > prev && !atomic_compare_exchange_weak(&max_overlap, &prev, now)) {
  }
  struct timespec ts = {0, 20 * 1000 * 1000}; /* "blocking I/O" */
  nanosleep(&ts, NULL);
  if (e->body.len == 3 && memcmp(e->body.data, "tid", 3) == 0) {
    r->verdict = ER_RETRY;
    snprintf(r->reason, sizeof r->reason, "tid=%lu", (unsigned long)pthread_self());
  }
  atomic_fetch_sub(&running, 1);
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) { (void)user_data; }
