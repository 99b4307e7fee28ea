/* Test plugin for crash-loop protection (test_crash_loop.py, and the unit
 * tests): takes the whole daemon down on one particular event.
 *
 * Config (JSON): {"file": "/abs/path", "sleep_us": N}
 *   file      record file, O_APPEND; one line per call, written with one write():
 *             "start <event_id> <pid>\n" before the work, "done <event_id> <pid>\n" after
 *   sleep_us  per ordinary event (default 0); an event's "sleep_ms": N overrides it.
 *             Calls run on the worker threads (not NONBLOCKING), CONCURRENT:
 *             several events are in flight at once.
 *
 * An event whose body holds "poison":"abort" calls abort(); "poison":"segv"
 * writes to address 8 (a real SIGSEGV). Any other event is acked.
 */
#define _POSIX_C_SOURCE 200809L
#include <event_router/plugin.h>

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"

struct instance {
  int fd;
  long sleep_us;
};

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) { return accept_version(n, versions, 1); }

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)host;
  char path[4096];
  if (!json_string(config, config_len, "file", path, sizeof path)) return 1;
  struct instance *in = calloc(1, sizeof *in);
  if (!in) return 1;
  in->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (in->fd < 0) {
    free(in);
    return 1;
  }
  in->sleep_us = json_number(config, config_len, "sleep_us", 0);
  *user_data = in;
  info->flags = ER_PLUGIN_CONCURRENT;
  return 0;
}

static void record(const struct instance *in, const char *what, const struct er_event *e) {
  char line[512];
  int n = snprintf(line, sizeof line, "%s %.*s %ld\n", what, (int)e->event_id.len, e->event_id.data, (long)getpid());
  if (n > 0 && (size_t)n < sizeof line && write(in->fd, line, (size_t)n) != n) { /* the test sees it missing */
  }
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *r) {
  (void)r;
  const struct instance *in = user_data;
  record(in, "start", e);
  char poison[16];
  if (json_string(e->body.data, e->body.len, "poison", poison, sizeof poison)) {
    if (strcmp(poison, "segv") == 0) *(volatile int *)(uintptr_t)8 = 1; /* a real fault */
    abort();
  }
  long sleep_ms = json_number(e->body.data, e->body.len, "sleep_ms", -1);
  long sleep_us = sleep_ms >= 0 ? sleep_ms * 1000 : in->sleep_us;
  if (sleep_us > 0) {
    struct timespec ts = {sleep_us / 1000000, (sleep_us % 1000000) * 1000};
    nanosleep(&ts, NULL);
  }
  record(in, "done", e);
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) {
  struct instance *in = user_data;
  close(in->fd);
  free(in);
}
