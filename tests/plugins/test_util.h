/* Helpers for the test plugins in tests/plugins and for
 * tests/integration/handlers/record_tag.c and record_runs.c: the ABI version
 * answer, flat-JSON lookups, just enough to read a handler's `config:` or a
 * test event's payload (never a real JSON parser), and the record plugins'
 * file and sleep. */
#ifndef ER_TEST_UTIL_H
#define ER_TEST_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* er_plugin_version()'s answer for a plugin of ABI version `want`. */
static int accept_version(int n, const int *versions, int want) {
  for (int i = 0; i < n; ++i)
    if (versions[i] == want) return want;
  return -1;
}

/* A NUL-terminated copy of len bytes. Not strndup: the event body has no NUL
 * after it, and strndup may look one byte past (ASan's strict_string_checks
 * reports that read). */
static char *copy_n(const char *s, size_t len) {
  char *c = (char *)malloc(len + 1);
  if (!c) return NULL;
  memcpy(c, s, len);
  c[len] = 0;
  return c;
}

/* The string value of "key" in a flat JSON object (no escapes in values). */
static int json_string(const char *json, size_t len, const char *key, char *out, size_t out_size) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  char *copy = copy_n(json, len);
  if (!copy) return 0;
  int ok = 0;
  const char *k = strstr(copy, pat);
  const char *colon = k ? strchr(k + strlen(pat), ':') : NULL;
  const char *q = colon ? strchr(colon, '"') : NULL;
  const char *end = q ? strchr(q + 1, '"') : NULL;
  if (end && (size_t)(end - q - 1) < out_size) {
    memcpy(out, q + 1, (size_t)(end - q - 1));
    out[end - q - 1] = 0;
    ok = 1;
  }
  free(copy);
  return ok;
}

static long json_number(const char *json, size_t len, const char *key, long dflt) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  char *copy = copy_n(json, len);
  if (!copy) return dflt;
  long v = dflt;
  const char *k = strstr(copy, pat);
  const char *colon = k ? strchr(k + strlen(pat), ':') : NULL;
  if (colon) v = strtol(colon + 1, NULL, 10);
  free(copy);
  return v;
}

/* A record plugin's config {"file": "/abs/path", "sleep_us": N}: the file
 * opened for appending (one write() per line keeps lines whole) and the sleep
 * per event. On failure, -1 with `who: why` in err. */
struct record_sink {
  int fd;
  long sleep_us;
};

static inline int record_sink_open(struct record_sink *s, const char *config, size_t len, const char *who,
                                   char *err, size_t err_size) {
  char path[4096];
  if (!json_string(config, len, "file", path, sizeof path)) {
    snprintf(err, err_size, "%s: config needs {\"file\": \"/path\"}", who);
    return -1;
  }
  s->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (s->fd < 0) {
    snprintf(err, err_size, "%s: %.400s: %s", who, path, strerror(errno));
    return -1;
  }
  s->sleep_us = json_number(config, len, "sleep_us", 0);
  if (s->sleep_us < 0) s->sleep_us = 0;
  return 0;
}

static inline void sleep_us(long us) {
  struct timespec d = {us / 1000000, (us % 1000000) * 1000};
  while (us > 0 && nanosleep(&d, &d) != 0 && errno == EINTR) {
  }
}

#endif
