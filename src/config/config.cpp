#include "config/config.hpp"

#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <set>
#include <sstream>

#include <amqp.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include "util/log.hpp"

#ifndef ER_PLUGIN_INSTALL_DIR
#define ER_PLUGIN_INSTALL_DIR "/usr/lib/event-router/plugins"
#endif

namespace fs = std::filesystem;

namespace er::config {

namespace {

std::string normalize(const fs::path& p) {
  std::string s = p.lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

std::string absolute_in(const std::string& base, const std::string& p) {
  fs::path path(p);
  return normalize(path.is_absolute() ? path : fs::path(base) / path);
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string did_you_mean(const std::string& word, std::initializer_list<const char*> options) {
  const char* best = nullptr;
  size_t best_d = 3;
  for (const char* o : options) {
    size_t d = edit_distance(word, o);
    if (d < best_d) best_d = d, best = o;
  }
  return best ? std::string(" (did you mean '") + best + "'?)" : std::string();
}

std::string join(std::initializer_list<const char*> items, const char* sep) {
  std::string out;
  for (const char* i : items) out += (out.empty() ? "" : sep) + std::string(i);
  return out;
}

const char* describe(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Scalar: return "a scalar";
    default: return "nothing";
  }
}

// "500ms", "10s", "5m", "1h": the largest unit that divides evenly.
std::string format_duration(Duration d) {
  long long ms = d.count();
  if (ms != 0 && ms % 3600000 == 0) return std::to_string(ms / 3600000) + "h";
  if (ms != 0 && ms % 60000 == 0) return std::to_string(ms / 60000) + "m";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

// YAML 1.2 core schema float syntax (no .inf/.nan):
// [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
bool float_syntax(const std::string& s) {
  const char* p = s.c_str() + (!s.empty() && (s[0] == '-' || s[0] == '+'));
  bool mant = false;
  while (*p >= '0' && *p <= '9') ++p, mant = true;
  if (*p == '.') {
    ++p;
    while (*p >= '0' && *p <= '9') ++p, mant = true;
  }
  if (mant && (*p == 'e' || *p == 'E')) {
    ++p;
    if (*p == '-' || *p == '+') ++p;
    if (*p >= '0' && *p <= '9') {
      while (*p >= '0' && *p <= '9') ++p;
    } else {
      mant = false;
    }
  }
  return mant && p == s.c_str() + s.size();
}

bool regular_file(const std::string& p, int* err = nullptr) {
  struct stat st;
  if (::stat(p.c_str(), &st) != 0) {
    if (err) *err = errno;
    return false;
  }
  if (err) *err = S_ISREG(st.st_mode) ? 0 : EISDIR;
  return S_ISREG(st.st_mode);
}

// Runs before YAML::LoadAll, which yaml-cpp 0.7 cannot be trusted with: a stray
// ',' makes it loop forever, allocating (jbeder/yaml-cpp#1040); aliases may be
// cyclic (`&a [*a]`) or expand exponentially, and write_json would follow them.
// Syntax errors are left for LoadAll to report.
void check_yaml_limits(const std::string& text, const std::string& file) {
  constexpr size_t kMaxDepth = 64, kMaxNodes = 100000;  // nodes counted with aliases expanded
  struct Limits : YAML::EventHandler {
    struct Open { YAML::anchor_t anchor; size_t nodes; YAML::Mark mark; };
    const std::string& text;
    const std::string& file;
    std::vector<Open> open;
    std::map<YAML::anchor_t, size_t> sizes;  // anchor -> nodes, expanded
    bool started = false;
    YAML::Mark doc;
    Limits(const std::string& t, const std::string& f) : text(t), file(f) {}
    [[noreturn]] void fail(const YAML::Mark& m, const std::string& msg) const {
      throw ConfigError(file + ":" + std::to_string(m.line + 1) + ":" +
                        std::to_string(m.column + 1) + ": " + msg);
    }
    void add(size_t n, const YAML::Mark& m) {
      if (open.empty()) return;
      open.back().nodes = std::min(open.back().nodes + n, kMaxNodes + 1);
      if (open.back().nodes > kMaxNodes)
        fail(m, "more than " + std::to_string(kMaxNodes) + " YAML nodes (aliases expanded)");
    }
    void leaf(const YAML::Mark& m, YAML::anchor_t a) {
      if (a) sizes[a] = 1;
      add(1, m);
    }
    void start(const YAML::Mark& m, YAML::anchor_t a) {
      if (open.size() >= kMaxDepth)
        fail(m, "nesting deeper than " + std::to_string(kMaxDepth) + " levels");
      open.push_back({a, 1, m});
    }
    void end() {
      Open o = open.back();
      open.pop_back();
      if (o.anchor) sizes[o.anchor] = o.nodes;
      add(o.nodes, o.mark);
    }
    void OnDocumentStart(const YAML::Mark& m) override {
      // yaml-cpp made no progress: LoadAll would loop here forever.
      if (started && m.pos == doc.pos)
        fail(m, "unexpected '" + text.substr(static_cast<size_t>(m.pos), 1) + "'");
      started = true, doc = m;
      open.clear(), sizes.clear();  // anchor ids restart per document
    }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark& m, YAML::anchor_t a) override { leaf(m, a); }
    void OnScalar(const YAML::Mark& m, const std::string&, YAML::anchor_t a,
                  const std::string&) override { leaf(m, a); }
    void OnAlias(const YAML::Mark& m, YAML::anchor_t a) override {
      for (const Open& o : open)
        if (o.anchor == a) fail(m, "alias refers to a node that contains it");
      auto it = sizes.find(a);
      add(it == sizes.end() ? 1 : it->second, m);
    }
    void OnSequenceStart(const YAML::Mark& m, const std::string&, YAML::anchor_t a,
                         YAML::EmitterStyle::value) override { start(m, a); }
    void OnSequenceEnd() override { end(); }
    void OnMapStart(const YAML::Mark& m, const std::string&, YAML::anchor_t a,
                    YAML::EmitterStyle::value) override { start(m, a); }
    void OnMapEnd() override { end(); }
  } limits(text, file);
  std::istringstream in(text);
  YAML::Parser parser(in);
  try {
    while (parser.HandleNextDocument(limits)) {
    }
  } catch (const YAML::Exception&) {
  }
}

// A node plus where to report problems with it. `mark` falls back to the key
// (or the parent) when the node has none of its own, e.g. an empty value.
struct Val {
  YAML::Node node;
  YAML::Mark mark;
  YAML::Mark key_mark;
  std::string path;
  bool present = true;
};

// Built by copy construction only: assigning to a YAML::Node writes through
// to the node it refers to.
Val make_val(const YAML::Node& n, const YAML::Mark& key_mark, std::string path) {
  YAML::Mark m = n.IsNull() || n.Mark().line < 0 ? key_mark : n.Mark();
  return Val{n, m, key_mark, std::move(path), true};
}

class Loader {
 public:
  Loader(std::string file, std::string dir) : file_(std::move(file)), dir_(std::move(dir)) {}

  Config load(const std::string& text);

 private:
  [[noreturn]] void fail(const YAML::Mark& m, const std::string& msg) const {
    throw ConfigError(file_ + ":" + std::to_string(m.line + 1) + ":" +
                      std::to_string(m.column + 1) + ": " + msg);
  }
  [[noreturn]] void fail(const Val& v, const std::string& msg) const {
    fail(v.mark, (v.path.empty() ? "" : v.path + ": ") + msg);
  }
  std::string where(const YAML::Mark& m) const {
    return file_ + ":" + std::to_string(m.line + 1) + ":" + std::to_string(m.column + 1) + ": ";
  }
  std::vector<std::string> warnings_;

  static std::string child_path(const std::string& parent, const std::string& key) {
    return parent.empty() ? key : parent + "." + key;
  }

  // Rejects unknown and duplicate keys; yaml-cpp keeps duplicates when
  // iterating but lookups silently see only the first.
  void check_keys(const Val& map, std::initializer_list<const char*> allowed) const;
  void check_duplicates(const Val& map) const;

  Val child(const Val& map, const char* key) const {
    for (auto it = map.node.begin(); it != map.node.end(); ++it)
      if (it->first.IsScalar() && it->first.Scalar() == key)
        return make_val(it->second, it->first.Mark(), child_path(map.path, key));
    return Val{YAML::Node(), map.mark, map.mark, child_path(map.path, key), false};
  }

  Val required(const Val& map, const char* key) const {
    Val v = child(map, key);
    if (!v.present) fail(map, std::string("missing required key '") + key + "'");
    return v;
  }

  Val expect_map(Val v) const {
    if (!v.node.IsMap()) fail(v, std::string("expected a mapping, got ") + describe(v.node));
    return v;
  }

  std::vector<Val> list(const Val& v, const char* what) const {
    if (!v.node.IsSequence())
      fail(v, std::string("expected a list of ") + what + ", got " + describe(v.node));
    std::vector<Val> out;
    size_t i = 0;
    for (auto it = v.node.begin(); it != v.node.end(); ++it, ++i) {
      out.push_back(make_val(*it, v.mark, v.path + "[" + std::to_string(i) + "]"));
    }
    return out;
  }

  std::string subst(const Val& v, const std::string& raw) const {
    try {
      return substitute_env(raw);
    } catch (const std::invalid_argument& e) {
      fail(v.mark, "key '" + v.path + "': " + e.what());
    }
  }

  std::string str(const Val& v) const {
    if (!v.node.IsScalar()) fail(v, std::string("expected a string, got ") + describe(v.node));
    return subst(v, v.node.Scalar());
  }

  bool boolean(const Val& v) const {
    std::string s = str(v);
    if (s == "true" || s == "yes" || s == "on") return true;
    if (s == "false" || s == "no" || s == "off") return false;
    fail(v, "expected true or false, got '" + s + "'");
  }

  std::string nonempty_str(const Val& v) const {
    std::string s = str(v);
    if (s.empty()) fail(v, "must not be empty");
    return s;
  }

  uint64_t integer(const Val& v, uint64_t lo, uint64_t hi) const {
    std::string range = std::to_string(lo) + ".." + std::to_string(hi);
    if (!v.node.IsScalar())
      fail(v, "expected an integer " + range + ", got " + describe(v.node));
    std::string s = subst(v, v.node.Scalar());
    bool digits = !s.empty() && s.size() <= 19 &&
                  std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits) fail(v, "expected an integer " + range + ", got '" + s + "'");
    uint64_t n = std::stoull(s);
    if (n < lo || n > hi) fail(v, s + " is out of range " + range);
    return n;
  }

  Duration duration(const Val& v, bool allow_zero) const {
    if (!v.node.IsScalar()) fail(v, std::string("expected a duration, got ") + describe(v.node));
    std::string s = subst(v, v.node.Scalar());
    Duration d;
    try {
      d = parse_duration(s);
    } catch (const std::invalid_argument& e) {
      fail(v, e.what());
    }
    if (!allow_zero && d.count() == 0) fail(v, "duration must be greater than 0");
    return d;
  }

  // A real number >= lo, e.g. 2 or 1.5.
  double number(const Val& v, double lo) const {
    char lo_text[32];
    std::snprintf(lo_text, sizeof lo_text, "%g", lo);
    if (!v.node.IsScalar())
      fail(v, std::string("expected a number >= ") + lo_text + ", got " + describe(v.node));
    std::string s = subst(v, v.node.Scalar());
    double d = float_syntax(s) ? std::strtod(s.c_str(), nullptr) : NAN;
    if (!std::isfinite(d)) fail(v, std::string("expected a number >= ") + lo_text + ", got '" + s + "'");
    if (d < lo) fail(v, s + " is out of range (must be >= " + lo_text + ")");
    return d;
  }

  size_t size_bytes(const Val& v) const;

  template <typename E>
  E choice(const Val& v, std::initializer_list<std::pair<const char*, E>> options,
           std::initializer_list<const char*> names) const {
    std::string s = str(v);
    for (auto& [name, value] : options)
      if (s == name) return value;
    fail(v, "invalid value '" + s + "' (expected one of: " + join(names, ", ") + ")" +
                did_you_mean(s, names));
  }

  void topic(const Val& v, const std::string& s) const {
    try {
      TopicPattern p(s);
    } catch (const std::invalid_argument& e) {
      fail(v, e.what());
    }
  }

  Ordering ordering(const Val& v) const {
    return choice<Ordering>(v, {{"none", Ordering::None}, {"aggregate", Ordering::Aggregate}}, {"none", "aggregate"});
  }

  void load_broker(const Val& v, BrokerConfig& b) const;
  void load_exchange(const Val& v, ExchangeConfig& e) const;
  void load_queue(const Val& v, QueueConfig& q);
  void load_handler(const Val& v, const QueueConfig& q, HandlerConfig& h);
  void load_retry(const Val& v, RetryConfig& r) const;
  void load_security(const Val& v, SecurityConfig& s) const;
  std::string resolve_dir(const Val& v) const;
  std::string resolve_plugin(const Val& v) const;
  std::string resolve_program(const Val& v) const;
  void write_json(const Val& v, rapidjson::Writer<rapidjson::StringBuffer>& w) const;
  std::vector<QueueArgument> queue_arguments(const Val& v) const;
  void load_queue_type(const Val& v, QueueConfig& q);
  void check_url(const Val& v, const std::string& url) const;

  static Mark to_mark(const YAML::Mark& m) { return Mark{m.line + 1, m.column + 1}; }

  std::string file_;
  std::string dir_;
  std::map<std::string, YAML::Mark> handler_names_;
};

void Loader::check_duplicates(const Val& map) const {
  std::set<std::string> seen;
  for (auto it = map.node.begin(); it != map.node.end(); ++it) {
    if (!it->first.IsScalar()) continue;
    if (!seen.insert(it->first.Scalar()).second) {
      Val k = map;
      k.mark = it->first.Mark();
      fail(k, "duplicate key '" + it->first.Scalar() + "'");
    }
  }
}

void Loader::check_keys(const Val& map, std::initializer_list<const char*> allowed) const {
  check_duplicates(map);
  for (auto it = map.node.begin(); it != map.node.end(); ++it) {
    Val k = map;
    k.mark = it->first.Mark();
    if (!it->first.IsScalar()) fail(k, "keys must be plain strings");
    const std::string& key = it->first.Scalar();
    bool ok = std::any_of(allowed.begin(), allowed.end(),
                          [&](const char* a) { return key == a; });
    if (!ok) fail(k, "unknown key '" + key + "'" + did_you_mean(key, allowed));
  }
}

Config Loader::load(const std::string& text) {
  check_yaml_limits(text, file_);
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    YAML::Mark m = e.mark;
    if (m.line < 0) m.line = m.column = 0;
    fail(m, e.msg);
  }
  YAML::Mark start;
  start.line = start.column = 0;
  Val root{docs.empty() ? YAML::Node() : docs[0], start, start, "", true};
  if (docs.empty() || docs[0].IsNull())
    fail(root, "the file is empty; expected a mapping with 'broker', 'exchange' and 'queues'");
  if (docs.size() > 1) fail(root, "expected a single YAML document, found " +
                                     std::to_string(docs.size()));
  if (root.node.Mark().line >= 0) root.mark = root.node.Mark();
  if (!root.node.IsMap())
    fail(root, std::string("expected a mapping at the top level, got ") + describe(root.node));
  check_keys(root, {"broker", "exchange", "queues", "shutdown_timeout", "plugin_threads", "workers", "max_message_bytes",
                    "schemas", "log", "state_dir", "dedupe_store", "http", "security", "crash_loop"});

  Config c;
  c.path = file_;
  c.dir = dir_;
  load_broker(expect_map(required(root, "broker")), c.broker);
  load_exchange(expect_map(required(root, "exchange")), c.exchange);

  if (Val v = child(root, "shutdown_timeout"); v.present) c.shutdown_timeout = duration(v, true);
  if (Val v = child(root, "plugin_threads"); v.present) c.plugin_threads = static_cast<unsigned>(integer(v, 1, 65535));
  // `workers:` meant these threads before worker handlers existed.
  if (Val v = child(root, "workers"); v.present) {
    if (child(root, "plugin_threads").present)
      fail(v.key_mark, "'workers' is the old name of 'plugin_threads'; give only 'plugin_threads'");
    c.plugin_threads = static_cast<unsigned>(integer(v, 1, 65535));
    warnings_.push_back(where(v.key_mark) + "'workers' is deprecated, it is now called 'plugin_threads' "
                        "(threads for blocking plugins; worker handlers are 'worker:')");
  }
  if (Val v = child(root, "max_message_bytes"); v.present) c.max_message_bytes = size_bytes(v);
  if (Val v = child(root, "schemas"); v.present) c.schemas_dir = resolve_dir(v);
  if (Val v = child(root, "state_dir"); v.present) c.state_dir = absolute_in(dir_, nonempty_str(v));
  if (Val v = child(root, "crash_loop"); v.present) {
    expect_map(v);
    check_keys(v, {"max_crashes", "ttl"});
    if (Val m = child(v, "max_crashes"); m.present) c.crash_max = static_cast<unsigned>(integer(m, 0, 1000));
    if (Val t = child(v, "ttl"); t.present) {
      c.crash_ttl = duration(t, false);
      if (c.crash_ttl < std::chrono::minutes(1) || c.crash_ttl > std::chrono::hours(24 * 30))
        fail(t, "must be between 1m and 30d");
    }
  }
  if (Val v = child(root, "dedupe_store"); v.present) {
    expect_map(v);
    check_keys(v, {"postgres", "table", "timeout", "lease", "on_unavailable"});
    auto& d = c.dedupe_store;
    d.postgres = nonempty_str(required(v, "postgres"));
    if (Val t = child(v, "table"); t.present) {
      d.table = nonempty_str(t);
      // Spliced into SQL: a plain identifier only.
      bool ok = d.table.size() <= 63 && !(d.table[0] >= '0' && d.table[0] <= '9') &&
                d.table.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789_") == std::string::npos;
      if (!ok) fail(t, "table must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 63 characters)");
    }
    if (Val t = child(v, "timeout"); t.present) {
      d.timeout = duration(t, false);
      if (d.timeout < std::chrono::milliseconds(10) || d.timeout > std::chrono::minutes(1))
        fail(t, "timeout must be between 10ms and 1m");
    }
    if (Val t = child(v, "lease"); t.present) {
      d.lease = duration(t, false);
      if (d.lease < std::chrono::seconds(1)) fail(t, "lease must be at least 1s");
    }
    if (Val o = child(v, "on_unavailable"); o.present)
      d.on_unavailable = choice<DedupeUnavailable>(o, {{"retry", DedupeUnavailable::Retry}, {"run", DedupeUnavailable::Run}},
                                                   {"retry", "run"});
  }
  if (Val v = child(root, "http"); v.present) {
    expect_map(v);
    check_keys(v, {"listen"});
    Val l = required(v, "listen");
    c.http_listen = nonempty_str(l);
    auto colon = c.http_listen.rfind(':');
    bool ok = colon != std::string::npos && colon + 1 < c.http_listen.size() &&
              c.http_listen.find_first_not_of("0123456789", colon + 1) == std::string::npos &&
              c.http_listen.size() - colon - 1 <= 5 && std::stoul(c.http_listen.substr(colon + 1)) <= 65535;
    if (!ok) fail(l, "expected host:port (e.g. 127.0.0.1:9090), got '" + c.http_listen + "'");
  }
  if (Val v = child(root, "log"); v.present) {
    expect_map(v);
    check_keys(v, {"level", "format", "events", "sample"});
    if (Val f = child(v, "format"); f.present)
      c.log.format = choice<LogFormat>(f, {{"text", LogFormat::Text}, {"json", LogFormat::Json}}, {"text", "json"});
    if (Val l = child(v, "level"); l.present)
      c.log.level = choice<LogLevel>(l,
                                     {{"debug", LogLevel::Debug},
                                      {"info", LogLevel::Info},
                                      {"warn", LogLevel::Warn},
                                      {"error", LogLevel::Error}},
                                     {"debug", "info", "warn", "error"});
    if (Val e = child(v, "events"); e.present)
      c.log.events = choice<EventLog>(e, {{"info", EventLog::Info}, {"debug", EventLog::Debug}, {"off", EventLog::Off}},
                                      {"info", "debug", "off"});
    if (Val n = child(v, "sample"); n.present) {
      c.log.sample = static_cast<unsigned>(integer(n, 1, 1000000));
      if (c.log.events == EventLog::Off) fail(n, "sample has no effect with events: off");
    }
  }

  if (Val v = child(root, "security"); v.present) load_security(expect_map(v), c.security);

  Val queues = required(root, "queues");
  auto items = list(queues, "queues");
  if (items.empty()) fail(queues, "at least one queue is required");
  std::map<std::string, YAML::Mark> queue_names;
  for (auto& item : items) {
    QueueConfig q;
    q.max_message_bytes = c.max_message_bytes;  // unless the queue sets its own
    q.crash_max = c.crash_max;
    load_queue(item, q);
    auto [it, fresh] = queue_names.emplace(q.name, child(item, "name").mark);
    if (!fresh)
      fail(child(item, "name"), "duplicate queue name '" + q.name + "' (first defined at line " +
                                    std::to_string(it->second.line + 1) + ")");
    c.queues.push_back(std::move(q));
  }
  c.warnings = std::move(warnings_);
  return c;
}

// Broker-side x-arguments: plain integers and booleans keep their type (the
// broker compares types: x-max-length must be a number), the rest are strings.
std::vector<QueueArgument> Loader::queue_arguments(const Val& v) const {
  expect_map(v);
  check_duplicates(v);
  std::vector<QueueArgument> out;
  for (auto it = v.node.begin(); it != v.node.end(); ++it) {
    Val k = v;
    k.mark = it->first.Mark();
    if (!it->first.IsScalar()) fail(k, "keys must be plain strings");
    Val item = make_val(it->second, it->first.Mark(), child_path(v.path, it->first.Scalar().c_str()));
    QueueArgument a;
    a.key = it->first.Scalar();
    if (!item.node.IsScalar()) fail(item, std::string("expected a number, boolean or string, got ") + describe(item.node));
    std::string text = str(item);
    bool plain = item.node.Tag() != "!";
    if (plain && (text == "true" || text == "false")) {
      a.kind = QueueArgument::Kind::Bool;
      a.b = text == "true";
    } else if (plain && !text.empty() &&
               text.find_first_not_of("0123456789", text[0] == '-' ? 1 : 0) == std::string::npos &&
               text != "-") {
      a.kind = QueueArgument::Kind::Int;
      try {
        a.i = std::stoll(text);
      } catch (const std::exception&) {
        fail(item, "integer '" + text + "' is out of range");
      }
    } else {
      a.s = text;
    }
    out.push_back(std::move(a));
  }
  return out;
}

void Loader::check_url(const Val& v, const std::string& url) const {
  // Refuse here what the connection could never use, instead of retrying it forever.
  std::vector<char> buf(url.begin(), url.end());
  buf.push_back('\0');
  amqp_connection_info info;
  if (amqp_parse_url(buf.data(), &info) != AMQP_STATUS_OK)
    fail(v, "'" + log::mask_url(url) + "' is not a valid broker URL (expected amqp://user:password@host:port/vhost)");
}

void Loader::load_broker(const Val& v, BrokerConfig& b) const {
  check_keys(v, {"url", "urls", "heartbeat", "reconnect", "rpc_timeout", "ack_window", "tls"});
  Val url = child(v, "url");
  Val urls = child(v, "urls");
  if (url.present && urls.present) fail(urls, "set either 'url' or 'urls', not both");
  if (!url.present && !urls.present) fail(v, "missing required key 'url' (or 'urls')");
  if (url.present) {
    b.urls.push_back(nonempty_str(url));
    check_url(url, b.urls.back());
  } else {
    auto items = list(urls, "broker URLs");
    if (items.empty()) fail(urls, "at least one URL is required");
    for (auto& item : items) {
      b.urls.push_back(nonempty_str(item));
      check_url(item, b.urls.back());
    }
  }
  b.url = b.urls.front();
  if (Val h = child(v, "heartbeat"); h.present) {
    b.heartbeat = duration(h, true);
    // AMQP negotiates heartbeats as a 16-bit number of seconds.
    if (b.heartbeat.count() % 1000 != 0)
      fail(h, "heartbeat must be a whole number of seconds");
    if (b.heartbeat > std::chrono::seconds(65535)) fail(h, "heartbeat must be at most 65535s");
  }
  if (Val t = child(v, "rpc_timeout"); t.present) {
    b.rpc_timeout = duration(t, false);
    if (b.rpc_timeout < std::chrono::milliseconds(100)) fail(t, "rpc_timeout must be at least 100ms");
  }
  if (Val w = child(v, "ack_window"); w.present) {
    b.ack_window = duration(w, true);
    // A held ack holds a prefetch slot: a long wait only slows the queue.
    if (b.ack_window > std::chrono::seconds(1)) fail(w, "ack_window must be at most 1s");
  }
  if (Val t = child(v, "tls"); t.present) {
    expect_map(t);
    check_keys(t, {"ca_file", "cert_file", "key_file", "verify_peer", "verify_hostname"});
    auto file = [&](const char* key) -> std::string {
      Val f = child(t, key);
      if (!f.present) return {};
      std::string path = absolute_in(dir_, nonempty_str(f));
      if (::access(path.c_str(), R_OK) != 0)
        fail(f, "cannot read " + path + ": " + std::strerror(errno));
      return path;
    };
    b.tls.ca_file = file("ca_file");
    b.tls.cert_file = file("cert_file");
    b.tls.key_file = file("key_file");
    if (b.tls.cert_file.empty() != b.tls.key_file.empty())
      fail(t, "cert_file and key_file go together (client certificate authentication)");
    if (Val p = child(t, "verify_peer"); p.present) b.tls.verify_peer = boolean(p);
    if (Val h = child(t, "verify_hostname"); h.present) b.tls.verify_hostname = boolean(h);
    // TLS settings on a plain amqp:// URL would be ignored and the password
    // sent in clear: refuse rather than let the operator believe it is TLS.
    for (const auto& u : b.urls)
      if (u.rfind("amqps://", 0) != 0)
        fail(t, "TLS settings need amqps:// URLs, but '" + log::mask_url(u) +
                    "' is not amqps:// (the connection would not use TLS)");
  }
  if (Val r = child(v, "reconnect"); r.present) {
    expect_map(r);
    check_keys(r, {"initial", "max"});
    if (Val i = child(r, "initial"); i.present) b.reconnect_initial = duration(i, false);
    if (Val m = child(r, "max"); m.present) {
      b.reconnect_max = duration(m, false);
      if (b.reconnect_max < b.reconnect_initial) fail(m, "max must be at least initial");
    }
  }
}

void Loader::load_exchange(const Val& v, ExchangeConfig& e) const {
  check_keys(v, {"name", "type"});
  e.name = nonempty_str(required(v, "name"));
  if (Val t = child(v, "type"); t.present)
    e.type = choice<std::string>(t,
                                 {{"topic", "topic"},
                                  {"direct", "direct"},
                                  {"fanout", "fanout"},
                                  {"headers", "headers"}},
                                 {"topic", "direct", "fanout", "headers"});
}

// `type:` and `delivery_limit:`, checked against an x-queue-type in `arguments:`.
void Loader::load_queue_type(const Val& v, QueueConfig& q) {
  const QueueArgument* arg_type = nullptr;
  for (const auto& a : q.arguments)
    if (a.key == "x-queue-type") arg_type = &a;
  Val t = child(v, "type");
  if (t.present) {
    q.type = choice<QueueType>(t, {{"classic", QueueType::Classic}, {"quorum", QueueType::Quorum}},
                               {"classic", "quorum"});
    const char* want = q.type == QueueType::Quorum ? "quorum" : "classic";
    if (arg_type && (arg_type->kind != QueueArgument::Kind::String || arg_type->s != want))
      fail(t, std::string("'type: ") + want + "' contradicts 'arguments: {x-queue-type: ...}': remove the argument");
  } else if (arg_type && arg_type->kind == QueueArgument::Kind::String && arg_type->s == "quorum") {
    warnings_.push_back(where(v.mark) + "queue '" + q.name +
                        "': 'arguments: {x-queue-type: quorum}' makes only this queue quorum; 'type: quorum' makes "
                        "its dead-letter and delay queues quorum too, with at-least-once dead-lettering");
  }
  if (Val d = child(v, "delivery_limit"); d.present) {
    if (q.type != QueueType::Quorum)
      fail(d, "delivery_limit needs 'type: quorum' (classic queues have no delivery limit)");
    q.delivery_limit = static_cast<int64_t>(integer(d, 1, 1000000));
  }
}

void Loader::load_queue(const Val& v, QueueConfig& q) {
  expect_map(v);
  check_keys(v, {"name", "bindings", "prefetch", "unhandled", "dead_letter_queue", "arguments",
                 "dead_letter_arguments", "dedupe", "retry",
                 "max_message_bytes", "handlers", "ordering", "ordering_hold_max", "single_active_consumer",
                 "crash_loop", "type", "delivery_limit"});
  q.mark = to_mark(v.mark);
  q.name = nonempty_str(required(v, "name"));
  if (Val b = child(v, "bindings"); b.present) {
    for (auto& item : list(b, "topic patterns")) {
      std::string s = str(item);
      topic(item, s);
      q.bindings.push_back(s);
    }
  }
  if (Val p = child(v, "prefetch"); p.present) q.prefetch = static_cast<uint16_t>(integer(p, 1, 65535));
  if (Val u = child(v, "unhandled"); u.present)
    q.unhandled = choice<Unhandled>(u, {{"dead-letter", Unhandled::DeadLetter}, {"ack", Unhandled::Ack}},
                                    {"dead-letter", "ack"});
  q.dead_letter_queue = q.name + ".dlq";
  if (Val d = child(v, "dead_letter_queue"); d.present) {
    q.dead_letter_queue = nonempty_str(d);
    if (q.dead_letter_queue == q.name)
      fail(d, "the dead-letter queue must differ from the queue itself");
  }
  if (Val a = child(v, "arguments"); a.present) q.arguments = queue_arguments(a);
  for (const auto& a : q.arguments)
    if (a.key == "x-single-active-consumer") q.single_active_consumer = a.kind == QueueArgument::Kind::Bool && a.b;
  if (Val s = child(v, "single_active_consumer"); s.present) {
    const bool on = boolean(s);
    for (const auto& a : q.arguments)
      if (a.key == "x-single-active-consumer")
        fail(s, "set either single_active_consumer or arguments.x-single-active-consumer, not both");
    // It is a queue argument: the broker then refuses a declare without it.
    if (on) {
      QueueArgument a;
      a.key = "x-single-active-consumer";
      a.kind = QueueArgument::Kind::Bool;
      a.b = true;
      q.arguments.push_back(std::move(a));
    }
    q.single_active_consumer = on;
  }
  if (Val dd = child(v, "dedupe"); dd.present) {
    expect_map(dd);
    check_keys(dd, {"ttl"});
    q.dedupe_ttl = duration(required(dd, "ttl"), false);
    if (q.dedupe_ttl < std::chrono::seconds(1)) fail(child(dd, "ttl"), "ttl must be at least 1s");
  }
  if (Val a = child(v, "dead_letter_arguments"); a.present) q.dead_letter_arguments = queue_arguments(a);
  load_queue_type(v, q);
  if (Val o = child(v, "ordering"); o.present) q.ordering = ordering(o);
  if (Val m = child(v, "ordering_hold_max"); m.present) {
    q.ordering_hold_max = duration(m, false);
    if (q.ordering_hold_max < std::chrono::seconds(1) || q.ordering_hold_max > std::chrono::hours(24))
      fail(m, "ordering_hold_max must be between 1s and 24h (and below the broker's consumer_timeout, 30m by default)");
  }
  if (Val r = child(v, "retry"); r.present) load_retry(r, q.retry);
  if (Val m = child(v, "max_message_bytes"); m.present) q.max_message_bytes = size_bytes(m);
  if (Val cl = child(v, "crash_loop"); cl.present) {
    expect_map(cl);
    check_keys(cl, {"max_crashes"});  // the ttl is the daemon's, top level
    q.crash_max = static_cast<unsigned>(integer(required(cl, "max_crashes"), 0, 1000));
  }
  if (Val h = child(v, "handlers"); h.present) {
    for (auto& item : list(h, "handlers")) {
      HandlerConfig hc;
      load_handler(item, q, hc);
      q.handlers.push_back(std::move(hc));
    }
  }
}

void Loader::load_handler(const Val& v, const QueueConfig& q, HandlerConfig& h) {
  expect_map(v);
  check_keys(v, {"name", "events", "plugin", "config", "concurrency", "retry", "exec", "worker", "timeout",
                 "kill_grace", "env", "inherit_env", "processes", "start_timeout", "restart", "emit", "ordering"});
  h.mark = to_mark(v.mark);
  Val name = required(v, "name");
  h.name = nonempty_str(name);
  auto [it, fresh] = handler_names_.emplace(h.name, name.mark);
  if (!fresh)
    fail(name, "duplicate handler name '" + h.name + "' (first defined at line " +
                   std::to_string(it->second.line + 1) + ")");

  Val events = required(v, "events");
  auto items = list(events, "topic patterns");
  if (items.empty()) fail(events, "at least one event pattern is required (use \"#\" for all)");
  for (auto& item : items) {
    std::string s = str(item);
    try {
      h.events.emplace_back(s);
    } catch (const std::invalid_argument& e) {
      fail(item, e.what());
    }
  }

  Val plugin = child(v, "plugin");
  Val exec = child(v, "exec");
  Val worker = child(v, "worker");
  int kinds = plugin.present + exec.present + worker.present;
  if (kinds > 1) {
    const Val& second = worker.present ? worker : exec;
    fail(second.key_mark, v.path + ": a handler takes one of 'plugin', 'exec' and 'worker'");
  }
  if (kinds == 0) fail(v, "handler needs one of 'plugin', 'exec' and 'worker'");

  h.concurrency = q.prefetch;
  if (Val c = child(v, "concurrency"); c.present) h.concurrency = static_cast<unsigned>(integer(c, 1, 65535));
  h.retry = q.retry;
  if (Val r = child(v, "retry"); r.present) load_retry(r, h.retry);
  h.ordering = q.ordering;
  if (Val o = child(v, "ordering"); o.present) h.ordering = ordering(o);
  if (Val e = child(v, "emit"); e.present) {
    expect_map(e);
    check_keys(e, {"style"});
    if (Val st = child(e, "style"); st.present)
      h.emit_style = choice<EmitStyle>(st, {{"snake", EmitStyle::Snake}, {"camel", EmitStyle::Camel}},
                                       {"snake", "camel"});
  }

  static const char* const kProcessOnly[] = {"kill_grace", "env", "inherit_env"};
  static const char* const kWorkerOnly[] = {"processes", "start_timeout", "restart"};
  if (!worker.present)
    for (const char* k : kWorkerOnly)
      if (Val x = child(v, k); x.present)
        fail(x.key_mark, v.path + ": '" + k + "' only applies to worker handlers");
  if (plugin.present) {
    h.kind = HandlerKind::Plugin;
    for (const char* k : kProcessOnly)
      if (Val x = child(v, k); x.present)
        fail(x.key_mark, v.path + ": '" + k + "' only applies to exec and worker handlers");
    h.plugin_path = resolve_plugin(plugin);
    // For an ABI version 2 plugin: how long an event may stay pending.
    if (Val t = child(v, "timeout"); t.present) h.timeout = duration(t, false);
    if (Val cfg = child(v, "config"); cfg.present && !cfg.node.IsNull()) {
      rapidjson::StringBuffer buf;
      rapidjson::Writer<rapidjson::StringBuffer> w(buf);
      write_json(cfg, w);
      h.plugin_config_json = buf.GetString();
    }
    return;
  }

  h.kind = worker.present ? HandlerKind::Worker : HandlerKind::Exec;
  const Val& cmd = worker.present ? worker : exec;
  if (Val x = child(v, "config"); x.present)
    fail(x.key_mark, v.path + ": 'config' only applies to plugin handlers");
  auto args = list(cmd, "arguments");
  if (args.empty()) fail(cmd, "the argument list must not be empty");
  for (auto& a : args) h.argv.push_back(str(a));
  h.argv[0] = resolve_program(args[0]);
  if (Val t = child(v, "timeout"); t.present) h.timeout = duration(t, false);
  if (Val k = child(v, "kill_grace"); k.present) h.kill_grace = duration(k, true);
  if (worker.present) {
    if (Val p = child(v, "processes"); p.present) h.processes = static_cast<unsigned>(integer(p, 1, 256));
    h.per_process = h.concurrency;
    h.concurrency = h.processes * h.per_process;
    if (Val t = child(v, "start_timeout"); t.present) h.start_timeout = duration(t, false);
    if (Val r = child(v, "restart"); r.present) {
      expect_map(r);
      check_keys(r, {"initial", "max"});
      if (Val i = child(r, "initial"); i.present) h.restart_initial = duration(i, false);
      if (Val m = child(r, "max"); m.present) h.restart_max = duration(m, false);
      if (h.restart_max < h.restart_initial)
        fail(r, "'max' must not be below 'initial'");
    }
  }
  if (Val e = child(v, "env"); e.present) {
    expect_map(e);
    check_duplicates(e);
    for (auto i = e.node.begin(); i != e.node.end(); ++i) {
      Val val = make_val(i->second, i->first.Mark(), child_path(e.path, i->first.Scalar()));
      const std::string& key = i->first.Scalar();
      if (!i->first.IsScalar() || key.empty() || key.find('=') != std::string::npos)
        fail(val.key_mark, e.path + ": invalid environment variable name '" + key + "'");
      if (!val.node.IsScalar())
        fail(val, std::string("expected a string value, got ") + describe(val.node));
      h.env.emplace_back(key, str(val));
    }
  }
  if (Val ie = child(v, "inherit_env"); ie.present) {
    for (auto& item : list(ie, "variable names")) {
      std::string s = nonempty_str(item);
      if (s.find('=') != std::string::npos)
        fail(item, "invalid environment variable name '" + s + "'");
      h.inherit_env.push_back(s);
    }
  }
}

// `r` holds the inherited values (defaults, or the queue's); each key given
// here replaces one of them.
void Loader::load_retry(const Val& v, RetryConfig& r) const {
  expect_map(v);
  check_keys(v, {"max_attempts", "delay", "multiplier", "max_delay"});
  if (Val m = child(v, "max_attempts"); m.present) r.max_attempts = static_cast<unsigned>(integer(m, 1, 1000));
  Val delay = child(v, "delay");
  if (delay.present) r.delay = duration(delay, false);
  if (Val m = child(v, "multiplier"); m.present) r.multiplier = number(m, 1);
  Val max_delay = child(v, "max_delay");
  if (max_delay.present) r.max_delay = duration(max_delay, true);
  if (r.max_delay >= r.delay) return;
  if (max_delay.present)
    fail(max_delay, "max_delay " + format_duration(r.max_delay) + " is shorter than delay " +
                        format_duration(r.delay));
  // Only `delay` is set here: the max_delay it exceeds is inherited.
  fail(delay, "delay " + format_duration(r.delay) + " is longer than max_delay " +
                  format_duration(r.max_delay) + " (set max_delay too)");
}

// The copy key is read here, so that a missing or short key stops the load
// (and a reload) with the key's position instead of failing later.
void Loader::load_security(const Val& v, SecurityConfig& s) const {
  constexpr size_t kMinKey = 32, kMaxKey = 4096;  // kMinKey = settle::CopySigner::kMinKeyBytes
  check_keys(v, {"copy_key_file", "copy_key_env"});
  Val file = child(v, "copy_key_file");
  Val env = child(v, "copy_key_env");
  if (file.present && env.present)
    fail(env.key_mark, v.path + ": set either 'copy_key_file' or 'copy_key_env', not both");
  auto check_size = [&](const Val& at, const std::string& what, size_t n) {
    if (n < kMinKey)
      fail(at, what + " is " + std::to_string(n) + " bytes; the copy key needs at least " + std::to_string(kMinKey) +
                   " (e.g. head -c 32 /dev/urandom > copy.key)");
    if (n > kMaxKey) fail(at, what + " is larger than " + std::to_string(kMaxKey) + " bytes: not a key file?");
  };
  if (file.present) {
    s.copy_key_file = absolute_in(dir_, nonempty_str(file));
    const std::string& path = s.copy_key_file;
    // Checked before opening: opening a FIFO would hang the load, a device may act on open.
    int err = 0;
    if (!regular_file(path, &err))
      fail(file, "cannot read " + path + ": " + (err == EISDIR ? "not a regular file" : std::strerror(err)));
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail(file, "cannot read " + path + ": " + std::strerror(errno));
    char buf[kMaxKey + 1];
    size_t n = 0;
    while (n < sizeof buf) {
      ssize_t r = ::read(fd, buf + n, sizeof buf - n);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        int err = errno;
        ::close(fd);
        fail(file, "cannot read " + path + ": " + std::strerror(err));
      }
      if (r == 0) break;
      n += static_cast<size_t>(r);
    }
    ::close(fd);
    check_size(file, path, n);
    s.copy_key.assign(buf, n);
  }
  if (env.present) {
    s.copy_key_env = nonempty_str(env);
    const char* value = std::getenv(s.copy_key_env.c_str());
    if (!value) fail(env, "environment variable '" + s.copy_key_env + "' is not set");
    check_size(env, "environment variable '" + s.copy_key_env + "'", std::strlen(value));
    s.copy_key = value;
  }
}

// Bytes, or a whole number with a unit: 512KiB, 1MiB, 2MB.
size_t Loader::size_bytes(const Val& v) const {
  constexpr uint64_t kMax = uint64_t{128} << 20;  // RabbitMQ's largest allowed max_message_size
  static const std::pair<const char*, uint64_t> kUnits[] = {
      {"B", 1},         {"KB", 1000},      {"kB", 1000},       {"KiB", 1 << 10},
      {"MB", 1000000},  {"MiB", 1 << 20},  {"GB", 1000000000}, {"GiB", 1 << 30}};
  if (!v.node.IsScalar()) fail(v, std::string("expected a size, got ") + describe(v.node));
  std::string s = subst(v, v.node.Scalar());
  size_t p = 0;
  while (p < s.size() && s[p] >= '0' && s[p] <= '9') ++p;
  if (p == 0)
    fail(v, "invalid size '" + s + "' (expected a number of bytes or e.g. 512KiB, 1MiB, 2MB)");
  if (s[p] == '.') fail(v, "invalid size '" + s + "': use a whole number (e.g. 1536KiB for 1.5MiB)");
  bool overflow = p > 19;
  uint64_t n = overflow ? 0 : std::stoull(s.substr(0, p));
  while (p < s.size() && s[p] == ' ') ++p;
  std::string unit = s.substr(p);
  uint64_t scale = unit.empty() ? 1 : 0;
  for (auto& [name, bytes] : kUnits)
    if (unit == name) scale = bytes;
  if (scale == 0)
    fail(v, "invalid size '" + s + "': unknown unit '" + unit + "' (use B, KB, KiB, MB or MiB)" +
                did_you_mean(unit, {"B", "KB", "KiB", "MB", "MiB"}));
  if (!overflow && n == 0) fail(v, "size must be at least 1 byte");
  if (overflow || n > kMax / scale)
    fail(v, "size '" + s + "' is larger than 128MiB (RabbitMQ's maximum message size)");
  return static_cast<size_t>(n * scale);
}

std::string Loader::resolve_dir(const Val& v) const {
  std::string abs = absolute_in(dir_, nonempty_str(v));
  struct stat st;
  if (::stat(abs.c_str(), &st) != 0) fail(v, "folder '" + abs + "': " + std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) fail(v, "folder '" + abs + "': not a directory");
  return abs;
}

std::string Loader::resolve_plugin(const Val& v) const {
  std::string p = nonempty_str(v);
  if (p.find('/') != std::string::npos) {
    std::string abs = absolute_in(dir_, p);
    int err = 0;
    if (!regular_file(abs, &err))
      fail(v, "plugin file '" + abs + "': " + (err == EISDIR ? "not a regular file" : std::strerror(err)));
    return abs;
  }
  std::error_code ec;
  std::string cwd = fs::current_path(ec).string();
  std::string searched;
  for (const auto& d : plugin_search_dirs()) {
    // Search dirs come from the environment/build, not the file: relative = cwd.
    std::string candidate = absolute_in(cwd, (fs::path(d) / p).string());
    if (regular_file(candidate)) return candidate;
    searched += (searched.empty() ? "" : ", ") + d;
  }
  fail(v, "plugin '" + p + "' not found in " + searched +
              " (set EVENT_ROUTER_PLUGIN_DIR or give a path)");
}

std::string Loader::resolve_program(const Val& v) const {
  std::string p = v.node.IsScalar() ? subst(v, v.node.Scalar()) : std::string();
  if (p.empty()) fail(v, "program name must not be empty");
  if (p.find('/') != std::string::npos) {
    std::string abs = absolute_in(dir_, p);
    int err = 0;
    if (!regular_file(abs, &err))
      fail(v, "program '" + abs + "': " + (err == EISDIR ? "not a regular file" : std::strerror(err)));
    if (::access(abs.c_str(), X_OK) != 0) fail(v, "program '" + abs + "' is not executable");
    return abs;
  }
  // Mirror execvp: default search path when PATH is unset, empty entry = cwd.
  const char* env_path = std::getenv("PATH");
  std::string search = env_path ? env_path : "/bin:/usr/bin";
  std::error_code ec;
  std::string cwd = fs::current_path(ec).string();
  size_t start = 0;
  for (;;) {
    size_t colon = search.find(':', start);
    std::string d = search.substr(start, colon == std::string::npos ? std::string::npos : colon - start);
    std::string candidate = absolute_in(cwd, (fs::path(d.empty() ? "." : d) / p).string());
    if (regular_file(candidate) && ::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  fail(v, "program '" + p + "' not found in PATH");
}

void Loader::write_json(const Val& v, rapidjson::Writer<rapidjson::StringBuffer>& w) const {
  const YAML::Node& n = v.node;
  if (n.IsMap()) {
    check_duplicates(v);
    w.StartObject();
    for (auto it = n.begin(); it != n.end(); ++it) {
      if (!it->first.IsScalar()) fail(it->first.Mark(), v.path + ": keys must be plain strings");
      const std::string& key = it->first.Scalar();
      w.Key(key.c_str(), static_cast<rapidjson::SizeType>(key.size()));
      write_json(make_val(it->second, it->first.Mark(), child_path(v.path, key)), w);
    }
    w.EndObject();
  } else if (n.IsSequence()) {
    w.StartArray();
    for (auto& item : list(v, "values")) write_json(item, w);
    w.EndArray();
  } else if (n.IsScalar()) {
    std::string s = subst(v, n.Scalar());
    if (n.Tag() != "?") {  // quoted, block or explicitly tagged: keep as text
      w.String(s.c_str(), static_cast<rapidjson::SizeType>(s.size()));
      return;
    }
    // YAML 1.2 core schema resolution for plain scalars.
    if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return (void)w.Null();
    if (s == "true" || s == "True" || s == "TRUE") return (void)w.Bool(true);
    if (s == "false" || s == "False" || s == "FALSE") return (void)w.Bool(false);
    const char* b = s.c_str();
    const char* digits = b + (s[0] == '-' || s[0] == '+');
    bool is_int = *digits && std::all_of(digits, b + s.size(), [](char c) { return c >= '0' && c <= '9'; });
    if (is_int) {
      errno = 0;
      char* end = nullptr;
      if (s[0] == '-') {
        long long x = std::strtoll(b, &end, 10);
        if (errno == 0) return (void)w.Int64(x);
      } else {
        unsigned long long x = std::strtoull(b, &end, 10);
        if (errno == 0) return (void)w.Uint64(x);
      }
    }
    if (float_syntax(s)) {
      double d = std::strtod(b, nullptr);
      if (std::isfinite(d)) return (void)w.Double(d);
    }
    w.String(s.c_str(), static_cast<rapidjson::SizeType>(s.size()));
  } else {
    w.Null();
  }
}

}  // namespace

Duration RetryConfig::delay_before(unsigned next_attempt) const {
  if (next_attempt < 2) return Duration(0);
  // In double: multiplier^k may overflow to inf, which the clamp absorbs.
  double ms = static_cast<double>(delay.count()) * std::pow(multiplier, next_attempt - 2.0);
  if (!(ms < static_cast<double>(max_delay.count()))) return max_delay;
  return Duration(std::llround(ms));
}

std::vector<Duration> QueueConfig::retry_steps() const {
  std::set<Duration> steps;
  auto add = [&](const RetryConfig& r) {
    for (unsigned n = 2; n <= r.max_attempts; ++n) {
      Duration d = r.delay_before(n);
      steps.insert(d);
      if (d == r.max_delay) break;  // every later attempt waits the same
    }
  };
  add(retry);
  for (const auto& h : handlers) add(h.retry);
  return {steps.begin(), steps.end()};
}

std::vector<std::string> plugin_search_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("EVENT_ROUTER_PLUGIN_DIR")) {
    std::string s = env;
    size_t start = 0;
    for (;;) {
      size_t colon = s.find(':', start);
      std::string d = s.substr(start, colon == std::string::npos ? std::string::npos : colon - start);
      if (!d.empty()) dirs.push_back(d);
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
  }
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) dirs.push_back(normalize(exe.parent_path() / "plugins"));
  dirs.push_back(ER_PLUGIN_INSTALL_DIR);
  return dirs;
}

Config load_config_string(const std::string& text, const std::string& path, const std::string& dir) {
  std::error_code ec;
  fs::path d = dir.empty() ? fs::current_path(ec) : fs::absolute(dir, ec);
  return Loader(path, normalize(d)).load(text);
}

Config load_config(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw ConfigError(path + ": cannot open: " + std::strerror(errno));
  std::string text;
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw ConfigError(path + ": cannot open: " + std::strerror(EISDIR));
  }
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      throw ConfigError(path + ": cannot read: " + std::strerror(err));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  std::error_code ec;
  fs::path abs = fs::absolute(path, ec);
  return Loader(path, normalize(abs.parent_path())).load(text);
}

}  // namespace er::config
