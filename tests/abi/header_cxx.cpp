// Compiled as strict C++17 with -Wall -Wextra -Werror -pedantic: the public
// header must stay valid C++ (extern "C", no C-only constructs).
#include <event_router/plugin.h>

int er_header_check_cxx(const er_host* host, er_event_handle* h);
int er_header_check_cxx(const er_host* host, er_event_handle* h) {
  er_result r{};
  r.struct_size = sizeof r;
  r.verdict = ER_ACK;
  static_assert(sizeof(er_host) >= sizeof(void*) * 11, "er_host keeps its size");
  if (host->emit(h, "{\"event_type\":\"x\"}", 18) != ER_OK) return ER_E_INVALID;
  return host->complete(h, &r) == ER_OK ? ER_PENDING : ER_E_HANDLE;
}
