/* A version 1 plugin built against the version 1 header (a copy of
 * include/event_router/plugin.h as it was), as an out-of-tree plugin written
 * before version 2 would be. It answers ER_PLUGIN_API_VERSION (1 in that
 * header). The body names the verdict; "view" reports what of the version 2
 * additions it can see (nothing: its reserved fields stay NULL). */
#include <event_router/plugin.h>

#include <stdio.h>
#include <string.h>

#if ER_PLUGIN_API_VERSION != 1
#error "built against the wrong header"
#endif

static const struct er_host *the_host;

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *v) {
  for (int i = 0; i < n; i++)
    if (v[i] == ER_PLUGIN_API_VERSION) return v[i];
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **ud, const struct er_host *host, const char *cfg, size_t len,
                                    struct er_plugin_info *info) {
  the_host = host;
  *ud = NULL;
  info->flags = ER_PLUGIN_CONCURRENT;
  if (len && strstr(cfg, "\"nonblocking\":1")) info->flags |= ER_PLUGIN_NONBLOCKING;
  return 0;
}

static int body_is(const struct er_event *e, const char *s) {
  return e->body.len == strlen(s) && memcmp(e->body.data, s, e->body.len) == 0;
}

static int all_null(void *const *p, int n) {
  for (int i = 0; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *ud, const struct er_event *e, struct er_result *r) {
  (void)ud;
  if (body_is(e, "ack")) return 0;
  if (body_is(e, "retry")) {
    r->verdict = ER_RETRY;
    r->retry_delay_ms = 250;
    snprintf(r->reason, sizeof r->reason, "v1 retry");
  } else if (body_is(e, "dead")) {
    r->verdict = ER_DEAD_LETTER;
    snprintf(r->reason, sizeof r->reason, "v1 reject");
  } else if (body_is(e, "erpd")) {
    return 0x45525044; /* version 2's ER_PENDING: for version 1, just an error code */
  } else if (body_is(e, "view")) {
    r->verdict = ER_DEAD_LETTER;
    snprintf(r->reason, sizeof r->reason, "host_reserved_null=%d event_reserved_null=%d sizes_ok=%d",
             all_null(the_host->reserved, 8), all_null(e->reserved, 8),
             e->struct_size >= sizeof *e && r->struct_size >= sizeof *r && the_host->struct_size >= sizeof *the_host);
  } else {
    return 1;
  }
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *ud) { (void)ud; }
