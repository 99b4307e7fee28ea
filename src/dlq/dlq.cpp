#include "dlq/dlq.hpp"

#include <amqp.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <stdexcept>
#include <vector>

#include "amqp/connection.hpp"
#include "config/config.hpp"
#include "event/envelope.hpp"
#include "settle/settle.hpp"
#include "util/log.hpp"
#include "util/args.hpp"
#include "util/time.hpp"

namespace er::dlq {

namespace {

using amqp::bytes;
using amqp::view;

const char* kUsage =
    "usage: event-router dlq list   --queue Q [--config FILE] [--count N]\n"
    "       event-router dlq replay --queue Q [--config FILE] [--event-id ID] [--count N]\n"
    "                               [--to-queue]\n"
    "\n"
    "Inspect and replay the dead-letter queue of a work queue.\n"
    "\n"
    "  list     print the dead-lettered events, oldest first, without removing\n"
    "           them: event id, type, reason, attempts, last failure, detail;\n"
    "           a dead letter the broker made (a quorum queue's delivery_limit)\n"
    "           shows the reason, queue and time of its x-death header\n"
    "  replay   republish dead-lettered events to the config's exchange with\n"
    "           their original routing key, without the failure headers (the\n"
    "           attempt count starts again at 1), and remove each from the\n"
    "           dead-letter queue once the broker has confirmed and routed it;\n"
    "           an event the broker returns (no queue bound) or refuses stays\n"
    "           in the dead-letter queue\n"
    "\n"
    "  -q, --queue Q        a work queue of the config (its dead_letter_queue is\n"
    "                       used), or the dead-letter queue's own name\n"
    "  -c, --config FILE    the daemon's config, for the broker URL and queues\n"
    "                       (default: $EVENT_ROUTER_CONFIG, else\n"
    "                       /etc/event-router/router.yaml)\n"
    "  -n, --count N        list: at most N events (default all, up to 10000);\n"
    "                       replay: at most N events (default all)\n"
    "  -e, --event-id ID    replay: only events with this id (envelope event id,\n"
    "                       else the message_id property); others stay in place\n"
    "      --to-queue       replay: straight into the queue the event failed in\n"
    "                       (its x-original-queue header, else x-death's queue,\n"
    "                       which must be a queue\n"
    "                       of the config), not to the exchange: other queues\n"
    "                       bound to its routing key do not get it again\n"
    "  -h, --help           print this help and exit\n"
    "\n"
    "Exit status: 0 ok, 1 failure (or not every requested event replayed), 2 usage.\n";

constexpr size_t kListCap = 10000;
constexpr size_t kDetailWidth = 80;
constexpr size_t kFieldWidth = 64;  // ids, types and the other columns
constexpr amqp_channel_t kCheckChannel = 1;  // passive declares (a 404 closes it)
constexpr amqp_channel_t kWorkChannel = 2;   // basic.get, and replay's confirmed publishes
// Every wait on the broker ends: RPCs (amqp_set_rpc_timeout), message
// bodies, confirms.
constexpr std::chrono::seconds kBrokerTimeout{30};

using util::UsageError;
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string command;
  std::string queue;
  std::string config_path;
  std::string event_id;
  bool has_event_id = false;
  bool to_queue = false;
  size_t count = 0;  // 0 = no limit given
};

size_t parse_count(const std::string& s) {
  size_t pos = 0;
  unsigned long long n = 0;
  try {
    if (s.empty() || s[0] == '-' || s[0] == '+') throw std::invalid_argument(s);
    n = std::stoull(s, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos != s.size() || n == 0) throw UsageError("--count wants a positive whole number, got '" + s + "'");
  return static_cast<size_t>(n);
}

// Returns nullopt for --help.
std::optional<Args> parse_args(int argc, char** argv) {
  Args a;
  const char* env = std::getenv("EVENT_ROUTER_CONFIG");
  a.config_path = env && *env ? env : "/etc/event-router/router.yaml";
  bool has_queue = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") return std::nullopt;
    if (i == 1 && !arg.empty() && arg[0] != '-') {
      if (arg != "list" && arg != "replay") throw UsageError("unknown command '" + arg + "' (list or replay)");
      a.command = arg;
      continue;
    }
    util::Option opt(argc, argv, i);
    const std::string& name = opt.name();
    auto take = [&] { return opt.value(); };
    if (name == "-q" || name == "--queue") {
      a.queue = take();
      has_queue = true;
    } else if (name == "-c" || name == "--config") {
      a.config_path = take();
    } else if (name == "-n" || name == "--count") {
      a.count = parse_count(take());
    } else if (name == "-e" || name == "--event-id") {
      a.event_id = take();
      a.has_event_id = true;
    } else if (name == "--to-queue" && name == arg) {
      a.to_queue = true;
    } else {
      throw UsageError("unknown argument '" + arg + "'");
    }
  }
  if (a.command.empty()) throw UsageError("missing command (list or replay)");
  if (!has_queue || a.queue.empty()) throw UsageError("missing --queue Q");
  if (a.has_event_id && a.command != "replay") throw UsageError("--event-id is only for replay");
  if (a.to_queue && a.command != "replay") throw UsageError("--to-queue is only for replay");
  if (a.has_event_id && a.event_id.empty()) throw UsageError("--event-id must not be empty");
  return a;
}

// --- what to work on --------------------------------------------------------

struct Target {
  std::string work_queue;
  std::string dlq;
  std::string exchange;  // the config's: the only one replay publishes to
  std::vector<std::string> queues;  // the config's: the only ones --to-queue publishes to
  std::string masked_url;
};

Target resolve(const config::Config& cfg, const std::string& q) {
  Target t;
  t.exchange = cfg.exchange.name;
  for (const auto& qc : cfg.queues) t.queues.push_back(qc.name);
  t.masked_url = log::mask_url(cfg.broker.url);
  for (const auto& qc : cfg.queues) {
    if (qc.name == q || qc.dead_letter_queue == q) {
      t.work_queue = qc.name;
      t.dlq = qc.dead_letter_queue;
      return t;
    }
  }
  std::string known;
  for (const auto& qc : cfg.queues) known += (known.empty() ? "" : ", ") + qc.name + " (" + qc.dead_letter_queue + ")";
  throw Failure("queue '" + q + "' is not in " + cfg.path + "; its queues (dead-letter queues) are: " +
                (known.empty() ? "none" : known));
}

// --- small AMQP helpers -------------------------------------------------------

int server_code(const amqp_rpc_reply_t& r) {
  if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION) return 0;
  if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) return static_cast<amqp_channel_close_t*>(r.reply.decoded)->reply_code;
  if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
    return static_cast<amqp_connection_close_t*>(r.reply.decoded)->reply_code;
  return 0;
}

// Passive declares on kCheckChannel. A 404 closes that channel; it is
// acknowledged and reopened so the next check can use it.
class Checker {
 public:
  explicit Checker(amqp::Connection& conn) : conn_(conn) { conn_.open_channel(kCheckChannel); }

  // Ready messages, or nullopt when the queue does not exist.
  std::optional<uint32_t> queue_depth(const std::string& name) {
    auto* ok = amqp_queue_declare(conn_.get(), kCheckChannel, bytes(name), /*passive*/ 1, 0, 0, 0, amqp_empty_table);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(conn_.get());
    if (not_found(r, "checking queue '" + name + "'")) return std::nullopt;
    return ok->message_count;
  }

  bool exchange_exists(const std::string& name) {
    if (name.empty()) return true;  // the default exchange always exists
    auto it = exchanges_.find(name);
    if (it != exchanges_.end()) return it->second;
    amqp_exchange_declare(conn_.get(), kCheckChannel, bytes(name), bytes("topic"), /*passive*/ 1, 0, 0, 0,
                          amqp_empty_table);
    bool exists = !not_found(amqp_get_rpc_reply(conn_.get()), "checking exchange '" + name + "'");
    exchanges_[name] = exists;
    return exists;
  }

 private:
  // True for a 404 (after reopening the channel); throws on other errors.
  bool not_found(const amqp_rpc_reply_t& r, const std::string& context) {
    if (r.reply_type == AMQP_RESPONSE_NORMAL) return false;
    if (server_code(r) == AMQP_NOT_FOUND && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
      amqp_channel_close_ok_t close_ok;
      if (amqp_send_method(conn_.get(), kCheckChannel, AMQP_CHANNEL_CLOSE_OK_METHOD, &close_ok) != AMQP_STATUS_OK)
        throw Failure(context + ": connection lost");
      conn_.open_channel(kCheckChannel);
      return true;
    }
    throw Failure(amqp::describe_reply(r, context));
  }

  amqp::Connection& conn_;
  std::map<std::string, bool> exchanges_;
};

struct MessageGuard {
  amqp_message_t msg{};
  bool owned = false;
  ~MessageGuard() {
    if (owned) amqp_destroy_message(&msg);
  }
};

using Clock = std::chrono::steady_clock;

// Time left until `deadline`, as rabbitmq-c wants it (0 once past).
timeval time_left(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline - Clock::now());
  if (left.count() < 0) left = std::chrono::microseconds(0);
  return timeval{static_cast<time_t>(left.count() / 1000000), static_cast<suseconds_t>(left.count() % 1000000)};
}

// One frame before `deadline`; throws on timeout or a lost connection.
amqp_frame_t wait_frame(amqp::Connection& conn, Clock::time_point deadline, const std::string& what) {
  amqp_frame_t frame;
  timeval tv = time_left(deadline);
  int rc = amqp_simple_wait_frame_noblock(conn.get(), &frame, &tv);
  if (rc == AMQP_STATUS_TIMEOUT)
    throw Failure(what + ": no answer from the broker within " + std::to_string(kBrokerTimeout.count()) + "s");
  if (rc != AMQP_STATUS_OK) throw Failure(what + ": " + amqp_error_string2(rc));
  return frame;
}

amqp_bytes_t clone_bytes(amqp_bytes_t b, amqp_pool_t* pool) {
  amqp_bytes_t out{0, nullptr};
  if (b.len == 0) return out;
  amqp_pool_alloc_bytes(pool, b.len, &out);
  if (!out.bytes) throw std::bad_alloc();
  std::memcpy(out.bytes, b.bytes, b.len);
  return out;
}

// The content (header and body frames) that follows basic.get-ok or
// basic.return on `ch`, into `m`. Like amqp_read_message(), which has no
// time bound, but every frame must come before `deadline`.
void read_content(amqp::Connection& conn, amqp_channel_t ch, MessageGuard& m, Clock::time_point deadline,
                  const std::string& what) {
  // connection.blocked / unblocked may come in between (we asked for them).
  auto next = [&] {
    for (;;) {
      amqp_frame_t f = wait_frame(conn, deadline, what);
      bool blocking = f.channel == 0 && f.frame_type == AMQP_FRAME_METHOD &&
                      (f.payload.method.id == AMQP_CONNECTION_BLOCKED_METHOD ||
                       f.payload.method.id == AMQP_CONNECTION_UNBLOCKED_METHOD);
      if (!blocking) return f;
    }
  };
  amqp_frame_t f = next();
  if (f.channel != ch || f.frame_type != AMQP_FRAME_HEADER)
    throw Failure(what + ": unexpected frame from the broker (type " + std::to_string(f.frame_type) + ")");
  init_amqp_pool(&m.msg.pool, 4096);
  m.owned = true;  // amqp_destroy_message() frees the pool and the body
  // The decoded header lives in the connection's buffers: copy what we keep.
  const auto* src = static_cast<const amqp_basic_properties_t*>(f.payload.properties.decoded);
  amqp_basic_properties_t& p = m.msg.properties;
  p = *src;
  // Unflagged fields are not decoded (garbage): copy only the flagged ones.
  const std::pair<amqp_flags_t, amqp_bytes_t*> fields[] = {
      {AMQP_BASIC_CONTENT_TYPE_FLAG, &p.content_type}, {AMQP_BASIC_CONTENT_ENCODING_FLAG, &p.content_encoding},
      {AMQP_BASIC_CORRELATION_ID_FLAG, &p.correlation_id}, {AMQP_BASIC_REPLY_TO_FLAG, &p.reply_to},
      {AMQP_BASIC_EXPIRATION_FLAG, &p.expiration}, {AMQP_BASIC_MESSAGE_ID_FLAG, &p.message_id},
      {AMQP_BASIC_TYPE_FLAG, &p.type}, {AMQP_BASIC_USER_ID_FLAG, &p.user_id}, {AMQP_BASIC_APP_ID_FLAG, &p.app_id},
      {AMQP_BASIC_CLUSTER_ID_FLAG, &p.cluster_id}};
  for (const auto& [flag, b] : fields) *b = (p._flags & flag) ? clone_bytes(*b, &m.msg.pool) : amqp_empty_bytes;
  if (p._flags & AMQP_BASIC_HEADERS_FLAG) {
    if (amqp_table_clone(&src->headers, &p.headers, &m.msg.pool) != AMQP_STATUS_OK) throw std::bad_alloc();
  }
  size_t size = static_cast<size_t>(f.payload.properties.body_size);
  m.msg.body = amqp_bytes_malloc(size);
  if (size && !m.msg.body.bytes) throw std::bad_alloc();
  size_t have = 0;
  while (have < size) {
    f = next();
    if (f.channel != ch || f.frame_type != AMQP_FRAME_BODY)
      throw Failure(what + ": unexpected frame from the broker (type " + std::to_string(f.frame_type) + ")");
    amqp_bytes_t part = f.payload.body_fragment;
    if (part.len > size - have) throw Failure(what + ": the body is longer than announced");
    std::memcpy(static_cast<char*>(m.msg.body.bytes) + have, part.bytes, part.len);
    have += part.len;
  }
}

// basic.get (no_ack=0) of one message on `ch`: false when the queue is empty.
bool get_one(amqp::Connection& conn, amqp_channel_t ch, const std::string& queue, uint64_t* tag, MessageGuard& m) {
  amqp_rpc_reply_t r = amqp_basic_get(conn.get(), ch, bytes(queue), /*no_ack*/ 0);
  amqp::check_reply(r, "getting a message from '" + queue + "'");
  if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD) return false;
  *tag = static_cast<amqp_basic_get_ok_t*>(r.reply.decoded)->delivery_tag;
  read_content(conn, ch, m, Clock::now() + kBrokerTimeout, "reading a message from '" + queue + "'");
  return true;
}

const amqp_field_value_t* header(const amqp_basic_properties_t& p, std::string_view key) {
  if (!(p._flags & AMQP_BASIC_HEADERS_FLAG)) return nullptr;
  for (int i = 0; i < p.headers.num_entries; ++i)
    if (view(p.headers.entries[i].key) == key) return &p.headers.entries[i].value;
  return nullptr;
}

std::optional<std::string> header_text(const amqp_basic_properties_t& p, std::string_view key) {
  const amqp_field_value_t* v = header(p, key);
  if (!v) return std::nullopt;
  switch (v->kind) {
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: return std::string(view(v->value.bytes));
    case AMQP_FIELD_KIND_I8: return std::to_string(v->value.i8);
    case AMQP_FIELD_KIND_U8: return std::to_string(v->value.u8);
    case AMQP_FIELD_KIND_I16: return std::to_string(v->value.i16);
    case AMQP_FIELD_KIND_U16: return std::to_string(v->value.u16);
    case AMQP_FIELD_KIND_I32: return std::to_string(v->value.i32);
    case AMQP_FIELD_KIND_U32: return std::to_string(v->value.u32);
    case AMQP_FIELD_KIND_I64: return std::to_string(v->value.i64);
    case AMQP_FIELD_KIND_U64: return std::to_string(v->value.u64);
    case AMQP_FIELD_KIND_TIMESTAMP: return std::to_string(v->value.u64);
    default: return std::string("?");
  }
}

// A dead letter the broker made itself (delivery_limit, rejected, expired,
// maxlen) carries no reason header of ours, only the broker's x-death: an
// array of tables, the newest death first. Like every header it may be forged
// by a publisher: it is only shown, and used where x-original-* would be.
struct BrokerDeath {
  std::string reason, queue, first_routing_key;
  int64_t count = 0;
  std::optional<uint64_t> time;  // seconds since the epoch
};

std::optional<BrokerDeath> broker_death(const amqp_basic_properties_t& p) {
  const amqp_field_value_t* v = header(p, "x-death");
  if (!v || v->kind != AMQP_FIELD_KIND_ARRAY || v->value.array.num_entries == 0) return std::nullopt;
  const amqp_array_t& deaths = v->value.array;
  auto field = [](const amqp_table_t& t, std::string_view key) -> const amqp_field_value_t* {
    for (int i = 0; i < t.num_entries; ++i)
      if (view(t.entries[i].key) == key) return &t.entries[i].value;
    return nullptr;
  };
  auto text = [&](const amqp_table_t& t, std::string_view key) {
    const amqp_field_value_t* f = field(t, key);
    bool str = f && (f->kind == AMQP_FIELD_KIND_UTF8 || f->kind == AMQP_FIELD_KIND_BYTES);
    return str ? std::string(view(f->value.bytes)) : std::string();
  };
  const amqp_field_value_t& newest = deaths.entries[0];
  if (newest.kind != AMQP_FIELD_KIND_TABLE) return std::nullopt;
  const amqp_table_t& t = newest.value.table;
  BrokerDeath d;
  d.reason = text(t, "reason");
  d.queue = text(t, "queue");
  if (const auto* c = field(t, "count"); c && c->kind == AMQP_FIELD_KIND_I64) d.count = c->value.i64;
  if (const auto* w = field(t, "time"); w && w->kind == AMQP_FIELD_KIND_TIMESTAMP) d.time = w->value.u64;
  // The oldest death holds the routing key the event was published with.
  const amqp_field_value_t& oldest = deaths.entries[deaths.num_entries - 1];
  if (oldest.kind == AMQP_FIELD_KIND_TABLE) {
    const amqp_field_value_t* keys = field(oldest.value.table, "routing-keys");
    if (keys && keys->kind == AMQP_FIELD_KIND_ARRAY && keys->value.array.num_entries > 0) {
      const amqp_field_value_t& k = keys->value.array.entries[0];
      if (k.kind == AMQP_FIELD_KIND_UTF8 || k.kind == AMQP_FIELD_KIND_BYTES)
        d.first_routing_key = std::string(view(k.value.bytes));
    }
  }
  if (d.reason.empty()) return std::nullopt;
  return d;
}

// The routing key and queue the event came from: our x-original-* headers,
// else (a dead letter the broker made) its x-death.
std::optional<std::string> original_routing_key(const amqp_basic_properties_t& p) {
  if (auto rk = header_text(p, settle::kOriginalRoutingKey)) return rk;
  if (auto d = broker_death(p); d && !d->first_routing_key.empty()) return d->first_routing_key;
  return std::nullopt;
}

std::optional<std::string> original_queue(const amqp_basic_properties_t& p) {
  if (auto q = header_text(p, settle::kOriginalQueue)) return q;
  if (auto d = broker_death(p); d && !d->queue.empty()) return d->queue;
  return std::nullopt;
}

struct Identity {
  std::string id;
  std::string type;
};

// The envelope's id and type; else the message_id / type properties.
Identity identify(const amqp_message_t& m) {
  Identity out;
  std::string rk = original_routing_key(m.properties).value_or("");
  event::Envelope env;
  std::string detail;
  if (event::decode(static_cast<const char*>(m.body.bytes), m.body.len, rk, env, detail) == event::DecodeStatus::Ok) {
    out.id = env.event_id;
    out.type = env.event_type;
  }
  const auto& p = m.properties;
  if (out.id.empty() && (p._flags & AMQP_BASIC_MESSAGE_ID_FLAG)) out.id = std::string(view(p.message_id));
  if (out.type.empty() && (p._flags & AMQP_BASIC_TYPE_FLAG)) out.type = std::string(view(p.type));
  if (out.type.empty()) out.type = rk;
  return out;
}

// The properties of the replayed copy: all of the original's, minus the
// failure headers.
class ReplayProperties {
 public:
  explicit ReplayProperties(const amqp_basic_properties_t& p) : props_(p) {
    if (!(p._flags & AMQP_BASIC_HEADERS_FLAG)) return;
    for (int i = 0; i < p.headers.num_entries; ++i)
      if (!is_failure_header(view(p.headers.entries[i].key))) entries_.push_back(p.headers.entries[i]);
    props_.headers.num_entries = static_cast<int>(entries_.size());
    props_.headers.entries = entries_.data();
    if (entries_.empty()) props_._flags &= ~AMQP_BASIC_HEADERS_FLAG;
  }
  const amqp_basic_properties_t* get() const { return &props_; }

 private:
  amqp_basic_properties_t props_;
  std::vector<amqp_table_entry_t> entries_;
};

// Everything printed comes from a publisher: control bytes (terminal escapes,
// line breaks that would fake rows) are shown as \xNN, and the width is capped.
std::string or_dash(const std::string& s) { return s.empty() ? "-" : printable(s, kFieldWidth); }

amqp::Connection connect(const config::Config& cfg) {
  amqp::ConnectOptions o = amqp::connect_options(cfg.broker);
  try {
    amqp::Connection conn = amqp::Connection::open(o);
    timeval tv{static_cast<time_t>(kBrokerTimeout.count()), 0};
    if (amqp_set_rpc_timeout(conn.get(), &tv) != AMQP_STATUS_OK) throw Failure("cannot set the RPC timeout");
    return conn;
  } catch (const amqp::AmqpError& e) {
    throw Failure(e.what());
  }
}

// --- list ----------------------------------------------------------------------

int run_list(const Args& args, const config::Config& cfg) {
  Target t = resolve(cfg, args.queue);
  amqp::Connection conn = connect(cfg);
  Checker checker(conn);
  auto depth = checker.queue_depth(t.dlq);
  if (!depth) {
    std::cerr << "event-router dlq: dead-letter queue '" << t.dlq << "' (of queue '" << t.work_queue
              << "') does not exist on " << t.masked_url << "; the daemon declares it when it starts\n";
    return 1;
  }
  if (*depth == 0) {
    std::cout << "dead-letter queue '" << t.dlq << "' is empty\n";
    return 0;
  }
  size_t want = std::min<size_t>(*depth, args.count ? args.count : kListCap);

  struct Row {
    std::string id, type, reason, attempts, when, detail;
  };
  std::vector<Row> rows;
  // A dedicated channel: nothing is acked, and closing it hands every message
  // back to the broker, which requeues them at their old positions.
  conn.open_channel(kWorkChannel);
  while (rows.size() < want) {
    uint64_t tag = 0;
    MessageGuard m;
    if (!get_one(conn, kWorkChannel, t.dlq, &tag, m)) break;
    const auto& p = m.msg.properties;
    Identity who = identify(m.msg);
    Row row{or_dash(who.id), or_dash(who.type), or_dash(header_text(p, settle::kReason).value_or("")),
            or_dash(header_text(p, settle::kAttempts).value_or("")),
            or_dash(header_text(p, settle::kLastFailedAt).value_or("")),
            one_line(header_text(p, settle::kDetail).value_or(""), kDetailWidth)};
    if (!header(p, settle::kReason)) {
      if (auto d = broker_death(p)) {
        row.reason = or_dash(d->reason);
        if (d->time)
          row.when = util::iso8601_utc_ms(std::chrono::system_clock::time_point(std::chrono::seconds(*d->time)));
        std::string detail = "by the broker (x-death) from queue '" + d->queue + "', count " +
                             std::to_string(d->count);
        if (auto last = header_text(p, settle::kLastError)) detail += "; last error: " + *last;
        row.detail = one_line(detail, kDetailWidth);
      }
    }
    rows.push_back(std::move(row));
    amqp_maybe_release_buffers(conn.get());
  }
  amqp::check_reply(amqp_channel_close(conn.get(), kWorkChannel, AMQP_REPLY_SUCCESS),
                    "closing the listing channel");

  const char* heads[] = {"EVENT ID", "TYPE", "REASON", "ATTEMPTS", "LAST FAILED AT", "DETAIL"};
  size_t w[5];
  for (int i = 0; i < 5; ++i) w[i] = std::strlen(heads[i]);
  for (const auto& r : rows) {
    const std::string* cols[] = {&r.id, &r.type, &r.reason, &r.attempts, &r.when};
    for (int i = 0; i < 5; ++i) w[i] = std::max(w[i], cols[i]->size());
  }
  auto print = [&](const std::string* cols[6]) {
    std::string line;
    for (int i = 0; i < 5; ++i) line += *cols[i] + std::string(w[i] - cols[i]->size() + 2, ' ');
    line += *cols[5];
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::cout << line << "\n";
  };
  std::string hs[6];
  const std::string* hp[6];
  for (int i = 0; i < 6; ++i) {
    hs[i] = heads[i];
    hp[i] = &hs[i];
  }
  print(hp);
  for (const auto& r : rows) {
    const std::string* cols[] = {&r.id, &r.type, &r.reason, &r.attempts, &r.when, &r.detail};
    print(cols);
  }
  std::cout << "total: " << *depth << " dead-lettered event(s) in '" << t.dlq << "'";
  if (rows.size() < *depth) std::cout << ", " << rows.size() << " listed";
  std::cout << "\n";
  return 0;
}

// --- replay --------------------------------------------------------------------

// Publishes on a channel in confirm mode and waits for the broker's verdict
// on each message before the next one.
class ConfirmedPublisher {
 public:
  enum class Fate { Routed, Returned, Refused };
  struct Result {
    Fate fate;
    std::string why;  // for Returned / Refused
  };

  ConfirmedPublisher(amqp::Connection& conn, amqp_channel_t ch) : conn_(conn), ch_(ch) {
    amqp_confirm_select(conn_.get(), ch_);
    amqp::check_reply(amqp_get_rpc_reply(conn_.get()), "enabling publisher confirms");
  }

  // Mandatory: an unroutable message comes back as basic.return, which the
  // broker sends before the basic.ack of that same message. Throws when the
  // channel or connection is lost or nothing comes within kBrokerTimeout.
  Result publish(const std::string& exchange, const std::string& key, const amqp_basic_properties_t* props,
                 amqp_bytes_t body, const std::string& what) {
    int rc = amqp_basic_publish(conn_.get(), ch_, bytes(exchange), bytes(key), /*mandatory*/ 1, /*immediate*/ 0,
                                props, body);
    if (rc != AMQP_STATUS_OK) throw Failure("publishing " + what + ": " + amqp_error_string2(rc));
    const uint64_t seq = ++published_;
    std::optional<std::string> returned;
    const auto deadline = Clock::now() + kBrokerTimeout;
    for (;;) {
      amqp_frame_t f = wait_frame(conn_, deadline, "waiting for the broker's confirm of " + what);
      if (f.frame_type != AMQP_FRAME_METHOD) continue;
      const amqp_method_t& m = f.payload.method;
      switch (m.id) {
        case AMQP_BASIC_RETURN_METHOD: {
          auto* r = static_cast<amqp_basic_return_t*>(m.decoded);
          if (r->reply_code != AMQP_NO_ROUTE)
            returned = "returned by the broker: " + std::string(view(r->reply_text));
          else if (exchange.empty())
            returned = "not routed: queue '" + key + "' does not exist";
          else
            returned = "not routed: no queue is bound for routing key '" + key + "' on exchange '" + exchange + "'";
          MessageGuard content;  // must be read off the wire; not needed
          read_content(conn_, f.channel, content, deadline, "reading a returned message");
          break;
        }
        case AMQP_BASIC_ACK_METHOD:
        case AMQP_BASIC_NACK_METHOD: {
          bool ack = m.id == AMQP_BASIC_ACK_METHOD;
          uint64_t tag = ack ? static_cast<amqp_basic_ack_t*>(m.decoded)->delivery_tag
                             : static_cast<amqp_basic_nack_t*>(m.decoded)->delivery_tag;
          if (tag < seq) break;  // an earlier message's (already settled); >= seq covers ours

          if (!ack) return {Fate::Refused, "the broker refused it (basic.nack)"};
          if (returned) return {Fate::Returned, *returned};
          return {Fate::Routed, {}};
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
          auto* c = static_cast<amqp_channel_close_t*>(m.decoded);
          amqp_channel_close_ok_t ok{};
          amqp_send_method(conn_.get(), f.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
          throw Failure("publishing " + what + ": the broker closed the channel: " + std::string(view(c->reply_text)));
        }
        case AMQP_CONNECTION_CLOSE_METHOD: {
          auto* c = static_cast<amqp_connection_close_t*>(m.decoded);
          amqp_connection_close_ok_t ok{};
          amqp_send_method(conn_.get(), 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
          throw Failure("publishing " + what + ": the broker closed the connection: " +
                        std::string(view(c->reply_text)));
        }
        default:
          break;  // connection.blocked and the like: the confirm comes later
      }
    }
  }

 private:
  amqp::Connection& conn_;
  amqp_channel_t ch_;
  uint64_t published_ = 0;  // confirm sequence numbers start at 1 per channel
};

// Why replay never loses an event: each event is taken with basic.get
// (no_ack=0), published mandatory on the same channel in confirm mode, and
// acked in the dead-letter queue only after the broker's basic.ack without a
// basic.return, i.e. once a queue has it. A return or nack, a refused header,
// or --event-id not matching leaves the message unacked; those are requeued
// together at the end (nack with requeue, then channel.close), not one by one:
// requeued at once, each would be the next basic.get again. If we stop
// anywhere (crash, kill, timeout, lost connection), the broker requeues
// everything unacked. The price: stopping between a confirm and our ack
// replays that event again next time (a duplicate, never a loss).
int run_replay(const Args& args, const config::Config& cfg) {
  Target t = resolve(cfg, args.queue);
  amqp::Connection conn = connect(cfg);
  Checker checker(conn);
  auto depth = checker.queue_depth(t.dlq);
  if (!depth) {
    std::cerr << "event-router dlq: dead-letter queue '" << t.dlq << "' (of queue '" << t.work_queue
              << "') does not exist on " << t.masked_url << "; nothing to replay\n";
    return 1;
  }
  if (*depth == 0) {
    std::cout << "dead-letter queue '" << t.dlq << "' is empty: nothing to replay\n";
    return args.has_event_id ? 1 : 0;
  }

  conn.open_channel(kWorkChannel);
  ConfirmedPublisher publisher(conn, kWorkChannel);

  size_t seen = 0, selected = 0, replayed = 0, failed = 0;
  std::vector<uint64_t> failed_tags;  // requeued explicitly at the end
  std::string stopped;                // why the run ended early
  try {
    // Only the `depth` messages there at the start: events that fail again
    // while we run are dead-lettered behind them and are not picked up again.
    while (seen < *depth && (args.count == 0 || selected < args.count)) {
      uint64_t tag = 0;
      MessageGuard m;
      if (!get_one(conn, kWorkChannel, t.dlq, &tag, m)) break;
      ++seen;
      Identity who = identify(m.msg);
      if (args.has_event_id && who.id != args.event_id) continue;  // left unacked: requeued in place
      ++selected;
      const auto& p = m.msg.properties;
      std::string name = "event " + or_dash(who.id) + " (" + or_dash(who.type) + ")";
      auto refuse = [&](const std::string& why) {
        std::cerr << "not replayed: " << name << ": " << why << "; left in the dead-letter queue\n";
        failed_tags.push_back(tag);
        ++failed;
      };
      // Never the x-original-exchange header as the destination: a header
      // naming another exchange, or "" (which reaches every queue), would
      // deliver it where this config never routes.
      auto rk = original_routing_key(p);
      if (!rk) {
        refuse(std::string("no ") + settle::kOriginalRoutingKey +
               " header (nor x-death), so its routing key is unknown");
        continue;
      }
      std::string exchange = t.exchange, key = *rk;
      if (args.to_queue) {
        auto q = original_queue(p);
        if (!q) {
          refuse(std::string("no ") + settle::kOriginalQueue + " header (nor x-death), so its queue is unknown");
          continue;
        }
        if (std::find(t.queues.begin(), t.queues.end(), *q) == t.queues.end()) {
          refuse(std::string(settle::kOriginalQueue) + " '" + *q + "' is not a queue of " + cfg.path);
          continue;
        }
        exchange.clear();  // the default exchange routes by queue name
        key = *q;
      } else if (!checker.exchange_exists(exchange)) {
        refuse("exchange '" + exchange + "' does not exist on " + t.masked_url);
        continue;
      }
      ReplayProperties props(p);
      auto result = publisher.publish(exchange, key, props.get(), m.msg.body, name);
      if (result.fate != ConfirmedPublisher::Fate::Routed) {
        refuse(result.why);
        continue;
      }
      int rc = amqp_basic_ack(conn.get(), kWorkChannel, tag, 0);
      if (rc != AMQP_STATUS_OK) throw Failure("acknowledging " + name + ": " + amqp_error_string2(rc));
      ++replayed;
      if (args.to_queue)
        std::cout << "replayed " << name << " into queue '" << key << "'\n";
      else
        std::cout << "replayed " << name << " to exchange '" << exchange << "' with routing key '" << key << "'\n";
      amqp_maybe_release_buffers(conn.get());
    }
    for (uint64_t tag : failed_tags) {
      int rc = amqp_basic_nack(conn.get(), kWorkChannel, tag, /*multiple*/ 0, /*requeue*/ 1);
      if (rc != AMQP_STATUS_OK) throw Failure(std::string("requeueing a message: ") + amqp_error_string2(rc));
    }
    // Also hands back the messages skipped by --event-id (requeued in order);
    // its close-ok tells that the broker has processed our acks and nacks.
    amqp::check_reply(amqp_channel_close(conn.get(), kWorkChannel, AMQP_REPLY_SUCCESS),
                      "closing the replay channel");
  } catch (const std::exception& e) {
    // Nothing unacked is lost: the broker requeues it when we are gone.
    stopped = e.what();
  }

  if (!stopped.empty()) std::cerr << "event-router dlq: replay stopped: " << stopped << "\n";
  bool found_all = true;
  if (args.has_event_id && selected == 0 && stopped.empty()) {
    std::cerr << "event-router dlq: no event with id '" << args.event_id << "' among the " << seen
              << " event(s) in '" << t.dlq << "'\n";
    found_all = false;
  }
  std::cout << "replayed " << replayed << " event(s) from '" << t.dlq << "'";
  if (failed) std::cout << ", " << failed << " not replayed (left in the dead-letter queue)";
  std::cout << "\n";
  if (failed) std::cerr << "event-router dlq: " << failed << " event(s) not replayed; see above\n";
  return (stopped.empty() && failed == 0 && found_all) ? 0 : 1;
}

}  // namespace

bool is_failure_header(std::string_view k) {
  for (const char* exact : {settle::kAttempts, settle::kFirstFailedAt, settle::kLastFailedAt, settle::kSignature,
                            settle::kHeadersDropped, "x-attempt", "x-last-error", "x-death"}) {
    if (k == exact) return true;
  }
  for (std::string_view prefix : {"x-death-", "x-original-", "x-first-death-", "x-last-death-"}) {
    if (k.substr(0, prefix.size()) == prefix) return true;
  }
  return false;
}

std::string printable(std::string_view text, size_t max) {
  static const char hex[] = "0123456789abcdef";
  std::string s;
  size_t i = 0;
  for (; i < text.size() && s.size() < max; ++i) {
    auto u = static_cast<unsigned char>(text[i]);
    if (u < 0x20 || u == 0x7f) {
      s += "\\x";
      s += hex[u >> 4];
      s += hex[u & 15];
    } else {
      s += text[i];
    }
  }
  if (i == text.size()) return s;
  size_t cut = std::min(s.size(), max >= 3 ? max - 3 : 0);
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 sequence
  s.resize(cut);
  return s + "...";
}

std::string one_line(std::string_view text, size_t max) {
  std::string s;
  s.reserve(std::min(text.size(), max));
  for (char c : text) s += (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) ? ' ' : c;
  if (s.size() <= max) return s;
  size_t cut = max >= 3 ? max - 3 : 0;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 sequence
  s.resize(cut);
  return s + "...";
}

int main(int argc, char** argv) {
  return util::run_command("event-router dlq", kUsage, argc, argv, parse_args, [](const Args& a) {
    config::Config cfg = config::load_config(a.config_path);
    return a.command == "list" ? run_list(a, cfg) : run_replay(a, cfg);
  });
}

}  // namespace er::dlq
