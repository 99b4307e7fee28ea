// Compiled as strict C++17 with -Wall -Wextra -Werror -pedantic: the public
// header must stay valid C++ (extern "C", no C-only constructs).
#include <event_router/plugin.h>

int er_header_check_cxx(const er_host* host, er_event_handle* h);
int er_header_check_cxx(const er_host* host, er_event_handle* h) {
  er_result r{};
  r.struct_size = sizeof r;
  r.verdict = ER_ACK;
  // Version 2 took reserved fields: the structs keep their version 1 sizes.
  static_assert(sizeof(er_host) == sizeof(size_t) + 10 * sizeof(void*), "er_host changed size");
  static_assert(sizeof(er_event) == sizeof(size_t) + 9 * sizeof(er_str) + 8 + 8 * sizeof(void*),
                "er_event changed size");
  static_assert(sizeof(er_result) == sizeof(size_t) + 8 + 512 + 8 * sizeof(void*), "er_result changed size");
  if (host->emit(h, "{\"event_type\":\"x\"}", 18) != ER_OK) return ER_E_INVALID;
  return host->complete(h, &r) == ER_OK ? ER_PENDING : ER_E_HANDLE;
}
