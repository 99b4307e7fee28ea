#pragma once
// Prometheus metrics registry (text exposition format 0.0.4).
//
// Families and their label children are created off the hot path (startup or
// reload) and callers keep the returned references, which stay valid for the
// registry's lifetime. Updating a metric is then one relaxed atomic operation,
// with no allocation and no lookup, so a plugin worker thread may update too.
// Registration and render() belong to the loop thread.
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace er::metrics {

class Counter {
 public:
  void inc(std::uint64_t n = 1) noexcept { v_.fetch_add(n, std::memory_order_relaxed); }
  std::uint64_t value() const noexcept { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> v_{0};
};

// Holds a double; integer values convert exactly up to 2^53.
class Gauge {
 public:
  void set(double v) noexcept { v_.store(v, std::memory_order_relaxed); }
  void inc(double d = 1) noexcept;
  void dec(double d = 1) noexcept { inc(-d); }
  double value() const noexcept { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0};
};

class Histogram {
 public:
  // `bounds`: strictly increasing finite upper bounds; +Inf is implicit.
  explicit Histogram(std::vector<double> bounds);
  void observe(double seconds) noexcept;

  const std::vector<double>& bounds() const noexcept { return bounds_; }
  // Per-bucket (not cumulative) counts; index bounds().size() is the +Inf bucket.
  std::uint64_t bucket_count(std::size_t i) const noexcept { return counts_[i].load(std::memory_order_relaxed); }
  double sum() const noexcept { return sum_.load(std::memory_order_relaxed); }
  // Sum of the buckets, so that it always equals the +Inf bucket.
  std::uint64_t count() const noexcept;

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> counts_;
  std::atomic<double> sum_{0};
};

const std::vector<double>& default_buckets();

class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, const char* type, std::vector<std::string> labels);
  virtual ~FamilyBase() = default;
  FamilyBase(const FamilyBase&) = delete;
  FamilyBase& operator=(const FamilyBase&) = delete;

  const std::string& name() const noexcept { return name_; }
  const char* type() const noexcept { return type_; }
  const std::vector<std::string>& label_names() const noexcept { return labels_; }
  void render(std::string& out) const;

 protected:
  void check_arity(const std::vector<std::string>& values) const;
  // Appends `{a="x",b="y"` (no closing brace; nothing when there are no labels and no extra).
  void append_labels(std::string& out, const std::vector<std::string>& values) const;
  virtual void render_samples(std::string& out) const = 0;

 private:
  std::string name_, help_;
  const char* type_;
  std::vector<std::string> labels_;
};

// One metric per distinct label-value tuple. with() may allocate; the
// returned reference is stable (deque storage never moves elements).
template <class M>
class Family : public FamilyBase {
 public:
  using FamilyBase::FamilyBase;

 protected:
  template <class... Args>
  M& child(const std::vector<std::string>& values, Args&&... args) {
    check_arity(values);
    auto it = index_.find(values);
    if (it != index_.end()) return *it->second;
    children_.emplace_back(values, std::forward<Args>(args)...);
    M& m = children_.back().metric;
    index_.emplace(values, &m);
    return m;
  }

  struct Child {
    template <class... Args>
    explicit Child(std::vector<std::string> v, Args&&... args) : values(std::move(v)), metric(std::forward<Args>(args)...) {}
    std::vector<std::string> values;
    M metric;
  };
  std::deque<Child> children_;  // registration order, for a deterministic render
  std::map<std::vector<std::string>, M*> index_;
};

class CounterFamily : public Family<Counter> {
 public:
  CounterFamily(std::string name, std::string help, std::vector<std::string> labels)
      : Family(std::move(name), std::move(help), "counter", std::move(labels)) {}
  Counter& with(const std::vector<std::string>& values = {}) { return child(values); }

 private:
  void render_samples(std::string& out) const override;
};

class GaugeFamily : public Family<Gauge> {
 public:
  GaugeFamily(std::string name, std::string help, std::vector<std::string> labels)
      : Family(std::move(name), std::move(help), "gauge", std::move(labels)) {}
  Gauge& with(const std::vector<std::string>& values = {}) { return child(values); }

 private:
  void render_samples(std::string& out) const override;
};

class HistogramFamily : public Family<Histogram> {
 public:
  HistogramFamily(std::string name, std::string help, std::vector<std::string> labels, std::vector<double> bounds);
  Histogram& with(const std::vector<std::string>& values = {}) { return child(values, bounds_); }
  const std::vector<double>& bounds() const noexcept { return bounds_; }

 private:
  void render_samples(std::string& out) const override;
  std::vector<double> bounds_;
};

class Registry {
 public:
  // Names must match [a-zA-Z_:][a-zA-Z0-9_:]*; label names [a-zA-Z_][a-zA-Z0-9_]*.
  // A counter's name gets "_total" appended unless it already ends with it.
  // Registering the same name again with the same type and label names returns
  // the existing family (so reload code may re-run); any mismatch throws
  // std::invalid_argument, as do bad names and with() arity mismatches.
  CounterFamily& counter(const std::string& name, const std::string& help, std::vector<std::string> labels = {});
  GaugeFamily& gauge(const std::string& name, const std::string& help, std::vector<std::string> labels = {});
  HistogramFamily& histogram(const std::string& name, const std::string& help, std::vector<std::string> labels = {},
                             std::vector<double> buckets = default_buckets());

  // Run, in order, at the start of every render(): for values computed on demand.
  void add_collector(std::function<void()> fn) { collectors_.push_back(std::move(fn)); }

  // Families in registration order; a family with no children renders only HELP and TYPE.
  std::string render();

 private:
  template <class F, class... Extra>
  F& add(const std::string& name, const std::string& help, std::vector<std::string> labels, Extra&&... extra);

  std::vector<std::unique_ptr<FamilyBase>> families_;
  std::vector<std::function<void()>> collectors_;
};

// Prometheus formatting helpers, exposed for tests and for other exporters.
void append_label_value(std::string& out, const std::string& v);  // escapes \ " and newline
void append_double(std::string& out, double v);                   // shortest round-trip; NaN, +Inf, -Inf

}  // namespace er::metrics
