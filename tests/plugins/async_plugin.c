/* Test plugin, ABI version 2: completes events later from a thread of its
 * own. The event body says what to do (a key, optional spaces, a value):
 *   "delay_ms":N      complete N ms after handle() returned (default 0)
 *   "verdict":"retry" / "verdict":"dead_letter"   (default ack)
 *   "emit":N          emit N follow-ups from its thread before completing
 *   "bad_emit":1      also try an emit that is not a JSON object
 *   "double":1        complete twice (the second must be refused)
 *   "never":1         never complete (timeout and shutdown paths)
 *   "sync":1          return the verdict from handle() (emits first)
 *   "early":1         complete inside handle(), then return ER_PENDING
 *   "both":1          complete inside handle() and also return a verdict
 *   EMIT:<json>       (the whole body) emit <json> as given, then return ack
 * Config: {"nonblocking":1} sets ER_PLUGIN_NONBLOCKING; {"log":1} logs
 * "accepted" for each event left pending. Each instance logs
 * the return codes of refused calls through host->log, and the test reads the
 * last ones through async_plugin_codes(). */
#include <event_router/plugin.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct item {
  struct item *next;
  struct timespec due;
  struct er_event_handle *handle;
  int verdict;
  int emits;
  int bad_emit;
  int twice;
};

struct instance {
  const struct er_host *host;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t thread;
  struct item *queue; /* sorted by due time */
  int stop;
  int log_accepted;
  int number; /* 1 for the first instance of the process, then 2, ... */
};

static int instances;

/* Last return codes seen by any instance (read by the unit tests). */
static pthread_mutex_t codes_mu = PTHREAD_MUTEX_INITIALIZER;
static int codes[5]; /* second complete, bad emit, emit after complete, completions, handle calls */

ER_PLUGIN_EXPORT void async_plugin_codes(int out[5]) {
  pthread_mutex_lock(&codes_mu);
  memcpy(out, codes, sizeof codes);
  pthread_mutex_unlock(&codes_mu);
}

static void note(struct instance *in, int slot, const char *what, int rc) {
  char msg[128];
  int n = snprintf(msg, sizeof msg, "%s returned %d", what, rc);
  in->host->log(in->host->ctx, ER_LOG_WARN, msg, (size_t)n);
  pthread_mutex_lock(&codes_mu);
  codes[slot] = rc;
  pthread_mutex_unlock(&codes_mu);
}

/* The text after `key` and any spaces, in a bounded NUL-terminated copy of
 * the body (which is not NUL-terminated). */
static const char *after(const struct er_event *e, const char *key, char *buf, size_t size) {
  size_t n = e->body.len < size - 1 ? e->body.len : size - 1;
  memcpy(buf, e->body.data, n);
  buf[n] = 0;
  const char *p = strstr(buf, key);
  if (!p) return NULL;
  p += strlen(key);
  while (*p == ' ') ++p;
  return p;
}

static long number_after(const struct er_event *e, const char *key, long dflt) {
  char buf[1024];
  const char *p = after(e, key, buf, sizeof buf);
  return p ? strtol(p, NULL, 10) : dflt;
}

static int value_is(const struct er_event *e, const char *key, const char *value) {
  char buf[1024];
  const char *p = after(e, key, buf, sizeof buf);
  return p && strncmp(p, value, strlen(value)) == 0;
}

static void do_emits(struct instance *in, struct er_event_handle *h, int count, int bad) {
  for (int i = 0; i < count; ++i) {
    char json[128];
    int n = snprintf(json, sizeof json, "{ \"event_type\": \"follow.up\", \"payload\": {\"n\": %d} }", i);
    int rc = in->host->emit(h, json, (size_t)n);
    if (rc != ER_OK) note(in, 1, "emit", rc);
  }
  if (bad) note(in, 1, "bad emit", in->host->emit(h, "[1,2]", 5));
}

static void complete(struct instance *in, struct item *it) {
  do_emits(in, it->handle, it->emits, it->bad_emit);
  struct er_result r;
  memset(&r, 0, sizeof r);
  r.struct_size = sizeof r;
  r.verdict = it->verdict;
  if (it->verdict == ER_RETRY) {
    r.retry_delay_ms = 1000;
    snprintf(r.reason, sizeof r.reason, "async retry");
  } else if (it->verdict == ER_DEAD_LETTER) {
    snprintf(r.reason, sizeof r.reason, "async reject");
  }
  int rc = in->host->complete(it->handle, &r);
  pthread_mutex_lock(&codes_mu);
  codes[3]++;
  pthread_mutex_unlock(&codes_mu);
  if (rc != ER_OK) note(in, 0, "first completion", rc);
  if (it->twice) {
    note(in, 0, "second completion", in->host->complete(it->handle, &r));
    note(in, 2, "emit after completion", in->host->emit(it->handle, "{\"event_type\":\"late\"}", 21));
  }
}

static int before(const struct timespec *a, const struct timespec *b) {
  return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static void *run(void *arg) {
  struct instance *in = arg;
  pthread_mutex_lock(&in->mu);
  while (!in->stop) {
    if (!in->queue) {
      pthread_cond_wait(&in->cv, &in->mu);
      continue;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (before(&now, &in->queue->due)) {
      pthread_cond_timedwait(&in->cv, &in->mu, &in->queue->due);
      continue;
    }
    struct item *it = in->queue;
    in->queue = it->next;
    pthread_mutex_unlock(&in->mu);
    complete(in, it);
    free(it);
    pthread_mutex_lock(&in->mu);
  }
  pthread_mutex_unlock(&in->mu);
  return NULL;
}

ER_PLUGIN_EXPORT int er_plugin_version(int n, const int *versions) {
  for (int i = 0; i < n; ++i)
    if (versions[i] == 2) return 2;
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void **user_data, const struct er_host *host, const char *config,
                                    size_t config_len, struct er_plugin_info *info) {
  if (host->struct_size < sizeof *host || !host->complete || !host->emit) {
    snprintf(info->error, sizeof info->error, "the host has no complete/emit");
    return 1;
  }
  struct instance *in = calloc(1, sizeof *in);
  if (!in) return 1;
  in->host = host;
  pthread_mutex_init(&in->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&in->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (pthread_create(&in->thread, NULL, run, in) != 0) {
    free(in);
    return 1;
  }
  info->flags = ER_PLUGIN_CONCURRENT;
  if (config_len && strstr(config, "\"nonblocking\":1")) info->flags |= ER_PLUGIN_NONBLOCKING;
  in->log_accepted = config_len && strstr(config, "\"log\":1");
  in->number = ++instances; /* init and cleanup never run concurrently */
  if (in->log_accepted) {
    char msg[64];
    int n = snprintf(msg, sizeof msg, "instance %d started", in->number);
    host->log(host->ctx, ER_LOG_INFO, msg, (size_t)n);
  }
  *user_data = in;
  return 0;
}

ER_PLUGIN_EXPORT int er_plugin_handle(void *user_data, const struct er_event *e, struct er_result *r) {
  struct instance *in = user_data;
  pthread_mutex_lock(&codes_mu);
  codes[4]++;
  pthread_mutex_unlock(&codes_mu);
  if (e->body.len >= 5 && memcmp(e->body.data, "EMIT:", 5) == 0) {
    note(in, 1, "raw emit", in->host->emit(e->handle, e->body.data + 5, e->body.len - 5));
    return 0;
  }
  int verdict = value_is(e, "\"verdict\":", "\"retry\"")         ? ER_RETRY
                : value_is(e, "\"verdict\":", "\"dead_letter\"") ? ER_DEAD_LETTER
                                                                 : ER_ACK;
  int emits = (int)number_after(e, "\"emit\":", 0);
  if (number_after(e, "\"sync\":", 0)) {
    do_emits(in, e->handle, emits, 0);
    r->verdict = verdict;
    return 0;
  }
  if (in->log_accepted) in->host->log(in->host->ctx, ER_LOG_INFO, "accepted", 8);
  if (number_after(e, "\"never\":", 0)) return ER_PENDING;

  /* Everything the later work needs is copied out of the view here. */
  struct item *it = calloc(1, sizeof *it);
  if (!it) return 1;
  it->handle = e->handle;
  it->verdict = verdict;
  it->emits = emits;
  it->bad_emit = number_after(e, "\"bad_emit\":", 0);
  it->twice = number_after(e, "\"double\":", 0);
  if (number_after(e, "\"early\":", 0) || number_after(e, "\"both\":", 0)) {
    complete(in, it);
    free(it);
    return number_after(e, "\"both\":", 0) ? 0 : ER_PENDING;
  }
  long delay = number_after(e, "\"delay_ms\":", 0);
  clock_gettime(CLOCK_MONOTONIC, &it->due);
  it->due.tv_sec += delay / 1000;
  it->due.tv_nsec += (delay % 1000) * 1000000L;
  if (it->due.tv_nsec >= 1000000000L) {
    it->due.tv_sec++;
    it->due.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&in->mu);
  struct item **p = &in->queue;
  while (*p && !before(&it->due, &(*p)->due)) p = &(*p)->next;
  it->next = *p;
  *p = it;
  pthread_cond_signal(&in->cv);
  pthread_mutex_unlock(&in->mu);
  return ER_PENDING;
}

/* Stops the thread; events still queued are never completed (the daemon
 * only cleans up with events pending when it abandoned them). */
ER_PLUGIN_EXPORT void er_plugin_cleanup(void *user_data) {
  struct instance *in = user_data;
  pthread_mutex_lock(&in->mu);
  in->stop = 1;
  pthread_cond_signal(&in->cv);
  pthread_mutex_unlock(&in->mu);
  pthread_join(in->thread, NULL);
  if (in->log_accepted) { /* the host is valid until cleanup returns */
    char msg[64];
    int n = snprintf(msg, sizeof msg, "instance %d cleaned up", in->number);
    in->host->log(in->host->ctx, ER_LOG_INFO, msg, (size_t)n);
  }
  while (in->queue) {
    struct item *it = in->queue;
    in->queue = it->next;
    free(it);
  }
  pthread_cond_destroy(&in->cv);
  pthread_mutex_destroy(&in->mu);
  free(in);
}
