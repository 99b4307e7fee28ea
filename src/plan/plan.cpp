#include "plan/plan.hpp"

#include <amqp.h>

#include <cstdlib>
#include <iostream>
#include <set>
#include <utility>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "config/config.hpp"
#include "dlq/dlq.hpp"
#include "plan/management.hpp"
#include "util/args.hpp"

namespace er::plan {

namespace {

const char* kUsage =
    "usage: event-router plan [--config FILE] [--management URL]\n"
    "\n"
    "Compares what the config wants on the broker (the exchange, every queue with\n"
    "its dead-letter and retry delay queues, their arguments, the bindings) with\n"
    "the live broker, through the RabbitMQ management HTTP API, and prints the\n"
    "difference like a diff:\n"
    "  +  missing (the daemon declares it when it starts)\n"
    "  ~  differs, old -> new (RabbitMQ cannot change it in place: the daemon\n"
    "     refuses to start on it; see docs/scaling.md)\n"
    "  -  a stale binding from the config's exchange to one of its queues\n"
    "Only objects the config names are looked at. Changes nothing.\n"
    "\n"
    "  -c, --config FILE      the daemon's config (default: $EVENT_ROUTER_CONFIG,\n"
    "                         else /etc/event-router/router.yaml)\n"
    "  -m, --management URL   the management API, http://[user:password@]host[:port][/prefix]\n"
    "                         (default: $EVENT_ROUTER_MANAGEMENT_URL, else port 15672\n"
    "                         on the host of the first broker URL). Without a user in\n"
    "                         it, the broker URL's user and password are used; the\n"
    "                         user needs the management (or monitoring/administrator) tag.\n"
    "  -h, --help             print this help and exit\n"
    "\n"
    "Every request is bounded by broker.rpc_timeout. The vhost is the broker URL's.\n"
    "Exit status: 0 in sync, 2 not in sync, 1 error (the API unreachable, refused\n"
    "credentials, a bad config or command line).\n";

constexpr size_t kValueWidth = 200;

using Json = rapidjson::Value;

std::string quoted(std::string_view s) { return "'" + dlq::printable(s, kValueWidth) + "'"; }

std::string json_text(const Json& v) {
  rapidjson::StringBuffer sb;
  rapidjson::Writer<rapidjson::StringBuffer> w(sb);
  v.Accept(w);
  return dlq::printable(std::string_view(sb.GetString(), sb.GetSize()), kValueWidth);
}

std::string show(const config::QueueArgument& a) {
  switch (a.kind) {
    case config::QueueArgument::Kind::Int: return std::to_string(a.i);
    case config::QueueArgument::Kind::Bool: return a.b ? "true" : "false";
    case config::QueueArgument::Kind::String: return "\"" + dlq::printable(a.s, kValueWidth) + "\"";
  }
  return "?";
}

std::string show(const Json& v) {
  if (v.IsString()) return "\"" + dlq::printable(std::string_view(v.GetString(), v.GetStringLength()), kValueWidth) + "\"";
  return json_text(v);
}

bool same(const config::QueueArgument& a, const Json& v) {
  switch (a.kind) {
    case config::QueueArgument::Kind::Int: return v.IsInt64() && v.GetInt64() == a.i;
    case config::QueueArgument::Kind::Bool: return v.IsBool() && v.GetBool() == a.b;
    case config::QueueArgument::Kind::String:
      return v.IsString() && std::string_view(v.GetString(), v.GetStringLength()) == a.s;
  }
  return false;
}

std::string str_member(const Json& o, const char* key, std::string fallback = "") {
  auto it = o.FindMember(key);
  if (it == o.MemberEnd() || !it->value.IsString()) return fallback;
  return std::string(it->value.GetString(), it->value.GetStringLength());
}

// A missing or non-boolean flag reads as `fallback`.
bool bool_member(const Json& o, const char* key, bool fallback) {
  auto it = o.FindMember(key);
  return it != o.MemberEnd() && it->value.IsBool() ? it->value.GetBool() : fallback;
}

const Json* arguments_of(const Json& o) {
  auto it = o.FindMember("arguments");
  return it != o.MemberEnd() && it->value.IsObject() ? &it->value : nullptr;
}

rapidjson::Document parse_object(const std::string& text, const std::string& what) {
  rapidjson::Document d;
  d.Parse(text.data(), text.size());
  if (d.HasParseError() || !d.IsObject())
    throw ManagementError("the management API's answer for " + what + " is not a JSON object");
  return d;
}

void flag(std::vector<std::string>& details, const Json& o, const char* key, bool want) {
  bool have = bool_member(o, key, want);
  if (have != want) details.push_back(std::string(key) + ": " + (have ? "true" : "false") + " → " + (want ? "true" : "false"));
}

// The differing arguments: wanted ones that are absent or differ, then ones
// the broker has and the config does not (RabbitMQ refuses a declare that
// leaves them out). `skip` is compared elsewhere.
void compare_arguments(std::vector<std::string>& details, const std::vector<config::QueueArgument>& want,
                       const Json* have, const char* skip) {
  std::set<std::string> wanted;
  for (const auto& a : want) {
    if (a.key == skip) continue;
    wanted.insert(a.key);
    const Json* v = nullptr;
    if (have) {
      auto it = have->FindMember(rapidjson::StringRef(a.key.data(), a.key.size()));
      if (it != have->MemberEnd()) v = &it->value;
    }
    if (!v)
      details.push_back(dlq::printable(a.key, kValueWidth) + ": (none) → " + show(a));
    else if (!same(a, *v))
      details.push_back(dlq::printable(a.key, kValueWidth) + ": " + show(*v) + " → " + show(a));
  }
  if (!have) return;
  for (auto it = have->MemberBegin(); it != have->MemberEnd(); ++it) {
    std::string key(it->name.GetString(), it->name.GetStringLength());
    if (key == skip || wanted.count(key)) continue;
    details.push_back(dlq::printable(key, kValueWidth) + ": " + show(it->value) + " → (none)");
  }
}

std::string queue_type_wanted(const amqp::QueueSpec& q) {
  for (const auto& a : q.arguments)
    if (a.key == "x-queue-type" && a.kind == config::QueueArgument::Kind::String) return a.s;
  return "classic";  // what RabbitMQ makes of a declare without x-queue-type
}

std::string queue_type_seen(const Json& o) {
  std::string t = str_member(o, "type");
  if (!t.empty()) return t;
  if (const Json* args = arguments_of(o)) {
    auto it = args->FindMember("x-queue-type");
    if (it != args->MemberEnd() && it->value.IsString()) return it->value.GetString();
  }
  return "classic";
}

std::string describe_new_queue(const amqp::QueueSpec& q) {
  std::string s = queue_type_wanted(q);
  for (const auto& a : q.arguments)
    if (a.key != "x-queue-type") s += ", " + dlq::printable(a.key, kValueWidth) + "=" + show(a);
  return s;
}

std::string binding_subject(const std::string& exchange, std::string_view queue, std::string_view key) {
  return "binding " + quoted(exchange) + " → " + quoted(queue) + " key " + quoted(key);
}

struct SeenBinding {
  std::string queue;
  std::string key;
  std::string arguments;  // "" when none
};

std::vector<SeenBinding> parse_bindings(const std::string& text) {
  rapidjson::Document d;
  d.Parse(text.data(), text.size());
  if (d.HasParseError() || !d.IsArray())
    throw ManagementError("the management API's answer for the exchange's bindings is not a JSON array");
  std::vector<SeenBinding> out;
  for (const auto& b : d.GetArray()) {
    if (!b.IsObject() || str_member(b, "destination_type") != "queue") continue;  // exchange-to-exchange: not ours
    SeenBinding s{str_member(b, "destination"), str_member(b, "routing_key"), ""};
    const Json* args = arguments_of(b);
    if (args && args->MemberCount() > 0) s.arguments = json_text(*args);
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace

size_t Plan::count(Sign s) const {
  size_t n = 0;
  for (const auto& c : changes) n += c.sign == s;
  return n;
}

Plan compare(const amqp::Topology& want, const Observed& seen) {
  Plan plan;
  const auto& ex = want.exchange;
  plan.exchanges = 1;
  if (!seen.exchange) {
    plan.changes.push_back({Sign::Add, "exchange " + quoted(ex.name) + " (" + ex.type + ", durable)", {}});
  } else {
    auto d = parse_object(*seen.exchange, "exchange '" + ex.name + "'");
    Change c{Sign::Change, "exchange " + quoted(ex.name), {}};
    std::string type = str_member(d, "type");
    if (type != ex.type) c.details.push_back("type: " + dlq::printable(type, kValueWidth) + " → " + ex.type);
    flag(c.details, d, "durable", true);
    flag(c.details, d, "auto_delete", false);
    flag(c.details, d, "internal", false);
    compare_arguments(c.details, {}, arguments_of(d), "");
    if (!c.details.empty()) plan.changes.push_back(std::move(c));
  }

  // Stale bindings are grouped under the work queue that owns their queue.
  std::map<std::string, size_t> owner_of;
  for (size_t i = 0; i < want.queues.size(); ++i)
    for (const auto& q : want.queues[i].queues) owner_of.emplace(q.name, i);
  std::vector<SeenBinding> seen_bindings = seen.exchange ? parse_bindings(seen.bindings) : std::vector<SeenBinding>{};
  std::set<std::pair<std::string, std::string>> present, wanted_bindings;
  for (const auto& b : seen_bindings)
    if (b.arguments.empty()) present.emplace(b.queue, b.key);
  for (const auto& t : want.queues)
    for (const auto& b : t.bindings) wanted_bindings.emplace(b.queue, b.routing_key);

  for (size_t i = 0; i < want.queues.size(); ++i) {
    const auto& t = want.queues[i];
    for (const auto& q : t.queues) {
      ++plan.queues;
      const std::string subject = std::string(amqp::role_name(q.role)) + " " + quoted(q.name);
      auto it = seen.queues.find(q.name);
      if (it == seen.queues.end() || !it->second) {
        plan.changes.push_back({Sign::Add, subject + " (" + describe_new_queue(q) + ")", {}});
        continue;
      }
      auto d = parse_object(*it->second, "queue '" + q.name + "'");
      Change c{Sign::Change, subject, {}};
      std::string have_type = queue_type_seen(d), want_type = queue_type_wanted(q);
      if (have_type != want_type) c.details.push_back("type: " + dlq::printable(have_type, kValueWidth) + " → " + want_type);
      flag(c.details, d, "durable", true);
      flag(c.details, d, "exclusive", false);
      flag(c.details, d, "auto_delete", false);
      compare_arguments(c.details, q.arguments, arguments_of(d), "x-queue-type");
      if (!c.details.empty()) plan.changes.push_back(std::move(c));
    }
    std::set<std::pair<std::string, std::string>> done;
    for (const auto& b : t.bindings) {
      ++plan.bindings;
      if (!done.emplace(b.queue, b.routing_key).second) continue;  // listed twice in the config
      if (!present.count({b.queue, b.routing_key}))
        plan.changes.push_back({Sign::Add, binding_subject(ex.name, b.queue, b.routing_key), {}});
    }
    for (const auto& b : seen_bindings) {
      auto o = owner_of.find(b.queue);
      if (o == owner_of.end() || o->second != i) continue;  // not a queue of this group (or of the config)
      if (b.arguments.empty() && wanted_bindings.count({b.queue, b.key})) continue;
      std::string subject = binding_subject(ex.name, b.queue, b.key);
      if (!b.arguments.empty()) subject += " arguments " + b.arguments;
      plan.changes.push_back({Sign::Stale, std::move(subject), {}});
    }
  }
  return plan;
}

std::string render(const Plan& plan) {
  std::string out;
  for (const auto& c : plan.changes) {
    const char sign = static_cast<char>(c.sign);
    out += sign;
    out += ' ' + c.subject + '\n';
    for (const auto& d : c.details) {
      out += sign;
      out += "     " + d + '\n';
    }
  }
  if (plan.in_sync()) {
    out += "In sync: the exchange, " + std::to_string(plan.queues) + " queues and " + std::to_string(plan.bindings) +
           " bindings match the config.\n";
    return out;
  }
  const size_t add = plan.count(Sign::Add), change = plan.count(Sign::Change), stale = plan.count(Sign::Stale);
  out += "\nNot in sync: " + std::to_string(add) + " to add, " + std::to_string(change) + " to change, " +
         std::to_string(stale) + " stale.\n";
  if (add)
    out += "  + the daemon declares what is missing when it starts, reconnects or reloads.\n";
  if (change)
    out += "  ~ RabbitMQ cannot change an existing queue's or exchange's type, arguments or flags in place,\n"
           "    and the daemon refuses to start on the difference: see docs/scaling.md,\n"
           "    \"Migrating a queue to quorum\" (a new queue name, then drain and delete the old one).\n";
  if (stale)
    out += "  - nothing removes a stale binding: events with its key still reach the queue.\n"
           "    Unbind it on the broker once no publisher needs it.\n";
  return out;
}

namespace {

struct Args {
  std::string config_path;
  std::string management;
};

std::optional<Args> parse(int argc, char** argv) {
  Args a;
  const char* env = std::getenv("EVENT_ROUTER_CONFIG");
  a.config_path = env && *env ? env : "/etc/event-router/router.yaml";
  if (const char* m = std::getenv("EVENT_ROUTER_MANAGEMENT_URL"); m && *m) a.management = m;
  for (int i = 1; i < argc; ++i) {
    util::Option o(argc, argv, i);
    if (o.is("-h", "--help")) return std::nullopt;
    if (o.is("-c", "--config"))
      a.config_path = o.value();
    else if (o.is("-m", "--management"))
      a.management = o.value();
    else
      throw util::UsageError("unknown argument '" + o.name() + "'");
  }
  return a;
}

struct BrokerUrl {
  std::string host, user, password, vhost;
};

BrokerUrl broker_url(const std::string& url) {
  std::vector<char> buf(url.begin(), url.end());
  buf.push_back('\0');
  amqp_connection_info info;
  amqp_default_connection_info(&info);
  if (amqp_parse_url(buf.data(), &info) != AMQP_STATUS_OK)
    throw ManagementError("the broker URL is not a valid amqp:// URL");  // load_config() refuses these already
  // As the daemon: an empty vhost is "/" (connection.cpp).
  return {info.host, info.user, info.password, info.vhost && *info.vhost ? info.vhost : "/"};
}

// The reason RabbitMQ gives in an error body ({"error":..,"reason":..}).
std::string reason_of(const std::string& body) {
  rapidjson::Document d;
  d.Parse(body.data(), body.size());
  std::string r = d.HasParseError() || !d.IsObject() ? "" : str_member(d, "reason");
  return dlq::one_line(r.empty() ? body : r, 120);
}

class Api {
 public:
  Api(Client client, std::string vhost) : client_(std::move(client)), vhost_(std::move(vhost)) {}

  // The body of a 200; nullopt for a 404 when `missing_ok`.
  std::optional<std::string> get(const std::string& path, const std::string& what, bool missing_ok = true) {
    Response r = client_.get(path);
    if (r.status == 200) return std::move(r.body);
    const std::string where = "the management API at " + client_.endpoint().display();
    if (r.status == 404 && missing_ok) return std::nullopt;
    if (r.status == 401)
      throw ManagementError(where + " refused user '" + client_.endpoint().user + "' (401: " + reason_of(r.body) +
                            "): check the user and password (--management http://USER:PASSWORD@host:15672/, "
                            "else the broker URL's), and that the user has the management, monitoring or "
                            "administrator tag");
    if (r.status == 403)
      throw ManagementError(where + " does not let user '" + client_.endpoint().user + "' read " + what +
                            " (403: " + reason_of(r.body) + "): the user needs permissions on vhost '" + vhost_ + "'");
    throw ManagementError(where + " answered HTTP " + std::to_string(r.status) + " for " + what + ": " +
                          reason_of(r.body));
  }
  const std::string& vhost() const { return vhost_; }
  std::string v() const { return encode_segment(vhost_); }

 private:
  Client client_;
  std::string vhost_;
};

int run(const Args& args) {
  const config::Config cfg = config::load_config(args.config_path);
  const BrokerUrl broker = broker_url(cfg.broker.urls.front());
  Endpoint ep = parse_endpoint(args.management.empty() ? "http://" + (broker.host.find(':') != std::string::npos
                                                                          ? "[" + broker.host + "]"
                                                                          : broker.host) +
                                                             ":15672/"
                                                       : args.management);
  if (!ep.has_credentials) {
    ep.user = broker.user;
    ep.password = broker.password;
  }
  Api api(Client(ep, cfg.broker.rpc_timeout), broker.vhost);
  // The credentials first (any tagged user may read the overview), then the
  // vhost, through an exchange every vhost has: a vhost that does not exist
  // would otherwise read as "everything missing".
  std::string version;
  if (auto o = api.get("/api/overview", "the overview", false)) {
    rapidjson::Document d;
    d.Parse(o->data(), o->size());
    if (!d.HasParseError() && d.IsObject()) version = dlq::one_line(str_member(d, "rabbitmq_version"), 40);
  }
  if (!api.get("/api/exchanges/" + api.v() + "/amq.direct", "vhost '" + broker.vhost + "'"))
    throw ManagementError("vhost '" + dlq::printable(broker.vhost, kValueWidth) +
                          "' (of the broker URL) does not exist on the broker");

  const amqp::Topology want = amqp::desired_topology(cfg);
  Observed seen;
  const std::string ex_path = "/api/exchanges/" + api.v() + "/" + encode_segment(want.exchange.name);
  seen.exchange = api.get(ex_path, "exchange '" + want.exchange.name + "'");
  if (seen.exchange)
    seen.bindings = api.get(ex_path + "/bindings/source", "the exchange's bindings").value_or("[]");
  for (const auto& t : want.queues)
    for (const auto& q : t.queues)
      if (!seen.queues.count(q.name))
        seen.queues[q.name] = api.get("/api/queues/" + api.v() + "/" + encode_segment(q.name), "queue '" + q.name + "'");

  const Plan plan = compare(want, seen);
  std::cout << "Comparing " << cfg.path << " with " << ep.display() << " (vhost '"
            << dlq::printable(broker.vhost, kValueWidth) << "'" << (version.empty() ? "" : ", RabbitMQ " + version)
            << ")\n\n"
            << render(plan);
  return plan.in_sync() ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  // A usage error exits 1: a script reads 2 as "the broker differs".
  return util::run_command("event-router plan", kUsage, argc, argv, parse, run, /*usage_status*/ 1);
}

}  // namespace er::plan
