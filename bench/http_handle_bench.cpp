// The http plugin's handle() alone: the CPU one call takes on the daemon's
// thread (checking the header fields, writing the request into one buffer,
// handing it to the plugin's io thread). bench/http.sh adds it to the plugin
// thread's CPU per event; the endpoint here accepts and never answers, so the
// io thread's work is not counted and requests only queue.
//   make -C build er_http_handle_bench http_plugin &&
//   build/er_http_handle_bench build/plugins/libhttp_plugin.so [N] [ROUNDS]
#include <arpa/inet.h>
#include <dlfcn.h>
#include <event_router/plugin.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

namespace {

double thread_cpu_us() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

void host_log(void*, int, const char*, size_t) {}
int host_complete(er_event_handle*, const er_result*) { return ER_OK; }
int host_emit(er_event_handle*, const char*, size_t) { return ER_OK; }

er_str str(const std::string& s) { return er_str{s.data(), s.size()}; }

template <typename F>
F sym(void* lib, const char* name) {
  void* p = dlsym(lib, name);
  if (!p) {
    std::fprintf(stderr, "%s: %s\n", name, dlerror());
    std::exit(1);
  }
  return reinterpret_cast<F>(p);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s libhttp_plugin.so [N] [ROUNDS]\n", argv[0]);
    return 2;
  }
  const int n = argc > 2 ? std::atoi(argv[2]) : 50000;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 5;

  // A listener that is never accepted from: the connection completes in the
  // backlog and the requests wait in the pool's queue.
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  if (lfd < 0 || bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(lfd, 8) != 0 ||
      getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &alen) != 0) {
    std::perror("listen");
    return 1;
  }

  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
  auto version = sym<int (*)(int, const int*)>(lib, "er_plugin_version");
  auto init = sym<int (*)(void**, const er_host*, const char*, size_t, er_plugin_info*)>(lib, "er_plugin_init");
  auto handle = sym<int (*)(void*, const er_event*, er_result*)>(lib, "er_plugin_handle");
  auto cleanup = sym<void (*)(void*)>(lib, "er_plugin_cleanup");
  const int versions[] = {1, 2};
  if (version(2, versions) != 2) return 1;

  er_host host{};
  host.struct_size = sizeof host;
  host.log = host_log;
  host.complete = host_complete;
  host.emit = host_emit;
  const std::string conf = "{\"url\": \"http://127.0.0.1:" + std::to_string(ntohs(a.sin_port)) +
                           "/events/{event_type}\", \"max_connections\": 1, \"timeout\": \"1h\"}";
  er_plugin_info info{};
  info.struct_size = sizeof info;
  void* user = nullptr;
  if (init(&user, &host, conf.data(), conf.size(), &info) != 0) {
    std::fprintf(stderr, "init: %s\n", info.error);
    return 1;
  }

  // An event of the shipped kind (bench kit's size, 381 bytes on average).
  const std::string body =
      "{\"event_id\":\"5f0c6a52-2b1e-4c1a-9d7e-0d3b8c1f2a77\",\"event_type\":\"draft.created\","
      "\"aggregate_id\":\"d-0000012345\",\"aggregate_type\":\"draft\",\"timestamp\":\"2026-12-01T18:00:00.000000Z\","
      "\"version\":1,\"correlation_id\":\"c0ffee00-1111-2222-3333-444455556666\",\"payload\":{\"title\":"
      "\"A benchmark draft\",\"speaker_id\":\"s-42\",\"sections\":[\"intro\",\"body\",\"conclusion\"],"
      "\"word_count\":1234,\"tags\":[\"bench\",\"http\"],\"language\":\"en\",\"status\":\"created\"}}";
  const std::string id = "5f0c6a52-2b1e-4c1a-9d7e-0d3b8c1f2a77", type = "draft.created",
                    corr = "c0ffee00-1111-2222-3333-444455556666", ts = "2026-12-01T18:00:00.000000Z",
                    queue = "draft.events", rk = "draft.created", ex = "draft-genie.events";
  er_event ev{};
  ev.struct_size = sizeof ev;
  ev.body = str(body);
  ev.event_type = str(type);
  ev.event_id = str(id);
  ev.correlation_id = str(corr);
  ev.routing_key = str(rk);
  ev.exchange = str(ex);
  ev.queue = str(queue);
  ev.timestamp = str(ts);
  ev.attempt = 1;

  std::vector<double> per;
  uintptr_t next = 1;
  for (int r = 0; r < rounds; ++r) {
    const double t0 = thread_cpu_us();
    for (int i = 0; i < n; ++i) {
      ev.handle = reinterpret_cast<er_event_handle*>(next++);
      er_result res{};
      res.struct_size = sizeof res;
      if (handle(user, &ev, &res) != ER_PENDING) {
        std::fprintf(stderr, "handle() did not take the event: %s\n", res.reason);
        return 1;
      }
    }
    per.push_back((thread_cpu_us() - t0) / n);
  }
  cleanup(user);
  std::sort(per.begin(), per.end());
  std::printf("handle: %.2f us/event (median of %d rounds x %d; min %.2f, max %.2f)\n", per[per.size() / 2], rounds, n,
              per.front(), per.back());
  close(lfd);
  return 0;
}
