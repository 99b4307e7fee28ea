#include "dedupe/libpq.hpp"

#include <dlfcn.h>

#include <stdexcept>
#include <string>

namespace er::dedupe {
namespace {

// The soname of Debian 12's libpq5 (the ABI has been stable since 8.x).
constexpr const char* kLibPq = "libpq.so.5";

LibPq load() {
  void* h = ::dlopen(kLibPq, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = ::dlerror();
    throw std::runtime_error(std::string("dedupe_store: cannot load ") + kLibPq + " (install libpq5): " +
                             (e ? e : "dlopen failed"));
  }
  LibPq l{};
  auto sym = [h](const char* name) {
    void* p = ::dlsym(h, name);
    if (!p) throw std::runtime_error(std::string("dedupe_store: ") + kLibPq + " lacks " + name + " (libpq 14 or newer needed)");
    return p;
  };
  l.PQclear = reinterpret_cast<decltype(l.PQclear)>(sym("PQclear"));
  l.PQcmdTuples = reinterpret_cast<decltype(l.PQcmdTuples)>(sym("PQcmdTuples"));
  l.PQconnectPoll = reinterpret_cast<decltype(l.PQconnectPoll)>(sym("PQconnectPoll"));
  l.PQconnectStart = reinterpret_cast<decltype(l.PQconnectStart)>(sym("PQconnectStart"));
  l.PQconsumeInput = reinterpret_cast<decltype(l.PQconsumeInput)>(sym("PQconsumeInput"));
  l.PQenterPipelineMode = reinterpret_cast<decltype(l.PQenterPipelineMode)>(sym("PQenterPipelineMode"));
  l.PQerrorMessage = reinterpret_cast<decltype(l.PQerrorMessage)>(sym("PQerrorMessage"));
  l.PQfinish = reinterpret_cast<decltype(l.PQfinish)>(sym("PQfinish"));
  l.PQflush = reinterpret_cast<decltype(l.PQflush)>(sym("PQflush"));
  l.PQgetResult = reinterpret_cast<decltype(l.PQgetResult)>(sym("PQgetResult"));
  l.PQgetlength = reinterpret_cast<decltype(l.PQgetlength)>(sym("PQgetlength"));
  l.PQgetvalue = reinterpret_cast<decltype(l.PQgetvalue)>(sym("PQgetvalue"));
  l.PQisBusy = reinterpret_cast<decltype(l.PQisBusy)>(sym("PQisBusy"));
  l.PQntuples = reinterpret_cast<decltype(l.PQntuples)>(sym("PQntuples"));
  l.PQpipelineSync = reinterpret_cast<decltype(l.PQpipelineSync)>(sym("PQpipelineSync"));
  l.PQresultErrorMessage = reinterpret_cast<decltype(l.PQresultErrorMessage)>(sym("PQresultErrorMessage"));
  l.PQresultStatus = reinterpret_cast<decltype(l.PQresultStatus)>(sym("PQresultStatus"));
  l.PQsendQuery = reinterpret_cast<decltype(l.PQsendQuery)>(sym("PQsendQuery"));
  l.PQsendQueryPrepared = reinterpret_cast<decltype(l.PQsendQueryPrepared)>(sym("PQsendQueryPrepared"));
  l.PQsetNoticeProcessor = reinterpret_cast<decltype(l.PQsetNoticeProcessor)>(sym("PQsetNoticeProcessor"));
  l.PQsetnonblocking = reinterpret_cast<decltype(l.PQsetnonblocking)>(sym("PQsetnonblocking"));
  l.PQsocket = reinterpret_cast<decltype(l.PQsocket)>(sym("PQsocket"));
  l.PQstatus = reinterpret_cast<decltype(l.PQstatus)>(sym("PQstatus"));
  return l;  // the handle stays open for the life of the process
}

}  // namespace

const LibPq& libpq() {
  static const LibPq l = load();  // a throw leaves it unset: the next call tries again
  return l;
}

}  // namespace er::dedupe
