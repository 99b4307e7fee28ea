/* Recording plugin for the reload tests (test_reload.py): appends one line
 * per handled event to a file, tagged with a word from the handler's config,
 * so a test can count how often each event was handled across reloads and
 * tell which config's handler instance handled it.
 *
 * Config (the handler's `config:`, as JSON):
 *   {"file": "/abs/path", "tag": "v1", "sleep_us": N}
 *   file      the record file, opened O_WRONLY|O_APPEND|O_CREAT (required)
 *   tag       a word without spaces or quotes (default "-")
 *   sleep_us  sleep this long per event (default 0), to keep events in flight
 *             during a reload. With sleep_us > 0 the plugin does not claim
 *             ER_PLUGIN_NONBLOCKING, so calls run on the worker threads.
 *
 * Line format, written with ONE write() (atomic for O_APPEND regular files at
 * these sizes, so concurrent calls never interleave):
 *   <event_id> <tag> <queue>\n
 *
 * Verdict: always ER_ACK; an event without a usable event_id is
 * dead-lettered (the tests never publish one).
 *
 * Built by the tests:
 *   cc -O2 -shared -fPIC -fvisibility=hidden -I<source>/include -o librecord_tag.so record_tag.c
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
  char tag[64];
};

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  return accept_version(n, versions, ER_PLUGIN_API_VERSION);
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)host;
  struct instance *inst = calloc(1, sizeof *inst);
  if (!inst) return 1;
  if (record_sink_open(&inst->out, config, config_len, "record_tag", info->error, sizeof info->error) != 0) {
    free(inst);
    return 1;
  }
  if (!json_string(config, config_len, "tag", inst->tag, sizeof inst->tag)) strcpy(inst->tag, "-");
  *user_data = inst;
  info->flags = ER_PLUGIN_CONCURRENT | (inst->out.sleep_us == 0 ? ER_PLUGIN_NONBLOCKING : 0);
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *result) {
  struct instance *inst = user_data;
  if (e->event_id.len == 0 || e->event_id.len > 200 || e->queue.len > 200) {
    result->verdict = ER_DEAD_LETTER;
    snprintf(result->reason, sizeof result->reason, "record_tag: no usable event_id");
    return 0;
  }
  sleep_us(inst->out.sleep_us);
  char line[600];
  size_t n = 0;
  memcpy(line, e->event_id.data, e->event_id.len);
  n += e->event_id.len;
  line[n++] = ' ';
  size_t tl = strlen(inst->tag);
  memcpy(line + n, inst->tag, tl);
  n += tl;
  line[n++] = ' ';
  memcpy(line + n, e->queue.data, e->queue.len);
  n += e->queue.len;
  line[n++] = '\n';
  if (write(inst->out.fd, line, n) != (ssize_t)n) {
    result->verdict = ER_RETRY;
    snprintf(result->reason, sizeof result->reason, "record_tag: write: %s", strerror(errno));
  }
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) {
  struct instance *inst = user_data;
  if (!inst) return;
  close(inst->out.fd);
  free(inst);
}
