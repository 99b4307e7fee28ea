/* The cheapest possible plugin: acknowledges every event without looking at
 * it. Used to benchmark the daemon's own overhead. */
#include <event_router/plugin.h>

ER_PLUGIN_EXPORT int er_plugin_version(int supported_count, const int *supported_versions) {
  for (int i = 0; i < supported_count; ++i)
    if (supported_versions[i] == 1) return 1;
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host,
                                    const char *config_json, size_t config_len,
                                    struct er_plugin_info *info) {
  (void)host;
  (void)config_json;
  (void)config_len;
  *user_data = NULL; /* stateless */
  info->flags = ER_PLUGIN_CONCURRENT | ER_PLUGIN_NONBLOCKING;
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *event,
                                      struct er_result *result) {
  /* The daemon already zeroed result to ER_ACK. */
  (void)user_data;
  (void)event;
  (void)result;
  return 0;
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) { (void)user_data; }
