#include "dispatch/handler.hpp"

namespace er::dispatch {

const char* verdict_name(Verdict v) {
  switch (v) {
    case Verdict::Ack: return "ack";
    case Verdict::Retry: return "retry";
    case Verdict::DeadLetter: return "dead-letter";
  }
  return "unknown";
}

}  // namespace er::dispatch
