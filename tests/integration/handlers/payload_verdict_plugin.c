/* Test plugin for the integration tests: the verdict comes from markers in
 * the (JSON) body, per attempt, so it can be driven through the daemon, whose
 * bodies must be JSON objects (tests/plugins/verdict_plugin.c compares the
 * whole body, e.g. "ack", which the daemon dead-letters as invalid_json
 * before any handler runs).
 *
 * Markers (anywhere in the body, typically inside a payload string):
 *   V<n>=<verdict>;   the verdict of attempt n; without one, ER_ACK
 *   <verdict>:  ack | retry | retry:<ms> (retry_delay_ms) | dead | dead:<reason>
 * e.g. {"payload": {"v": "V1=retry:500;V2=ack;"}}.
 *
 * Config (the handler's `config:`, as JSON): {"record": "/abs/path.jsonl"}:
 * one line per call: {"event_id": "...", "attempt": n, "time": <unix seconds>,
 * "verdict": "..."}.
 *
 * Built by the tests: cc -shared -fPIC -I<source>/include -o X.so this.c
 */
#include <event_router/plugin.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

struct instance {
  char record[4096];
};

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  for (int i = 0; i < n; ++i)
    if (versions[i] == ER_PLUGIN_API_VERSION) return versions[i];
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)host;
  (void)config_len;
  struct instance *inst = calloc(1, sizeof *inst);
  if (!inst) return 1;
  const char *k = strstr(config, "\"record\"");
  if (k) {
    const char *q = strchr(k + 8, '"');
    if (q) {
      const char *end = strchr(q + 1, '"');
      size_t len = end ? (size_t)(end - q - 1) : 0;
      if (len < sizeof inst->record) memcpy(inst->record, q + 1, len);
    }
  }
  *user_data = inst;
  info->flags = ER_PLUGIN_CONCURRENT | ER_PLUGIN_NONBLOCKING;
  return 0;
}

/* Finds "V<attempt>=" in the body; copies the verdict up to ';' into out. */
static void find_verdict(const struct er_event *e, char *out, size_t out_size) {
  char key[32];
  int klen = snprintf(key, sizeof key, "V%u=", (unsigned)e->attempt);
  snprintf(out, out_size, "ack");
  const char *b = e->body.data;
  size_t n = e->body.len;
  for (size_t i = 0; klen > 0 && i + (size_t)klen <= n; ++i) {
    if (memcmp(b + i, key, (size_t)klen) != 0) continue;
    if (i > 0 && b[i - 1] >= '0' && b[i - 1] <= '9') continue; /* V11= is not V1= */
    size_t s = i + (size_t)klen, j = s;
    while (j < n && b[j] != ';' && b[j] != '"' && j - s + 1 < out_size) ++j;
    memcpy(out, b + s, j - s);
    out[j - s] = 0;
    return;
  }
}

static void record(const struct instance *inst, const struct er_event *e, const char *verdict) {
  if (!inst->record[0]) return;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  char line[1024];
  int len = snprintf(line, sizeof line, "{\"event_id\": \"%.*s\", \"attempt\": %u, \"time\": %lld.%09ld, "
                     "\"verdict\": \"%s\"}\n",
                     (int)(e->event_id.len > 200 ? 200 : e->event_id.len), e->event_id.data,
                     (unsigned)e->attempt, (long long)ts.tv_sec, ts.tv_nsec, verdict);
  if (len <= 0 || (size_t)len >= sizeof line) return;
  int fd = open(inst->record, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  flock(fd, LOCK_EX);
  ssize_t w = write(fd, line, (size_t)len);
  (void)w;
  close(fd);
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *r) {
  const struct instance *inst = user_data;
  char v[256];
  find_verdict(e, v, sizeof v);
  record(inst, e, v);
  if (strcmp(v, "ack") == 0) {
    r->verdict = ER_ACK;
  } else if (strncmp(v, "retry", 5) == 0) {
    r->verdict = ER_RETRY;
    if (v[5] == ':') r->retry_delay_ms = (uint32_t)strtoul(v + 6, NULL, 10);
    snprintf(r->reason, sizeof r->reason, "payload asked to retry (attempt %u)", (unsigned)e->attempt);
  } else if (strncmp(v, "dead", 4) == 0) {
    r->verdict = ER_DEAD_LETTER;
    if (v[4] == ':') snprintf(r->reason, sizeof r->reason, "%s", v + 5);
  } else {
    r->verdict = ER_DEAD_LETTER;
    snprintf(r->reason, sizeof r->reason, "unknown verdict marker '%s'", v);
  }
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) { free(user_data); }
