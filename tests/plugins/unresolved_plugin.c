/* Test plugin: references a function nothing defines, so RTLD_NOW fails. */
#include <event_router/plugin.h>

extern int er_test_function_nobody_defines(void);

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  (void)n;
  (void)versions;
  return er_test_function_nobody_defines();
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

ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) { (void)user_data; }
