#include "metrics/metrics.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <stdexcept>

namespace er::metrics {

namespace {

// C++17 has no fetch_add for atomic<double>.
void atomic_add(std::atomic<double>& a, double d) noexcept {
  double cur = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(cur, cur + d, std::memory_order_relaxed)) {
  }
}

bool valid_metric_name(const std::string& s) {
  if (s.empty()) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

bool valid_label_name(const std::string& s) {
  if (s.empty() || s.compare(0, 2, "__") == 0) return false;  // "__" is reserved for Prometheus itself
  for (std::size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

void append_help(std::string& out, const std::string& help) {
  for (char c : help) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else out.push_back(c);
  }
}

void append_u64(std::string& out, std::uint64_t v) {
  char buf[24];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

}  // namespace

void append_label_value(std::string& out, const std::string& v) {
  for (char c : v) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      default: out.push_back(c);
    }
  }
}

void append_double(std::string& out, double v) {
  if (std::isnan(v)) { out += "NaN"; return; }
  if (std::isinf(v)) { out += v > 0 ? "+Inf" : "-Inf"; return; }
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest form that round-trips
  out.append(buf, r.ptr);
}

const std::vector<double>& default_buckets() {
  static const std::vector<double> b{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  return b;
}

// ---- metrics

void Gauge::inc(double d) noexcept { atomic_add(v_, d); }

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(new std::atomic<std::uint64_t>[bounds_.size() + 1]) {
  for (std::size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0, std::memory_order_relaxed);
}

void Histogram::observe(double v) noexcept {
  // First bound >= v ("le" is inclusive); NaN lands in +Inf, as in the Go client.
  std::size_t i = std::isnan(v) ? bounds_.size()
                                 : static_cast<std::size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  atomic_add(sum_, v);
}

std::uint64_t Histogram::count() const noexcept {
  std::uint64_t n = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) n += bucket_count(i);
  return n;
}

// ---- families

FamilyBase::FamilyBase(std::string name, std::string help, const char* type, std::vector<std::string> labels)
    : name_(std::move(name)), help_(std::move(help)), type_(type), labels_(std::move(labels)) {}

void FamilyBase::check_arity(const std::vector<std::string>& values) const {
  if (values.size() != labels_.size())
    throw std::invalid_argument("metric " + name_ + ": expected " + std::to_string(labels_.size()) + " label values, got " +
                                std::to_string(values.size()));
}

void FamilyBase::append_labels(std::string& out, const std::vector<std::string>& values) const {
  for (std::size_t i = 0; i < labels_.size(); ++i) {
    out.push_back(i == 0 ? '{' : ',');
    out += labels_[i];
    out += "=\"";
    append_label_value(out, values[i]);
    out.push_back('"');
  }
}

void FamilyBase::render(std::string& out) const {
  out += "# HELP ";
  out += name_;
  out.push_back(' ');
  append_help(out, help_);
  out += "\n# TYPE ";
  out += name_;
  out.push_back(' ');
  out += type_;
  out.push_back('\n');
  render_samples(out);
}

void CounterFamily::render_samples(std::string& out) const {
  for (const auto& c : children_) {
    out += name();
    append_labels(out, c.values);
    if (!label_names().empty()) out.push_back('}');
    out.push_back(' ');
    append_u64(out, c.metric.value());
    out.push_back('\n');
  }
}

void GaugeFamily::render_samples(std::string& out) const {
  for (const auto& c : children_) {
    out += name();
    append_labels(out, c.values);
    if (!label_names().empty()) out.push_back('}');
    out.push_back(' ');
    append_double(out, c.metric.value());
    out.push_back('\n');
  }
}

HistogramFamily::HistogramFamily(std::string name, std::string help, std::vector<std::string> labels, std::vector<double> bounds)
    : Family(std::move(name), std::move(help), "histogram", std::move(labels)), bounds_(std::move(bounds)) {}

void HistogramFamily::render_samples(std::string& out) const {
  const bool labelled = !label_names().empty();
  for (const auto& c : children_) {
    const Histogram& h = c.metric;
    std::uint64_t cum = 0;
    for (std::size_t i = 0; i <= bounds_.size(); ++i) {
      cum += h.bucket_count(i);
      out += name();
      out += "_bucket";
      append_labels(out, c.values);
      out += labelled ? ",le=\"" : "{le=\"";
      if (i < bounds_.size()) append_double(out, bounds_[i]);
      else out += "+Inf";
      out += "\"} ";
      append_u64(out, cum);
      out.push_back('\n');
    }
    out += name();
    out += "_sum";
    append_labels(out, c.values);
    if (labelled) out.push_back('}');
    out.push_back(' ');
    append_double(out, h.sum());
    out.push_back('\n');
    out += name();
    out += "_count";
    append_labels(out, c.values);
    if (labelled) out.push_back('}');
    out.push_back(' ');
    append_u64(out, cum);  // == the +Inf bucket even if observe() ran meanwhile
    out.push_back('\n');
  }
}

// ---- registry

template <class F, class... Extra>
F& Registry::add(const std::string& name, const std::string& help, std::vector<std::string> labels, Extra&&... extra) {
  if (!valid_metric_name(name)) throw std::invalid_argument("invalid metric name: \"" + name + "\"");
  for (const auto& l : labels)
    if (!valid_label_name(l)) throw std::invalid_argument("metric " + name + ": invalid label name \"" + l + "\"");
  for (std::size_t i = 0; i < labels.size(); ++i)
    for (std::size_t j = i + 1; j < labels.size(); ++j)
      if (labels[i] == labels[j]) throw std::invalid_argument("metric " + name + ": duplicate label \"" + labels[i] + "\"");
  for (auto& f : families_) {
    if (f->name() != name) continue;
    auto* same = dynamic_cast<F*>(f.get());
    if (!same || same->label_names() != labels)
      throw std::invalid_argument("metric " + name + " already registered with another type or labels");
    return *same;
  }
  families_.push_back(std::make_unique<F>(name, help, std::move(labels), std::forward<Extra>(extra)...));
  return static_cast<F&>(*families_.back());
}

CounterFamily& Registry::counter(const std::string& name, const std::string& help, std::vector<std::string> labels) {
  const bool has_suffix = name.size() >= 6 && name.compare(name.size() - 6, 6, "_total") == 0;
  return add<CounterFamily>(has_suffix ? name : name + "_total", help, std::move(labels));
}

GaugeFamily& Registry::gauge(const std::string& name, const std::string& help, std::vector<std::string> labels) {
  return add<GaugeFamily>(name, help, std::move(labels));
}

HistogramFamily& Registry::histogram(const std::string& name, const std::string& help, std::vector<std::string> labels,
                                     std::vector<double> buckets) {
  if (!buckets.empty() && std::isinf(buckets.back()) && buckets.back() > 0) buckets.pop_back();  // +Inf is implicit
  for (std::size_t i = 0; i < buckets.size(); ++i)
    if (!std::isfinite(buckets[i]) || (i > 0 && !(buckets[i - 1] < buckets[i])))
      throw std::invalid_argument("histogram " + name + ": buckets must be finite and strictly increasing");
  for (const auto& l : labels)
    if (l == "le") throw std::invalid_argument("histogram " + name + ": label \"le\" is reserved");
  return add<HistogramFamily>(name, help, std::move(labels), std::move(buckets));
}

std::string Registry::render() {
  for (auto& fn : collectors_) fn();
  std::string out;
  out.reserve(4096);
  for (const auto& f : families_) f->render(out);
  return out;
}

}  // namespace er::metrics
