/* Test plugin: refuses to start unless its config mentions "api_key". */
#include <event_router/plugin.h>

#include <stdio.h>
#include <string.h>

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  for (int i = 0; i < n; ++i)
    if (versions[i] == 1) return 1;
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)user_data; (void)host; (void)config_len;
  if (!strstr(config, "\"api_key\"")) {
    snprintf(info->error, sizeof info->error, "missing api_key");
    return 3;
  }
  info->flags = ER_PLUGIN_CONCURRENT | ER_PLUGIN_NONBLOCKING;
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *r) {
  (void)user_data; (void)e; (void)r;
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) { (void)user_data; }
