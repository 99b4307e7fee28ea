#pragma once
// What RapidJSON's validator must see of a body for one schema, found at load
// from the schema's structure (internal to src/event). Two shapes are common
// and costly:
//  - allOf/anyOf/oneOf/not at the root made only of `required` (the
//    envelope's snake_case or camelCase alternatives): RapidJSON runs every
//    branch as a validator over the whole body; the plan checks them as a
//    formula over the root's member names instead.
//  - root members whose schema cannot fail on their content (not named by the
//    schema, or only a `type`): the validator gets the member's name and an
//    empty value of the same kind, or nothing at all.
// A schema of any other shape gets no plan: the validator sees everything.
#include <rapidjson/document.h>
#include <rapidjson/schema.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace er::event::plan {

// allOf, anyOf, oneOf, not: RapidJSON's order of checking them.
enum Keyword { kAllOf, kAnyOf, kOneOf, kNot, kKeywords };
const char* keyword_name(Keyword k);

// A schema made only of `required` and allOf/anyOf/oneOf/not of such
// schemas: whether it holds depends only on which root members are present.
struct Formula {
  uint64_t required = 0;  // bits of Plan::names
  bool has[kKeywords] = {};
  std::vector<Formula> of[kKeywords];  // `not` has one
};

enum class Member : unsigned char {
  Skip,  // neither its name nor its value matters to the schema
  Kind,  // the name matters; of the value, only its kind (object, array, scalar)
  Feed,  // the validator sees all of it
};

struct RootKey {
  std::string name;
  Member action;
  int bit;  // in Plan::names, or -1
};

struct Plan {
  // The schema without the root keywords in `root` (those are checked
  // natively); empty when nothing was taken out.
  rapidjson::Document stripped_source;
  std::optional<rapidjson::SchemaDocument> stripped;
  Formula root;  // only its allOf/anyOf/oneOf/not
  bool has_formula = false;
  // Root members: those named here, others by `other`. Without `prune`,
  // every member is fed (the keys are still looked up for `root`).
  bool prune = false;
  std::vector<RootKey> keys;
  Member other = Member::Feed;

  // The first of allOf/anyOf/oneOf/not at the root that fails, given the
  // root members present (bits of names) and whether the root is an object
  // (`required` holds for anything else); kKeywords when all hold.
  Keyword first_failure(uint64_t present, bool object) const;
  const RootKey* find(const char* s, size_t n) const {
    for (const auto& k : keys)
      if (k.name.size() == n && (n == 0 || std::memcmp(k.name.data(), s, n) == 0)) return &k;
    return nullptr;
  }
};

// A plan for the schema document `source` (already checked by load()), or
// null when its shape gives nothing to save.
std::unique_ptr<Plan> make(const rapidjson::Document& source);

}  // namespace er::event::plan
