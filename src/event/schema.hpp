#pragma once
// JSON Schema (draft-04) validation of event bodies with RapidJSON's
// validator: one schema for every event (envelope.json, optional) plus one per
// event type (<event_type>.json).
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "event/envelope.hpp"

namespace er::event {

namespace detail {
struct CompiledSchema;
}

// How bodies meet the schemas. Planned leaves out of RapidJSON's validator
// what cannot change its answer (schema_plan.hpp), with the same answers and
// details; Generic feeds it every parser event, for tests and benchmarks to
// compare with.
enum class Validation { Planned, Generic };

class SchemaSet {
 public:
  // Compiles <dir>/envelope.json (applies to every event, optional file) and every <dir>/<event_type>.json.
  // Throws std::runtime_error("<file>: <reason>") for unreadable files, invalid JSON (with offset), or an invalid schema.
  // Besides the draft-04 meta-schema, rejects what RapidJSON 1.1 would silently
  // ignore or crash on: a non-draft-04 $schema, 'format', patterns its regex
  // cannot compile, and remote, dangling or circular $refs.
  static std::shared_ptr<const SchemaSet> load(const std::string& dir, Validation mode = Validation::Planned);

  // Validates the JSON body. Returns true if valid; else false and `detail` names the schema file,
  // the failing keyword and the instance path, e.g. "speaker.onboarded.json: required: missing property 'bucket' at #/payload".
  // Thread-safe (called from one thread in practice, but must not mutate shared state unsafely).
  bool validate(const char* body, size_t len, std::string_view event_type, std::string& detail) const;

  // decode() and validate() on one parse of the body: decodes the envelope
  // into `out` exactly as event::decode() does (its status and detail); when
  // that succeeds, `valid` says whether the schemas accept the body, with
  // validate()'s `detail` when not. The type schema is the decoded event
  // type's; an event type that comes late in a large body, or only from the
  // routing key, costs that schema a second parse.
  DecodeStatus decode_validate(const char* body, size_t len, std::string_view routing_key, Envelope& out,
                               std::string& detail, bool& valid) const;

  size_t size() const;  // number of schemas loaded, envelope.json included
  std::vector<std::string> event_types() const;  // sorted; without the envelope

  ~SchemaSet();
  SchemaSet(const SchemaSet&) = delete;
  SchemaSet& operator=(const SchemaSet&) = delete;

 private:
  SchemaSet();

  std::unique_ptr<detail::CompiledSchema> envelope_;
  std::map<std::string, std::unique_ptr<detail::CompiledSchema>, std::less<>> types_;
  // RapidJSON 1.1's regex keeps its match state inside the compiled schema.
  mutable std::mutex mutex_;
};

}  // namespace er::event
