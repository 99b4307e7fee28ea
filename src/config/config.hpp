#pragma once
// The validated, immutable configuration. load_config() is the only way to
// make one; everything downstream may assume it is consistent.
#include <chrono>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "config/topic.hpp"

namespace er::config {

using Duration = std::chrono::milliseconds;

// Thrown for every config problem. what() is "file:line:column: message".
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Mark {
  int line = 0;    // 1-based; 0 = unknown
  int column = 0;  // 1-based
};

// `broker.tls`, for amqps:// URLs.
struct TlsConfig {
  std::string ca_file;                   // absolute; default: the system's CA bundle
  std::string cert_file;                 // client certificate (with key_file), optional
  std::string key_file;
  bool verify_peer = true;
  bool verify_hostname = true;
};

struct BrokerConfig {
  std::string url;                       // amqp://user:pass@host:port/vhost (= urls[0])
  std::vector<std::string> urls;         // `url`, or the `urls:` list tried in turn; never empty after load
  Duration heartbeat{std::chrono::seconds(30)};
  Duration reconnect_initial{std::chrono::seconds(1)};  // `reconnect: {initial, max}`
  Duration reconnect_max{std::chrono::seconds(30)};
  // Bound on every broker call made from the event loop (RPC replies, a
  // delivery's frames): a stalled broker costs at most this, then a reconnect.
  Duration rpc_timeout{std::chrono::seconds(10)};
  // How long a settled event's ack may wait for an unsettled one below it, to
  // go out in one `multiple` ack with it; 0 = one ack per event, at once.
  Duration ack_window{std::chrono::milliseconds(10)};
  TlsConfig tls;
};

struct ExchangeConfig {
  std::string name;
  std::string type = "topic";            // topic | direct | fanout | headers
};

// Delayed retries: attempt n (n >= 2) waits min(delay * multiplier^(n-2), max_delay),
// so the first retry waits `delay`.
struct RetryConfig {
  unsigned max_attempts = 5;             // >= 1; 1 = never retry
  Duration delay{std::chrono::seconds(1)};
  double multiplier = 2.0;               // >= 1
  Duration max_delay{std::chrono::minutes(5)};

  // The wait before attempt `next_attempt` (>= 2), without jitter.
  Duration delay_before(unsigned next_attempt) const;
  bool operator==(const RetryConfig& o) const {
    return max_attempts == o.max_attempts && delay == o.delay && multiplier == o.multiplier &&
           max_delay == o.max_delay;
  }
};

enum class HandlerKind { Plugin, Exec, Worker };

// `ordering:` (docs/ordering.md). Aggregate: events with the same aggregate
// id run one at a time, in delivery order; a retry waits in place.
enum class Ordering { None, Aggregate };

// How the daemon writes the envelope of events a handler emits.
enum class EmitStyle { Snake, Camel };

struct HandlerConfig {
  std::string name;
  Mark mark;
  std::vector<TopicPattern> events;      // empty in YAML = not allowed; "#" matches all
  HandlerKind kind = HandlerKind::Plugin;
  unsigned concurrency = 0;              // resolved: never 0 after load (default = queue prefetch)
  RetryConfig retry;                     // resolved: the handler's `retry`, else the queue's
  Ordering ordering = Ordering::None;    // resolved: the handler's `ordering`, else the queue's

  // plugin
  std::string plugin_path;               // absolute, exists
  std::string plugin_config_json = "{}"; // `config:` rendered as JSON

  // exec and worker
  std::vector<std::string> argv;         // argv[0] absolute and executable
  Duration timeout{std::chrono::seconds(30)};    // per event (plugin ABI 2: while pending)
  Duration kill_grace{std::chrono::seconds(5)};  // SIGTERM -> SIGKILL on timeout (worker: after end of input)
  std::vector<std::pair<std::string, std::string>> env;
  std::vector<std::string> inherit_env;

  // worker (docs/worker-protocol.md); `concurrency` above is then
  // processes * per_process, the handler's total.
  unsigned processes = 1;
  unsigned per_process = 0;              // `concurrency:` of a worker: events in flight per process
  Duration start_timeout{std::chrono::seconds(10)};  // spawn to `ready`
  Duration restart_initial{std::chrono::seconds(1)};  // `restart: {initial, max}` backoff
  Duration restart_max{std::chrono::seconds(30)};

  // `emit: {style: snake|camel}`: envelopes of follow-up events.
  EmitStyle emit_style = EmitStyle::Snake;
};

// One x-argument of a queue declare (x-max-length, x-queue-type, ...).
struct QueueArgument {
  enum class Kind { Int, String, Bool } kind = Kind::String;
  std::string key;
  int64_t i = 0;
  std::string s;
  bool b = false;
};

enum class Unhandled { DeadLetter, Ack };

// `type:` of a queue. Quorum makes the queue, its DLQ and its delay queues
// quorum queues, with at-least-once dead-lettering (amqp/topology.hpp).
enum class QueueType { Classic, Quorum };

struct QueueConfig {
  std::string name;
  Mark mark;
  std::vector<std::string> bindings;     // validated as topic patterns
  uint16_t prefetch = 10;
  Unhandled unhandled = Unhandled::DeadLetter;
  std::string dead_letter_queue;         // default "<name>.dlq"
  std::vector<QueueArgument> arguments;              // `arguments:` of the work queue
  std::vector<QueueArgument> dead_letter_arguments;  // `dead_letter_arguments:` of its DLQ
  // `single_active_consumer: true` (or the argument itself): one consumer of
  // all instances gets deliveries; stop() lets go of it only once settled.
  bool single_active_consumer = false;
  QueueType type = QueueType::Classic;   // `type:` classic | quorum
  // `delivery_limit:` (quorum only) the broker dead-letters a message handed
  // back this often (x-delivery-limit): a backstop, see docs/scaling.md.
  int64_t delivery_limit = 20;
  std::vector<HandlerConfig> handlers;   // tried in order
  RetryConfig retry;                     // `retry:` of the queue (defaults above)
  size_t max_message_bytes = 1024 * 1024;  // resolved: the queue's, else the top-level value
  Duration dedupe_ttl{0};                // `dedupe: {ttl: 24h}`; 0 = off
  Ordering ordering = Ordering::None;    // the default of its handlers
  // How old an ordered delivery may get (unacked) and still wait in place
  // for a retry; past it the event is dead-lettered (ordering_hold_exceeded).
  Duration ordering_hold_max{std::chrono::minutes(5)};
  // `crash_loop: {max_crashes}`: a redelivered event the daemon died on this
  // many times is dead-lettered (crash_loop); resolved: the queue's, else the
  // top-level value; 0 = off.
  unsigned crash_max = 3;

  // Every distinct delay any handler of this queue can wait, ascending: one
  // delay queue per step.
  std::vector<Duration> retry_steps() const;
};

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3 };

enum class LogFormat { Text, Json };

// The per-event "handled" line: at info (the default), at debug, or never.
enum class EventLog { Info, Debug, Off };

struct LogConfig {
  LogLevel level = LogLevel::Info;
  LogFormat format = LogFormat::Text;
  EventLog events = EventLog::Info;  // `events:` the level of the line for a handled event
  unsigned sample = 1;               // `sample:` one line per N successes; failures always
};

// `security:` The key that signs the bookkeeping headers of retry and
// dead-letter copies (settle/signer.hpp). Either `copy_key_file: PATH` (its
// bytes as they are, a trailing newline included; relative to the config
// file's folder) or `copy_key_env: VAR` (the variable's value). At least 32
// bytes, at most 4096. Neither: settle::load_or_create_copy_key() uses
// state_dir/copy.key. Instances that consume the same queues need the same key.
struct SecurityConfig {
  std::string copy_key;                  // the key bytes; empty = neither set
  std::string copy_key_file;             // absolute, when set
  std::string copy_key_env;              // the variable's name, when set
};

// `dedupe_store:` where `dedupe:` records successes. Absent: the SQLite file
// in state_dir (per instance). `postgres:` a libpq connection string shared by
// instances (docs/reliability.md#shared-dedupe-store-postgresql).
enum class DedupeUnavailable { Retry, Run };
struct DedupeStoreConfig {
  std::string postgres;                  // empty: SQLite in state_dir
  std::string table = "event_router_dedupe";
  Duration timeout{std::chrono::seconds(2)};  // bound on connecting and on every query
  Duration lease{std::chrono::minutes(5)};    // how long a claim keeps other instances off
  DedupeUnavailable on_unavailable = DedupeUnavailable::Retry;
  bool operator==(const DedupeStoreConfig& o) const {
    return postgres == o.postgres && table == o.table && timeout == o.timeout && lease == o.lease &&
           on_unavailable == o.on_unavailable;
  }
};

struct Config {
  std::string path;                      // the file it was loaded from
  std::string dir;                       // its folder (relative paths resolve here)
  BrokerConfig broker;
  ExchangeConfig exchange;
  std::vector<QueueConfig> queues;
  Duration shutdown_timeout{std::chrono::seconds(30)};
  unsigned plugin_threads = 4;           // threads for blocking plugin handlers (formerly `workers:`)
  size_t max_message_bytes = 1024 * 1024;  // top-level default for queues; sizes like 1MiB, 512KiB or bytes
  std::string schemas_dir;               // `schemas:` (absolute; empty = no validation)
  std::string state_dir = "/var/lib/event-router";  // `state_dir:` (dedupe store)
  // `crash_loop: {max_crashes: 3, ttl: 24h}` (docs/reliability.md#crash-loop-protection).
  unsigned crash_max = 3;                // default of the queues; 0 = off
  Duration crash_ttl{std::chrono::hours(24)};  // a count expires this long after its last crash
  DedupeStoreConfig dedupe_store;
  std::string http_listen;               // `http: {listen: 127.0.0.1:9090}`; empty = no HTTP server
  LogConfig log;
  SecurityConfig security;
  // Accepted but deprecated spellings and the like, "file:line:column: message".
  std::vector<std::string> warnings;
};

// Loads, substitutes ${VAR} / ${VAR:-default}, validates. Throws ConfigError.
Config load_config(const std::string& path);

// Same, from text; `path` is used in messages and `dir` for relative paths.
Config load_config_string(const std::string& text, const std::string& path, const std::string& dir);

// "500ms", "30s", "5m", "1h", or a plain number of seconds (may be fractional).
// Throws std::invalid_argument with a human message.
Duration parse_duration(const std::string& text);

// Expands ${VAR} and ${VAR:-default}. `$$` is a literal '$'. Throws
// std::invalid_argument naming the variable when one is unset without default.
std::string substitute_env(const std::string& text);

// Directories searched for a plugin given by bare file name (no '/'):
// $EVENT_ROUTER_PLUGIN_DIR, <exe dir>/plugins, ER_PLUGIN_INSTALL_DIR.
std::vector<std::string> plugin_search_dirs();

}  // namespace er::config
