/*
 * event-router plugin ABI, version 2.
 *
 * A plugin is a shared library that handles events in the daemon's process.
 * It exports exactly four functions, all with C linkage:
 *
 *   er_plugin_version   negotiate the ABI version
 *   er_plugin_init      create one handler instance from its YAML `config`
 *   er_plugin_handle    handle one event: return a verdict, or ER_PENDING
 *                       and complete it later (version 2)
 *   er_plugin_cleanup   destroy the instance
 *
 * The daemon loads plugins with dlopen(RTLD_NOW | RTLD_LOCAL): a missing
 * symbol fails at load time, not at the first event. One library may back
 * several handlers; each gets its own instance (its own `user_data`).
 *
 * Rules:
 *  - Nothing may throw (C++) or longjmp across these functions.
 *  - Every pointer the daemon passes in is valid only for the duration of
 *    the call. Copy what you need to keep. The one exception is the event
 *    handle (version 2), an opaque value kept until the event is completed.
 *  - Structs grow only at the end (or by taking a reserved field) and carry
 *    their size (`struct_size`); check it before reading fields added after
 *    version 1.
 *
 * Version 2 adds, and changes nothing a version 1 plugin sees:
 *  - asynchronous completion: er_plugin_handle may return ER_PENDING and the
 *    plugin completes the event later, from any thread, with host->complete;
 *  - emit: host->emit adds a follow-up event, published only with an ack;
 *  - er_event.handle, the opaque handle that names the event for both.
 * A plugin built against the version 1 header keeps working: it answers 1
 * in er_plugin_version and sees exactly the version 1 behaviour.
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
#define ER_PLUGIN_API_VERSION 2

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

/* Version 2: er_plugin_handle returns this to say "I will complete this
 * event later with host->complete". A distinctive value, so that an error
 * code of a plugin written for version 1 never means it by accident. */
#define ER_PENDING 0x45525044 /* "ERPD" */

/* Return codes of host->complete and host->emit (version 2). */
enum er_host_status {
  ER_OK = 0,
  /* The handle names no event that may still be completed: it was completed
   * already (double completion), it timed out, the daemon abandoned it at
   * shutdown, or it is not a handle. Nothing happened; the daemon logs it. */
  ER_E_HANDLE = 1,
  /* A malformed argument: a NULL pointer, a result whose struct_size is too
   * small, an emit that is not one JSON object with a string `event_type`. */
  ER_E_INVALID = 2,
  /* Too many follow-up events for one event, or too many bytes of them. */
  ER_E_LIMIT = 3
};

/* Opaque; names one event for host->complete and host->emit (version 2).
 * Not a pointer the plugin may read through. */
struct er_event_handle;

struct er_result;

/* What the daemon should do with the event. */
enum er_verdict {
  ER_ACK = 0,         /* handled: acknowledge it */
  ER_RETRY = 1,       /* transient failure: try again later */
  ER_DEAD_LETTER = 2  /* permanent failure: move to the dead-letter queue */
};

/* Services the daemon offers to a plugin instance. Valid from init until
 * cleanup returns; every function is safe to call from any thread. */
struct er_host {
  size_t struct_size;
  /* Opaque; pass back to log. */
  void *ctx;
  /* Write one log record, tagged with the handler's name. `msg` need not be
   * NUL-terminated; `len` bytes are used. */
  void (*log)(void *ctx, int level, const char *msg, size_t len);

  /*
   * Version 2 (NULL for a version 1 plugin).
   *
   * complete: end the event `event` with `result` (the same verdicts and
   * fields as er_plugin_handle's result; set result->struct_size to
   * sizeof *result). Call it exactly once per event that er_plugin_handle
   * left pending, from any thread, at any time, even while er_plugin_handle
   * is still running. `result` is read before complete returns. Returns
   * ER_OK, ER_E_INVALID (nothing happened: fix the call), or ER_E_HANDLE
   * when the event can no longer be completed: completed already, timed out
   * (the handler's `timeout`), or abandoned at shutdown. A stale or repeated
   * call is harmless: it is logged and never touches freed memory.
   *
   * emit: add one follow-up event to `event`: `json` (`len` bytes, need not
   * be NUL-terminated) is one JSON object with a string `event_type` and
   * optionally `payload` (an object), `aggregate_id`, `aggregate_type`,
   * `routing_key` (strings); the daemon fills in the envelope. Allowed from
   * any thread until the event is completed (also during er_plugin_handle,
   * before it returns a verdict); the emits are published only if the event
   * is completed with ER_ACK, and dropped otherwise. Limits: 1000 emits and
   * 16 MiB of them per event. Returns ER_OK; ER_E_INVALID (not such an
   * object; the emit is refused, the event is not touched); ER_E_LIMIT (the
   * emit is refused); ER_E_HANDLE (the event is already completed).
   */
  int (*complete)(struct er_event_handle *event, const struct er_result *result);
  int (*emit)(struct er_event_handle *event, const char *json, size_t len);
  void *reserved[6];
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
  /* Version 2: names this event for host->complete and host->emit; the
   * plugin may keep it (unlike the rest of this view) until it completed the
   * event. NULL for a version 1 plugin. */
  struct er_event_handle *handle;
  /* Version 2: the envelope's `timestamp` as written (absent when the event
   * has none). Took two reserved fields: a daemon that predates it leaves
   * them zero, which reads as absent. */
  struct er_str timestamp;
  void *reserved[5];
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
 *
 * Version 2: return ER_PENDING instead to complete the event later with
 * host->complete(event->handle, ...); `result` is then ignored. The event
 * view and everything it points to are still valid only during this call:
 * copy what the later work needs before returning. Until it is completed,
 * the event holds one of the handler's `concurrency` slots but no thread.
 * An event not completed within the handler's `timeout` (default 30s) after
 * this call returned is retried (reason `plugin_timeout`); at shutdown,
 * events still pending after the shutdown timeout are abandoned and the
 * broker redelivers them. After a reload, the old instance stays loaded
 * until its last pending event is completed (or times out), then it is
 * cleaned up. Completing with host->complete and also returning a verdict
 * is a double completion: the first one counts, the other is logged.
 */
ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *event,
                                      struct er_result *result);

/*
 * Destroy the instance. No handle() call is running or will run. Version 2:
 * no event of this instance is pending any more; stop the plugin's own
 * threads here (host functions stay safe to call until cleanup returns).
 * After cleanup returns the host struct is gone: no host function may be
 * called through it. A daemon that abandons events at shutdown (the shutdown
 * timeout passed) exits without calling cleanup.
 */
ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data);

#ifdef __cplusplus
}
#endif

#endif /* EVENT_ROUTER_PLUGIN_H */
