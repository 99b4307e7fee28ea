/* Compiled as strict C11 with -Wall -Wextra -Werror -pedantic: the public
 * header must stay valid C for out-of-tree plugins. */
#include <event_router/plugin.h>

int er_header_check_c(const struct er_host *host, struct er_event_handle *h);
int er_header_check_c(const struct er_host *host, struct er_event_handle *h) {
  struct er_result r = {0};
  r.struct_size = sizeof r;
  r.verdict = ER_ACK;
  if (host->emit(h, "{\"event_type\":\"x\"}", 18) != ER_OK) return ER_E_INVALID;
  return host->complete(h, &r) == ER_OK ? ER_PENDING : ER_E_HANDLE;
}
