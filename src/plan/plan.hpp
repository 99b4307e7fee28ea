#pragma once
// `event-router plan`: compares the topology the config wants
// (amqp::desired_topology, the same one the daemon declares) with the live
// broker, through the management HTTP API, and prints the difference like a
// diff: `+` missing, `~` differing (old → new), `-` stale bindings.
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "amqp/topology.hpp"

namespace er::plan {

// What the management API answered for the objects the config owns, as
// JSON texts. A missing entry (nullopt) is a 404: the object does not exist.
struct Observed {
  std::optional<std::string> exchange;                        // GET /api/exchanges/{vhost}/{exchange}
  std::map<std::string, std::optional<std::string>> queues;   // GET /api/queues/{vhost}/{queue}, per queue
  std::string bindings = "[]";                                // GET /api/exchanges/{vhost}/{exchange}/bindings/source
};

enum class Sign { Add = '+', Change = '~', Stale = '-' };

struct Change {
  Sign sign;
  std::string subject;               // "queue 'q'", "binding 'ex' → 'q' key 'a.*'"
  std::vector<std::string> details;  // "type: classic → quorum"
};

struct Plan {
  std::vector<Change> changes;
  size_t exchanges = 0, queues = 0, bindings = 0;  // what the config owns (compared)
  size_t count(Sign s) const;
  bool in_sync() const { return changes.empty(); }
};

// Throws ManagementError when a JSON text is not what the API answers.
Plan compare(const amqp::Topology& want, const Observed& seen);

// The diff lines and a closing summary (what to do about each kind).
std::string render(const Plan& plan);

// argv[0] is "plan". Exit status: 0 in sync, 2 not in sync, 1 error (usage
// errors included: 2 must only ever mean "differs").
int main(int argc, char** argv);

}  // namespace er::plan
