/* Recording plugin for the fault-injection tests (test_faults.py): appends one
 * line per handled event to a file, so a test can count how often each
 * event_id was handled across broker restarts, cut connections and daemon
 * kills.
 *
 * Config (the handler's `config:`, as JSON):
 *   {"file": "/abs/path", "sleep_us": N}
 *   file      the record file, opened O_WRONLY|O_APPEND|O_CREAT (required)
 *   sleep_us  sleep this long per event (default 0), to keep events in
 *             flight while a fault is injected. With sleep_us > 0 the plugin
 *             does not claim ER_PLUGIN_NONBLOCKING, so calls run on the
 *             daemon's worker threads.
 *
 * Line format, written with ONE write() (atomic for O_APPEND regular files at
 * these sizes, so concurrent calls never interleave):
 *   <event_id> <unix time in microseconds> <attempt> <redelivered 0|1>\n
 * The time is taken when the handler finishes (after the sleep): the moment
 * the event counts as handled.
 *
 * Flags: ER_PLUGIN_CONCURRENT, plus ER_PLUGIN_NONBLOCKING when sleep_us == 0.
 * Verdict: always ER_ACK; an event without event_id is dead-lettered (the
 * tests never publish one, so it would show up in the DLQ).
 *
 * Built by the tests:
 *   cc -O2 -shared -fPIC -fvisibility=hidden -I<source>/include -o librecord_ids.so record_ids.c
 */
#include <event_router/plugin.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct instance {
  int fd;
  long sleep_us;
};

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  for (int i = 0; i < n; ++i)
    if (versions[i] == ER_PLUGIN_API_VERSION) return versions[i];
  return -1;
}

/* The string value of "key" in a flat JSON object (no escapes in values). */
static int json_string(const char *json, const char *key, char *out, size_t out_size) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char *k = strstr(json, pat);
  if (!k) return 0;
  const char *colon = strchr(k + strlen(pat), ':');
  if (!colon) return 0;
  const char *q = strchr(colon, '"');
  if (!q) return 0;
  const char *end = strchr(q + 1, '"');
  if (!end || (size_t)(end - q - 1) >= out_size) return 0;
  memcpy(out, q + 1, (size_t)(end - q - 1));
  out[end - q - 1] = 0;
  return 1;
}

static long json_number(const char *json, const char *key, long dflt) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char *k = strstr(json, pat);
  if (!k) return dflt;
  const char *colon = strchr(k + strlen(pat), ':');
  if (!colon) return dflt;
  return strtol(colon + 1, NULL, 10);
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)host;
  (void)config_len;
  char path[4096];
  if (!json_string(config, "file", path, sizeof path)) {
    snprintf(info->error, sizeof info->error, "record_ids: config needs {\"file\": \"/path\"}");
    return 1;
  }
  struct instance *inst = calloc(1, sizeof *inst);
  if (!inst) return 1;
  inst->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (inst->fd < 0) {
    snprintf(info->error, sizeof info->error, "record_ids: %s: %s", path, strerror(errno));
    free(inst);
    return 1;
  }
  inst->sleep_us = json_number(config, "sleep_us", 0);
  if (inst->sleep_us < 0) inst->sleep_us = 0;
  *user_data = inst;
  info->flags = ER_PLUGIN_CONCURRENT | (inst->sleep_us == 0 ? ER_PLUGIN_NONBLOCKING : 0);
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *result) {
  struct instance *inst = user_data;
  if (e->event_id.len == 0 || e->event_id.len > 200) {
    result->verdict = ER_DEAD_LETTER;
    snprintf(result->reason, sizeof result->reason, "record_ids: no usable event_id");
    return 0;
  }
  if (inst->sleep_us > 0) {
    struct timespec d = {inst->sleep_us / 1000000, (inst->sleep_us % 1000000) * 1000};
    while (nanosleep(&d, &d) != 0 && errno == EINTR) {
    }
  }
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  char line[320];
  memcpy(line, e->event_id.data, e->event_id.len);
  int n = snprintf(line + e->event_id.len, sizeof line - e->event_id.len, " %lld %u %d\n",
                   (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000, (unsigned)e->attempt,
                   e->redelivered ? 1 : 0);
  size_t len = e->event_id.len + (size_t)n;
  if (write(inst->fd, line, len) != (ssize_t)len) {
    result->verdict = ER_RETRY;
    snprintf(result->reason, sizeof result->reason, "record_ids: write: %s", strerror(errno));
  }
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) {
  struct instance *inst = user_data;
  if (!inst) return;
  close(inst->fd);
  free(inst);
}
