/* Logs one line per event through the host's logger and acknowledges it.
 *
 * config (optional):  { "prefix": "billing" }   default prefix: "event"
 * logs:  <prefix> handled <event_type> id=<event_id> correlation_id=<...>
 *        routing_key=<...> attempt=<n>          (absent values print as "-")
 */
#include <event_router/plugin.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PREFIX_MAX 128

struct log_plugin {
  const struct er_host *host;
  char prefix[PREFIX_MAX];
};

ER_PLUGIN_EXPORT int er_plugin_version(int supported_count, const int *supported_versions) {
  for (int i = 0; i < supported_count; ++i)
    if (supported_versions[i] == 1) return 1;
  return -1;
}

static const char *skip_ws(const char *p, const char *end) {
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  return p;
}

/* Minimal: finds the key "prefix" and copies its string value (backslash
 * escapes taken literally, \uXXXX not decoded). The config comes from YAML
 * rendered by the daemon, so it is well-formed JSON.
 * Returns 0 if absent or found, -1 if the value is not a string. */
static int parse_prefix(const char *json, size_t len, char *out, size_t out_size) {
  static const char key[] = "\"prefix\"";
  const char *end = json + len;
  const char *p = json;
  while (p < end) {
    const char *hit = NULL;
    for (const char *q = p; q + sizeof key - 1 <= end; ++q) {
      if (memcmp(q, key, sizeof key - 1) == 0) { hit = q; break; }
    }
    if (!hit) return 0;
    p = skip_ws(hit + sizeof key - 1, end);
    if (p >= end || *p != ':') continue; /* "prefix" was a value, not a key */
    p = skip_ws(p + 1, end);
    if (p >= end || *p != '"') return -1;
    ++p;
    size_t n = 0;
    while (p < end && *p != '"') {
      if (*p == '\\' && p + 1 < end) ++p;
      if (n + 1 < out_size) out[n++] = *p;
      ++p;
    }
    out[n] = '\0';
    return 0;
  }
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host,
                                    const char *config_json, size_t config_len,
                                    struct er_plugin_info *info) {
  if (!host || !host->log) {
    snprintf(info->error, sizeof info->error, "log_plugin needs a host with a log function");
    return 1;
  }
  struct log_plugin *self = calloc(1, sizeof *self);
  if (!self) {
    snprintf(info->error, sizeof info->error, "out of memory");
    return 1;
  }
  self->host = host;
  strcpy(self->prefix, "event");
  if (config_json && parse_prefix(config_json, config_len, self->prefix, sizeof self->prefix) != 0) {
    snprintf(info->error, sizeof info->error, "config: \"prefix\" must be a string");
    free(self);
    return 1;
  }
  *user_data = self;
  info->flags = ER_PLUGIN_CONCURRENT | ER_PLUGIN_NONBLOCKING;
  return 0;
}

/* printf arguments for an er_str: "-" when absent. */
#define STR_ARG(s) (int)((s).len ? (s).len : 1), ((s).len ? (s).data : "-")

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *event,
                                      struct er_result *result) {
  (void)result; /* zeroed to ER_ACK by the daemon */
  const struct log_plugin *self = user_data;
  char line[2048];
  int n = snprintf(line, sizeof line, "%s handled %.*s id=%.*s correlation_id=%.*s routing_key=%.*s attempt=%u",
                   self->prefix, STR_ARG(event->event_type), STR_ARG(event->event_id),
                   STR_ARG(event->correlation_id), STR_ARG(event->routing_key),
                   (unsigned)event->attempt);
  if (n < 0) return 0;
  size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1; /* truncated if huge */
  self->host->log(self->host->ctx, ER_LOG_INFO, line, len);
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) { free(user_data); }
