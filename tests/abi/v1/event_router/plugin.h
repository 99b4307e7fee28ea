/*
 * event-router plugin ABI.
 *
 * A plugin is a shared library that handles events in the daemon's process.
 * It exports exactly four functions, all with C linkage:
 *
 *   er_plugin_version   negotiate the ABI version
 *   er_plugin_init      create one handler instance from its YAML `config`
 *   er_plugin_handle    handle one event, return a verdict
 *   er_plugin_cleanup   destroy the instance
 *
 * The daemon loads plugins with dlopen(RTLD_NOW | RTLD_LOCAL): a missing
 * symbol fails at load time, not at the first event. One library may back
 * several handlers; each gets its own instance (its own `user_data`).
 *
 * Rules:
 *  - Nothing may throw (C++) or longjmp across these functions.
 *  - Every pointer the daemon passes in is valid only for the duration of
 *    the call. Copy what you need to keep.
 *  - Structs grow only at the end and carry their size (`struct_size`);
 *    check it before reading fields added after version 1.
 *
 * Build a plugin out of tree with nothing but this header:
 *   cc -shared -fPIC -fvisibility=hidden -o libmy_plugin.so my_plugin.c
 */
#ifndef EVENT_ROUTER_PLUGIN_H
#define EVENT_ROUTER_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes. */
#define ER_PLUGIN_API_VERSION 1

#if defined(__GNUC__)
#define ER_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define ER_PLUGIN_EXPORT
#endif

/* Capability flags a plugin sets in er_plugin_info.flags during init. */
/* handle() may be called from several threads at once for one instance. */
#define ER_PLUGIN_CONCURRENT 0x1u
/* handle() never blocks (no I/O waits, no sleeps): the daemon may call it on
 * its event loop thread, which avoids a thread hop per event. */
#define ER_PLUGIN_NONBLOCKING 0x2u

/* Log levels for er_host.log. */
enum er_log_level {
  ER_LOG_DEBUG = 0,
  ER_LOG_INFO = 1,
  ER_LOG_WARN = 2,
  ER_LOG_ERROR = 3
};

/* What the daemon should do with the event. */
enum er_verdict {
  ER_ACK = 0,         /* handled: acknowledge it */
  ER_RETRY = 1,       /* transient failure: try again later */
  ER_DEAD_LETTER = 2  /* permanent failure: move to the dead-letter queue */
};

/* Services the daemon offers to a plugin instance. Valid from init until
 * cleanup returns; safe to call from any thread. */
struct er_host {
  size_t struct_size;
  /* Opaque; pass back to the functions below. */
  void *ctx;
  /* Write one log record, tagged with the handler's name. `msg` need not be
   * NUL-terminated; `len` bytes are used. */
  void (*log)(void *ctx, int level, const char *msg, size_t len);
  void *reserved[8];
};

/* Filled in by the plugin during er_plugin_init. */
struct er_plugin_info {
  size_t struct_size;
  /* ER_PLUGIN_* flags. */
  uint32_t flags;
  uint32_t reserved0;
  /* On failure, a NUL-terminated message for the daemon's error output. */
  char error[512];
  void *reserved[8];
};

/* A length-delimited string. Not NUL-terminated. len == 0 means absent. */
struct er_str {
  const char *data;
  size_t len;
};

/* A read-only view of one event. */
struct er_event {
  size_t struct_size;
  struct er_str body;           /* the message body as received (JSON) */
  struct er_str event_type;     /* from the envelope, else the routing key */
  struct er_str event_id;
  struct er_str correlation_id;
  struct er_str aggregate_id;
  struct er_str aggregate_type;
  struct er_str routing_key;
  struct er_str exchange;
  struct er_str queue;
  uint32_t attempt;             /* 1 on the first delivery */
  uint32_t redelivered;         /* non-zero if the broker redelivered it */
  void *reserved[8];
};

/* The plugin's answer for one event. The daemon zeroes it (verdict ER_ACK)
 * before each call. */
struct er_result {
  size_t struct_size;
  int verdict;                  /* enum er_verdict */
  /* For ER_RETRY: ask for at least this delay before the next attempt;
   * 0 = the queue's configured backoff. */
  uint32_t retry_delay_ms;
  /* For ER_RETRY and ER_DEAD_LETTER: a NUL-terminated human reason. */
  char reason[512];
  void *reserved[8];
};

/*
 * Negotiate the ABI version.
 *
 * The daemon passes the versions it supports, newest first. Return the one
 * the plugin implements, or -1 if none fits (the load then fails with a
 * clear error). Called once, before any other function.
 */
ER_PLUGIN_EXPORT int er_plugin_version(int supported_count, const int *supported_versions);

/*
 * Create one handler instance.
 *
 *   user_data    out: the plugin's instance pointer, passed to handle/cleanup
 *   host         daemon services (logging); valid until cleanup returns
 *   config_json  the handler's `config:` YAML as a JSON document ("{}" when
 *                absent), NUL-terminated, config_len bytes without the NUL
 *   info         out: capability flags; an error message on failure
 *
 * Return 0 on success. Any other value refuses the handler: the daemon does
 * not start (or a reload is rejected) and prints info->error.
 */
ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host,
                                    const char *config_json, size_t config_len,
                                    struct er_plugin_info *info);

/*
 * Handle one event.
 *
 * Fill `result` and return 0. A non-zero return is treated as ER_RETRY with
 * the reason "plugin returned <n>". Unless the instance set
 * ER_PLUGIN_CONCURRENT, calls on one instance never overlap. Unless it set
 * ER_PLUGIN_NONBLOCKING, calls run on a worker thread and may block.
 */
ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *event,
                                      struct er_result *result);

/*
 * Destroy the instance. No handle() call is running or will run.
 */
ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data);

#ifdef __cplusplus
}
#endif

#endif /* EVENT_ROUTER_PLUGIN_H */
