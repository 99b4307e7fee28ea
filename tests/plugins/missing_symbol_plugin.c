/* Test plugin: does not export er_plugin_cleanup. */
#include <event_router/plugin.h>

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  (void)n;
  (void)versions;
  return 1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  (void)user_data; (void)host; (void)config; (void)config_len; (void)info;
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *r) {
  (void)user_data; (void)e; (void)r;
  return 0;
}
