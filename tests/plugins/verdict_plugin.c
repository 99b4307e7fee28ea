/* Test plugin: the body names the verdict. Exercises every result mapping. */
#include <event_router/plugin.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int live_instances; /* read by the test through verdict_plugin_live() */

ER_PLUGIN_EXPORT int verdict_plugin_live(void) { return live_instances; }

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  for (int i = 0; i < n; ++i)
    if (versions[i] == 1) return 1;
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)host;
  char *copy = malloc(config_len + 1);
  if (!copy) return 1;
  memcpy(copy, config, config_len + 1);
  *user_data = copy;
  info->flags = ER_PLUGIN_CONCURRENT | ER_PLUGIN_NONBLOCKING;
  ++live_instances;
  return 0;
}

static int body_is(const struct er_event *e, const char *s) {
  return e->body.len == strlen(s) && memcmp(e->body.data, s, e->body.len) == 0;
}

#define S(x) (int)e->x.len, e->x.data

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *r) {
  if (body_is(e, "ack")) return 0;
  if (body_is(e, "retry")) {
    r->verdict = ER_RETRY;
    r->retry_delay_ms = 1500;
    snprintf(r->reason, sizeof r->reason, "downstream busy");
  } else if (body_is(e, "retry-silent")) {
    r->verdict = ER_RETRY;
  } else if (body_is(e, "dead")) {
    r->verdict = ER_DEAD_LETTER;
    snprintf(r->reason, sizeof r->reason, "bad speaker");
  } else if (body_is(e, "dead-silent")) {
    r->verdict = ER_DEAD_LETTER;
  } else if (body_is(e, "fail")) {
    return 7;
  } else if (body_is(e, "unknown")) {
    r->verdict = 42;
  } else if (body_is(e, "full")) {
    r->verdict = ER_DEAD_LETTER;
    memset(r->reason, 'x', sizeof r->reason); /* no NUL terminator */
  } else if (body_is(e, "config")) {
    r->verdict = ER_DEAD_LETTER;
    snprintf(r->reason, sizeof r->reason, "config=%s", (const char *)user_data);
  } else if (body_is(e, "fields")) {
    r->verdict = ER_DEAD_LETTER;
    snprintf(r->reason, sizeof r->reason,
             "type=%.*s id=%.*s corr=%.*s agg=%.*s/%.*s rk=%.*s ex=%.*s q=%.*s attempt=%u redelivered=%u size_ok=%d",
             S(event_type), S(event_id), S(correlation_id), S(aggregate_type), S(aggregate_id),
             S(routing_key), S(exchange), S(queue), (unsigned)e->attempt, (unsigned)e->redelivered,
             e->struct_size >= sizeof *e && r->struct_size >= sizeof *r);
  } else {
    r->verdict = ER_DEAD_LETTER;
    snprintf(r->reason, sizeof r->reason, "unexpected body");
  }
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) {
  free(user_data);
  --live_instances;
}
