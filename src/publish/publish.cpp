#include "publish/publish.hpp"

#include "util/time.hpp"

#include <amqp.h>
#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <sys/time.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <sstream>

#include "amqp/connection.hpp"
#include "config/config.hpp"
#include "event/envelope.hpp"
#include "event/schema.hpp"
#include "util/log.hpp"
#include "util/args.hpp"

namespace er::publish {

namespace {

using amqp::bytes;
using amqp::view;

const char* kUsage =
    "usage: event-router publish [--routing-key K] [--config FILE] [--file F] [--timeout S]\n"
    "\n"
    "Publishes events to the config's exchange with publisher confirms: one JSON\n"
    "object, or NDJSON (one object per line; blank lines are skipped), read from\n"
    "--file or stdin.\n"
    "\n"
    "Each event gets what it lacks, in the envelope's own style (camelCase when it\n"
    "has eventType/eventId keys, else snake_case): event_id/eventId (a random UUID\n"
    "v4), timestamp (now, ISO 8601 UTC with ms), version (1). When the config has\n"
    "`schemas:`, every event is validated first; if any event is invalid (or has no\n"
    "routing key), nothing is published.\n"
    "\n"
    "Properties: content_type application/json, delivery_mode 2 (persistent),\n"
    "message_id = the event id, correlation_id and type from the envelope, timestamp\n"
    "now. Published mandatory: an event no queue is bound for is reported as failed.\n"
    "\n"
    "  -k, --routing-key K  routing key for every event (default: its event type)\n"
    "  -c, --config FILE    the daemon's config: broker URL, exchange, schemas\n"
    "                       (default: $EVENT_ROUTER_CONFIG, else\n"
    "                       /etc/event-router/router.yaml)\n"
    "  -f, --file F         read the events from F ('-' = stdin; default stdin)\n"
    "      --timeout S      wait at most S seconds for the broker's confirms\n"
    "                       (default 30)\n"
    "  -h, --help           print this help and exit\n"
    "\n"
    "Exit status: 0 every event confirmed by the broker, 1 failure (invalid event,\n"
    "nack, unroutable, broker error), 2 usage.\n";

constexpr amqp_channel_t kChannel = 1;
constexpr size_t kPollEvery = 64;  // read confirms while publishing, every this many messages

using util::UsageError;
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string routing_key;
  std::string config_path;
  std::string file;  // empty or "-" = stdin
  std::chrono::milliseconds timeout{30000};
};

std::optional<Args> parse_args(int argc, char** argv) {
  Args a;
  const char* env = std::getenv("EVENT_ROUTER_CONFIG");
  a.config_path = env && *env ? env : "/etc/event-router/router.yaml";
  bool has_rk = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") return std::nullopt;
    util::Option opt(argc, argv, i);
    const std::string& name = opt.name();
    auto take = [&] { return opt.value(); };
    if (name == "-k" || name == "--routing-key") {
      a.routing_key = take();
      has_rk = true;
    } else if (name == "-c" || name == "--config") {
      a.config_path = take();
    } else if (name == "-f" || name == "--file") {
      a.file = take();
      if (a.file.empty()) throw UsageError("--file must not be empty");
    } else if (name == "--timeout") {
      std::string s = take();
      try {
        size_t pos = 0;
        double secs = std::stod(s, &pos);
        if (pos != s.size() || !(secs > 0) || secs > 86400) throw std::invalid_argument(s);
        a.timeout = std::chrono::milliseconds(static_cast<long long>(secs * 1000));
      } catch (const std::exception&) {
        throw UsageError("--timeout wants a positive number of seconds, got '" + s + "'");
      }
    } else {
      throw UsageError("unknown argument '" + arg + "'");
    }
  }
  // An empty routing key is legal in AMQP, but here it is always a mistake
  // (an unset shell variable): the default is the event type.
  if (has_rk && a.routing_key.empty()) throw UsageError("--routing-key must not be empty");
  return a;
}

std::string read_input(const Args& a) {
  if (a.file.empty() || a.file == "-") {
    return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  std::ifstream in(a.file, std::ios::binary);
  if (!in) throw Failure(a.file + ": cannot open: " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Failure(a.file + ": read error");
  return ss.str();
}

bool is_blank(std::string_view s) {
  return s.find_first_not_of(" \t\r\n") == std::string_view::npos;
}

std::string_view trim(std::string_view s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string_view::npos) return {};
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

constexpr unsigned kParseFlags = rapidjson::kParseFullPrecisionFlag | rapidjson::kParseValidateEncodingFlag;

// --- publishing -------------------------------------------------------------------

enum class State { Pending, Confirmed, Failed };

struct Outgoing {
  size_t line = 0;
  Prepared ev;
  State state = State::Pending;
  bool returned = false;
  std::string why;  // for Failed
};

std::string name_of(const Outgoing& o) {
  return "line " + std::to_string(o.line) + ": event " + o.ev.event_id + " (" + o.ev.event_type + ")";
}

class Publisher {
 public:
  Publisher(amqp::Connection& conn, std::string exchange, std::string masked_url)
      : conn_(conn), exchange_(std::move(exchange)), url_(std::move(masked_url)) {}

  // Opens the channel, checks the exchange, enables confirms.
  void begin() {
    amqp_connection_state_t c = conn_.get();
    conn_.open_channel(kChannel);
    if (!exchange_.empty()) {
      amqp_exchange_declare(c, kChannel, bytes(exchange_), bytes("topic"), /*passive*/ 1, 0, 0, 0, amqp_empty_table);
      amqp_rpc_reply_t r = amqp_get_rpc_reply(c);
      if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
          static_cast<amqp_channel_close_t*>(r.reply.decoded)->reply_code == AMQP_NOT_FOUND) {
        throw Failure("exchange '" + exchange_ + "' does not exist on " + url_ +
                      "; the daemon declares it (with its queues) when it starts");
      }
      amqp::check_reply(r, "checking exchange '" + exchange_ + "'");
    }
    amqp_confirm_select(c, kChannel);
    amqp::check_reply(amqp_get_rpc_reply(c), "enabling publisher confirms");
  }

  // Publishes everything (pipelined), then waits for every confirm.
  void run(std::vector<Outgoing>& out, std::chrono::milliseconds timeout) {
    out_ = &out;
    amqp_connection_state_t c = conn_.get();
    const uint64_t now = static_cast<uint64_t>(std::time(nullptr));
    for (size_t i = 0; i < out.size() && !dead_; ++i) {
      const Prepared& ev = out[i].ev;
      amqp_basic_properties_t p{};
      p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG |
                 AMQP_BASIC_TIMESTAMP_FLAG;
      p.content_type = bytes("application/json");
      p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
      p.message_id = bytes(ev.event_id);
      p.timestamp = now;
      if (!ev.correlation_id.empty()) {
        p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        p.correlation_id = bytes(ev.correlation_id);
      }
      if (!ev.event_type.empty()) {
        p._flags |= AMQP_BASIC_TYPE_FLAG;
        p.type = bytes(ev.event_type);
      }
      int rc = amqp_basic_publish(c, kChannel, bytes(exchange_), bytes(ev.routing_key), /*mandatory*/ 1,
                                  /*immediate*/ 0, &p, bytes(ev.body));
      ++published_;  // delivery tag i + 1
      if (rc != AMQP_STATUS_OK) {
        fail_pending(std::string("publishing: ") + amqp_error_string2(rc));
        break;
      }
      if ((i + 1) % kPollEvery == 0) poll(std::chrono::milliseconds(0));
    }
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!dead_ && low_ < published_) {
      auto left = deadline - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) {
        fail_pending("no confirm from the broker within " + std::to_string(timeout.count() / 1000.0).substr(0, 5) +
                     "s");
        break;
      }
      poll(std::chrono::duration_cast<std::chrono::milliseconds>(left));
    }
    // Anything never sent (a publish failed half-way).
    for (size_t i = published_; i < out.size(); ++i) {
      out[i].state = State::Failed;
      out[i].why = "not published: an earlier publish failed";
    }
  }

  size_t published() const { return published_; }

 private:
  // Reads frames until nothing arrives within `wait` (0 = what is there now).
  void poll(std::chrono::milliseconds wait) {
    amqp_connection_state_t c = conn_.get();
    timeval tv{static_cast<time_t>(wait.count() / 1000), static_cast<suseconds_t>((wait.count() % 1000) * 1000)};
    for (;;) {
      amqp_frame_t frame;
      int rc = amqp_simple_wait_frame_noblock(c, &frame, &tv);
      if (rc == AMQP_STATUS_TIMEOUT) return;
      if (rc != AMQP_STATUS_OK) {
        fail_pending(std::string("connection lost: ") + amqp_error_string2(rc));
        return;
      }
      on_frame(frame);
      amqp_maybe_release_buffers(c);
      if (dead_ || low_ >= published_) return;
      tv = timeval{0, 0};  // then drain what is already there without waiting again
    }
  }

  void on_frame(const amqp_frame_t& frame) {
    if (frame.frame_type != AMQP_FRAME_METHOD) return;
    amqp_connection_state_t c = conn_.get();
    switch (frame.payload.method.id) {
      case AMQP_BASIC_ACK_METHOD: {
        auto* m = static_cast<amqp_basic_ack_t*>(frame.payload.method.decoded);
        settle(m->delivery_tag, m->multiple, true);
        break;
      }
      case AMQP_BASIC_NACK_METHOD: {
        auto* m = static_cast<amqp_basic_nack_t*>(frame.payload.method.decoded);
        settle(m->delivery_tag, m->multiple, false);
        break;
      }
      case AMQP_BASIC_RETURN_METHOD: {
        auto* m = static_cast<amqp_basic_return_t*>(frame.payload.method.decoded);
        std::string rk(view(m->routing_key));
        std::string text(view(m->reply_text));
        int code = m->reply_code;
        amqp_message_t msg;
        amqp_rpc_reply_t r = amqp_read_message(c, frame.channel, &msg, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
          fail_pending(amqp::describe_reply(r, "reading a returned message"));
          return;
        }
        std::string id;
        if (msg.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) id = std::string(view(msg.properties.message_id));
        amqp_destroy_message(&msg);
        on_return(id, rk, code, text);
        break;
      }
      case AMQP_CHANNEL_CLOSE_METHOD: {
        auto* m = static_cast<amqp_channel_close_t*>(frame.payload.method.decoded);
        std::string why = "the broker closed the channel: " + std::string(view(m->reply_text));
        amqp::reply_channel_close_ok(c, frame.channel);
        fail_pending(why);
        break;
      }
      case AMQP_CONNECTION_CLOSE_METHOD: {
        auto* m = static_cast<amqp_connection_close_t*>(frame.payload.method.decoded);
        std::string why = "the broker closed the connection: " + std::string(view(m->reply_text));
        amqp::reply_connection_close_ok(c);
        fail_pending(why);
        break;
      }
      default:
        break;  // connection.blocked and the like: confirms simply come later
    }
  }

  // basic.ack / basic.nack for delivery tag `tag` (and every earlier one with `multiple`).
  void settle(uint64_t tag, bool multiple, bool acked) {
    auto& out = *out_;
    if (tag == 0 || tag > published_) return;
    size_t first = multiple ? low_ : static_cast<size_t>(tag - 1);
    for (size_t i = first; i < tag; ++i) {
      Outgoing& o = out[i];
      if (o.state != State::Pending) continue;
      if (!acked) {
        o.state = State::Failed;
        o.why = "the broker refused it (basic.nack)";
      } else if (o.returned) {
        o.state = State::Failed;  // why was set by the return
      } else {
        o.state = State::Confirmed;
      }
    }
    while (low_ < published_ && out[low_].state != State::Pending) ++low_;
  }

  // A basic.return comes before the confirm of the same message: it marks the
  // first pending event with that message id and routing key.
  void on_return(const std::string& id, const std::string& rk, int code, const std::string& text) {
    auto& out = *out_;
    for (size_t i = low_; i < published_; ++i) {
      Outgoing& o = out[i];
      if (o.state != State::Pending || o.returned || o.ev.event_id != id || o.ev.routing_key != rk) continue;
      o.returned = true;
      o.why = code == AMQP_NO_ROUTE ? "not routed: no queue is bound for routing key '" + rk + "' on exchange '" +
                                          exchange_ + "'"
                                    : "returned by the broker: " + text;
      return;
    }
  }

  void fail_pending(const std::string& why) {
    dead_ = true;
    for (size_t i = low_; i < published_; ++i) {
      Outgoing& o = (*out_)[i];
      if (o.state != State::Pending) continue;
      o.state = State::Failed;
      if (!o.returned) o.why = "not confirmed: " + why;
    }
    low_ = published_;
  }

  amqp::Connection& conn_;
  std::string exchange_;
  std::string url_;
  std::vector<Outgoing>* out_ = nullptr;
  size_t published_ = 0;
  size_t low_ = 0;  // every event before this one is settled
  bool dead_ = false;
};

int run(const Args& args) {
  config::Config cfg = config::load_config(args.config_path);
  std::string input = read_input(args);
  std::vector<InputLine> lines = split_input(input);
  const std::string source = args.file.empty() || args.file == "-" ? "stdin" : args.file;
  if (lines.empty()) {
    std::cerr << "event-router publish: no event in " << source << "\n";
    return 1;
  }

  std::shared_ptr<const event::SchemaSet> schemas;
  if (!cfg.schemas_dir.empty()) schemas = event::SchemaSet::load(cfg.schemas_dir);

  // Everything is checked before anything is published: a batch is published
  // whole or not at all (as far as validation can tell).
  std::vector<Outgoing> out;
  out.reserve(lines.size());
  size_t invalid = 0;
  std::string detail;
  for (auto& l : lines) {
    Outgoing o;
    o.line = l.line;
    try {
      o.ev = prepare(l.text, args.routing_key);
      if (schemas && !schemas->validate(o.ev.body.data(), o.ev.body.size(), o.ev.event_type, detail))
        throw InvalidEvent("schema violation: " + detail);
    } catch (const InvalidEvent& e) {
      std::cerr << "event-router publish: " << source << ": line " << l.line << ": " << e.what() << "\n";
      ++invalid;
      continue;
    }
    out.push_back(std::move(o));
  }
  if (invalid) {
    std::cerr << "event-router publish: nothing published: " << invalid << " of " << lines.size()
              << " event(s) invalid\n";
    return 1;
  }

  amqp::Connection conn = [&] {
    try {
      return amqp::Connection::open(amqp::connect_options(cfg.broker));
    } catch (const amqp::AmqpError& e) {
      throw Failure(e.what());
    }
  }();
  Publisher pub(conn, cfg.exchange.name, log::mask_url(cfg.broker.url));
  pub.begin();
  pub.run(out, args.timeout);
  conn.close();

  size_t confirmed = 0, failed = 0;
  for (const auto& o : out) {
    if (o.state == State::Confirmed) {
      ++confirmed;
    } else {
      ++failed;
      std::cerr << "event-router publish: " << name_of(o) << " to '" << o.ev.routing_key << "': " << o.why << "\n";
    }
  }
  std::cout << "published " << pub.published() << " event(s), confirmed " << confirmed;
  if (failed) std::cout << ", failed " << failed;
  std::cout << "\n";
  return failed == 0 ? 0 : 1;
}

}  // namespace

// --- pure helpers ------------------------------------------------------------------

std::string uuid_v4_from_bytes(const uint8_t (&in)[16]) {
  uint8_t b[16];
  std::memcpy(b, in, 16);
  b[6] = static_cast<uint8_t>((b[6] & 0x0F) | 0x40);  // version 4
  b[8] = static_cast<uint8_t>((b[8] & 0x3F) | 0x80);  // RFC 4122 variant
  static const char* hex = "0123456789abcdef";
  std::string s;
  s.reserve(36);
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += hex[b[i] >> 4];
    s += hex[b[i] & 0x0F];
  }
  return s;
}

std::string uuid_v4() {
  // random_device is /dev/urandom (getrandom) with libstdc++: one per call is
  // cheap enough for a CLI and never shares state between threads.
  static thread_local std::random_device rd;
  uint8_t b[16];
  for (int i = 0; i < 16; i += 4) {
    uint32_t r = rd();
    std::memcpy(b + i, &r, 4);
  }
  return uuid_v4_from_bytes(b);
}

std::vector<InputLine> split_input(std::string_view input) {
  std::vector<InputLine> out;
  if (is_blank(input)) return out;
  // One JSON value, however many lines it spans?
  {
    rapidjson::Document d;
    d.Parse<kParseFlags>(input.data(), input.size());
    if (!d.HasParseError()) {
      size_t first = input.find_first_not_of(" \t\r\n");
      size_t line = 1;
      for (size_t i = 0; i < first; ++i)
        if (input[i] == '\n') ++line;
      out.push_back({line, std::string(trim(input))});
      return out;
    }
  }
  size_t line = 0, pos = 0;
  while (pos <= input.size()) {
    size_t nl = input.find('\n', pos);
    std::string_view l = input.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    ++line;
    if (!is_blank(l)) out.push_back({line, std::string(trim(l))});
    if (nl == std::string_view::npos) break;
    pos = nl + 1;
  }
  return out;
}

Prepared prepare(std::string_view json, std::string_view routing_key, const FillOptions& opts) {
  rapidjson::Document doc;
  doc.Parse<kParseFlags>(json.data(), json.size());
  if (doc.HasParseError()) {
    throw InvalidEvent(std::string("invalid JSON: ") + rapidjson::GetParseError_En(doc.GetParseError()) +
                       " (at byte " + std::to_string(doc.GetErrorOffset()) + ")");
  }
  if (!doc.IsObject()) throw InvalidEvent("not a JSON object (an event is an object)");

  Prepared p;
  p.camel = doc.HasMember("eventType") || doc.HasMember("eventId");
  auto present = [&](const char* key) {
    auto it = doc.FindMember(key);
    return it != doc.MemberEnd() && !it->value.IsNull();
  };
  // Either spelling of the id counts: an event with both styles keeps its id.
  for (const char* key : {"event_id", "eventId"}) {
    if (!present(key)) continue;
    const auto& v = doc[key];
    if (!v.IsString() || v.GetStringLength() == 0)
      throw InvalidEvent(std::string(key) + " must be a non-empty string");
  }
  bool need_id = !present("event_id") && !present("eventId");
  bool need_ts = !present("timestamp");
  bool need_version = !present("version");

  std::string body;
  if (!need_id && !need_ts && !need_version) {
    body = std::string(trim(json));  // nothing to add: the input as it is
  } else {
    // The added fields first, then the event's own members in their order.
    auto& alloc = doc.GetAllocator();
    rapidjson::Value obj(rapidjson::kObjectType);
    auto add = [&](const char* key, rapidjson::Value v) {
      // A null placeholder of the same key is dropped below.
      obj.AddMember(rapidjson::Value(key, alloc), v, alloc);
      p.filled.push_back(key);
    };
    if (need_id) add(p.camel ? "eventId" : "event_id", rapidjson::Value(opts.new_id().c_str(), alloc));
    if (need_ts) add("timestamp", rapidjson::Value(opts.now().c_str(), alloc));
    if (need_version) add("version", rapidjson::Value(1));
    for (auto& m : doc.GetObject()) {
      std::string_view k(m.name.GetString(), m.name.GetStringLength());
      bool replaced = m.value.IsNull() && ((need_id && (k == "event_id" || k == "eventId")) ||
                                           (need_ts && k == "timestamp") || (need_version && k == "version"));
      if (replaced) continue;
      obj.AddMember(m.name, m.value, alloc);  // moves
    }
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    obj.Accept(w);
    body.assign(buf.GetString(), buf.GetSize());
  }

  // What the daemon will read: decode the body it will get.
  event::Envelope env;
  std::string detail;
  auto st = event::decode(body.data(), body.size(), routing_key, env, detail);
  if (st == event::DecodeStatus::NoEventType) {
    throw InvalidEvent("no event type (event_type or eventType) and no --routing-key: cannot choose a routing key");
  }
  if (st != event::DecodeStatus::Ok) throw InvalidEvent(std::string(event::reason_code(st)) + ": " + detail);
  p.body = std::move(body);
  p.event_id = env.event_id;
  p.event_type = env.event_type;
  p.correlation_id = env.correlation_id;
  p.routing_key = routing_key.empty() ? env.event_type : std::string(routing_key);
  if (p.event_id.empty()) throw InvalidEvent("no usable event id");  // cannot happen after filling
  return p;
}

int main(int argc, char** argv) {
  return util::run_command("event-router publish", kUsage, argc, argv, parse_args,
                           [](const Args& a) { return run(a); });
}

}  // namespace er::publish
