/* Recording plugin for the cluster fault tests (test_cluster_faults.py):
 * one line when a run starts and one when it ends, so a test can tell which
 * daemon ran an event, which attempt it was, whether it finished, and the
 * gap between a retried event's attempts.
 *
 * Config (the handler's `config:`, as JSON):
 *   {"file": "/abs/path", "sleep_us": N}
 *   file      the record file, opened O_WRONLY|O_APPEND|O_CREAT (required)
 *   sleep_us  sleep this long per run (default 0), to keep events in flight
 *             while a fault is injected (runs on the worker threads)
 *
 * An event whose body has `"retry_first": 1` asks for a retry (ER_RETRY, the
 * queue's configured delay) on its attempt 1; every other run succeeds.
 * `"slow_us": N` (up to 10 s) makes its runs sleep that much longer.
 *
 * Lines, each written with ONE write() (atomic for O_APPEND at these sizes):
 *   S <event_id> <attempt> <pid> <unix us>\n            a run starts
 *   E <event_id> <attempt> <pid> <unix us> <verdict>\n  it returns (0 ack, 1 retry)
 * <pid> is the daemon's (the plugin runs in its process).
 *
 * Built by the tests:
 *   cc -O2 -shared -fPIC -fvisibility=hidden -I<source>/include -o librecord_runs.so record_runs.c
 */
#include <event_router/plugin.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../plugins/test_util.h"

struct instance {
  struct record_sink out;
};

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  return accept_version(n, versions, ER_PLUGIN_API_VERSION);
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)host;
  struct instance *inst = calloc(1, sizeof *inst);
  if (!inst) return 1;
  if (record_sink_open(&inst->out, config, config_len, "record_runs", info->error, sizeof info->error) != 0) {
    free(inst);
    return 1;
  }
  *user_data = inst;
  info->flags = ER_PLUGIN_CONCURRENT;
  return 0;
}

static long long now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* One line `<tag> <id> <attempt> <pid> <us>[ <verdict>]`; 0 when written whole. */
static int record(struct instance *inst, char tag, const struct er_event *e, int verdict) {
  char line[320];
  int n = snprintf(line, sizeof line, "%c %.*s %u %ld %lld", tag, (int)e->event_id.len, e->event_id.data,
                   (unsigned)e->attempt, (long)getpid(), now_us());
  if (n < 0 || (size_t)n >= sizeof line - 8) return -1;
  n += verdict >= 0 ? snprintf(line + n, sizeof line - (size_t)n, " %d\n", verdict)
                    : snprintf(line + n, sizeof line - (size_t)n, "\n");
  return write(inst->out.fd, line, (size_t)n) == (ssize_t)n ? 0 : -1;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *result) {
  struct instance *inst = user_data;
  if (e->event_id.len == 0 || e->event_id.len > 200) {
    result->verdict = ER_DEAD_LETTER;
    snprintf(result->reason, sizeof result->reason, "record_runs: no usable event_id");
    return 0;
  }
  if (record(inst, 'S', e, -1) != 0) {
    result->verdict = ER_RETRY;
    snprintf(result->reason, sizeof result->reason, "record_runs: write: %s", strerror(errno));
    return 0;
  }
  long slow = json_number(e->body.data, e->body.len, "slow_us", 0);
  sleep_us(inst->out.sleep_us + (slow > 0 && slow <= 10000000 ? slow : 0));
  int verdict = ER_ACK;
  if (e->attempt == 1 && json_number(e->body.data, e->body.len, "retry_first", 0) == 1) {
    verdict = ER_RETRY;
    snprintf(result->reason, sizeof result->reason, "record_runs: retry_first");
  }
  result->verdict = verdict;
  /* A lost end line only makes the test see an unfinished run. */
  (void)record(inst, 'E', e, verdict);
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) {
  struct instance *inst = user_data;
  if (!inst) return;
  close(inst->out.fd);
  free(inst);
}
