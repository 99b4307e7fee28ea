// How a plan is found (see schema_plan.hpp). Every shape not recognised here
// gets no plan, or a smaller one: the generic path is always correct, a plan
// only leaves out what cannot change RapidJSON 1.1's answer. The rules follow
// RapidJSON 1.1's schema.h: a schema with $ref is the referenced schema
// (siblings ignored); `required` and `dependencies` names are properties too;
// root allOf/anyOf/oneOf/not are checked at the root's end, after
// required/minProperties/maxProperties/dependencies, in that order.
#include "event/schema_plan.hpp"

#include <rapidjson/pointer.h>

#include <string_view>

namespace er::event::plan {

using rapidjson::Value;

const char* keyword_name(Keyword k) {
  static const char* const kNames[] = {"allOf", "anyOf", "oneOf", "not"};
  return k < kKeywords ? kNames[k] : "";
}

namespace {

std::string_view str(const Value& v) { return {v.GetString(), v.GetStringLength()}; }

int keyword(std::string_view k) {
  for (int i = 0; i < kKeywords; ++i)
    if (k == keyword_name(static_cast<Keyword>(i))) return i;
  return -1;
}

// Keywords that never fail a value.
bool annotation(std::string_view k) {
  return k == "title" || k == "description" || k == "default" || k == "definitions" || k == "$comment" ||
         k == "examples" || k == "$schema";
}

int name_bit(std::vector<std::string>& names, std::string_view n) {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == n) return static_cast<int>(i);
  if (names.size() == 64) return -1;
  names.emplace_back(n);
  return static_cast<int>(names.size() - 1);
}

bool formula(const Value& s, Formula& f, std::vector<std::string>& names, int depth);

bool composition(const Value& v, int kw, Formula& f, std::vector<std::string>& names, int depth) {
  if (f.has[kw]) return false;  // a duplicate key: leave it to RapidJSON
  f.has[kw] = true;
  auto& of = f.of[kw];
  if (kw == kNot) {
    of.emplace_back();
    return formula(v, of.back(), names, depth + 1);
  }
  if (!v.IsArray() || v.Empty()) return false;
  for (const auto& branch : v.GetArray()) {
    of.emplace_back();
    if (!formula(branch, of.back(), names, depth + 1)) return false;
  }
  return true;
}

// A schema made of `required` and allOf/anyOf/oneOf/not of such schemas
// (annotations aside): its formula, or false.
bool formula(const Value& s, Formula& f, std::vector<std::string>& names, int depth) {
  if (!s.IsObject() || depth > 16) return false;
  bool required = false;
  for (const auto& m : s.GetObject()) {
    std::string_view k = str(m.name);
    if (annotation(k)) continue;
    if (k == "required") {
      if (required || !m.value.IsArray()) return false;
      required = true;
      for (const auto& n : m.value.GetArray()) {
        int bit = n.IsString() ? name_bit(names, str(n)) : -1;
        if (bit < 0) return false;
        f.required |= uint64_t{1} << bit;
      }
      continue;
    }
    int kw = keyword(k);
    if (kw < 0 || !composition(m.value, kw, f, names, depth)) return false;
  }
  return true;
}

bool holds(const Formula& f, uint64_t present, bool object);

Keyword failing(const Formula& f, uint64_t present, bool object) {
  if (f.has[kAllOf])
    for (const auto& b : f.of[kAllOf])
      if (!holds(b, present, object)) return kAllOf;
  if (f.has[kAnyOf]) {
    bool any = false;
    for (const auto& b : f.of[kAnyOf]) any = any || holds(b, present, object);
    if (!any) return kAnyOf;
  }
  if (f.has[kOneOf]) {
    int n = 0;
    for (const auto& b : f.of[kOneOf]) n += holds(b, present, object);
    if (n != 1) return kOneOf;
  }
  if (f.has[kNot] && holds(f.of[kNot][0], present, object)) return kNot;
  return kKeywords;
}

// `required` says nothing about a value that is not an object.
bool holds(const Formula& f, uint64_t present, bool object) {
  if (object && (f.required & ~present) != 0) return false;
  return failing(f, present, object) == kKeywords;
}

// Whether some $ref of the document points at the root, or into one of the
// root keywords `taken`: those would lose what the plan takes out.
bool refs_into(const Value& v, const bool taken[kKeywords], int depth = 0) {
  if (depth > 256) return true;
  if (v.IsArray()) {
    for (const auto& e : v.GetArray())
      if (refs_into(e, taken, depth + 1)) return true;
    return false;
  }
  if (!v.IsObject()) return false;
  for (const auto& m : v.GetObject()) {
    if (str(m.name) == "$ref" && m.value.IsString()) {
      rapidjson::Pointer p(m.value.GetString(), m.value.GetStringLength());
      if (!p.IsValid() || p.GetTokenCount() == 0) return true;
      int kw = keyword(std::string_view(p.GetTokens()[0].name, p.GetTokens()[0].length));
      if (kw >= 0 && taken[kw]) return true;
    } else if (refs_into(m.value, taken, depth + 1)) {
      return true;
    }
  }
  return false;
}

// Follows local $refs (load() made sure they end and resolve).
const Value* deref(const Value* s, const Value& root) {
  for (int hops = 0; s && s->IsObject() && hops < 64; ++hops) {
    auto r = s->FindMember("$ref");
    if (r == s->MemberEnd() || !r->value.IsString()) return s;
    s = rapidjson::Pointer(r->value.GetString(), r->value.GetStringLength()).Get(root);
  }
  return nullptr;
}

// Kind when the schema checks at most the value's type, else Feed.
Member kind_only(const Value* s, const Value& root) {
  s = deref(s, root);
  if (!s || !s->IsObject()) return Member::Feed;
  for (const auto& m : s->GetObject())
    if (str(m.name) != "type" && !annotation(str(m.name))) return Member::Feed;
  return Member::Kind;
}

// Root keywords with which the root's members can be pruned: none of them
// looks into a member's value except through properties/additionalProperties.
bool prunable(const Value& root) {
  for (const auto& m : root.GetObject()) {
    std::string_view k = str(m.name);
    if (annotation(k) || k == "type" || k == "required" || k == "minProperties" || k == "maxProperties" ||
        k == "properties" || k == "additionalProperties")
      continue;
    if (k == "dependencies" && m.value.IsObject()) {
      for (const auto& d : m.value.GetObject())
        if (!d.value.IsArray()) return false;  // a schema dependency sees the whole object
      continue;
    }
    return false;
  }
  return true;
}

void add_key(Plan& p, std::string_view name, Member action) {
  if (!p.find(name.data(), name.size())) p.keys.push_back({std::string(name), action, -1});
}

// What the validator needs of each root member of an object.
bool plan_members(Plan& p, const Value& root, const Value& source) {
  // A keyword given twice: RapidJSON's choice is not worth copying.
  for (const char* kw : {"properties", "additionalProperties", "required", "dependencies"}) {
    int n = 0;
    for (const auto& m : root.GetObject()) n += str(m.name) == kw;
    if (n > 1) return false;
  }
  auto props = root.FindMember("properties");
  if (props != root.MemberEnd() && props->value.IsObject()) {
    for (const auto& m : props->value.GetObject()) {
      if (p.find(m.name.GetString(), m.name.GetStringLength())) return false;  // a duplicate name
      add_key(p, str(m.name), kind_only(&m.value, source));
    }
  }
  // Names in required or dependencies are properties to RapidJSON: their
  // presence is tracked, so the validator must see their names.
  for (const char* kw : {"required", "dependencies"}) {
    auto r = root.FindMember(kw);
    if (r == root.MemberEnd()) continue;
    if (r->value.IsArray()) {
      for (const auto& n : r->value.GetArray())
        if (n.IsString()) add_key(p, str(n), Member::Kind);
    } else if (r->value.IsObject()) {
      for (const auto& d : r->value.GetObject()) {
        add_key(p, str(d.name), Member::Kind);
        for (const auto& n : d.value.GetArray())
          if (n.IsString()) add_key(p, str(n), Member::Kind);
      }
    }
  }
  auto extra = root.FindMember("additionalProperties");
  if (extra == root.MemberEnd() || (extra->value.IsBool() && extra->value.GetBool())) {
    p.other = Member::Skip;
  } else if (extra->value.IsObject()) {
    const Value* s = deref(&extra->value, source);
    bool typeless = s && s->IsObject();
    for (auto m = s ? s->MemberBegin() : Value::ConstMemberIterator(); typeless && m != s->MemberEnd(); ++m)
      typeless = annotation(str(m->name));
    p.other = typeless ? Member::Skip : kind_only(s, source);
  } else {
    p.other = Member::Feed;  // false: an unknown name fails
  }
  return true;
}

}  // namespace

Keyword Plan::first_failure(uint64_t present, bool object) const { return failing(root, present, object); }

std::unique_ptr<Plan> make(const rapidjson::Document& source) {
  if (!source.IsObject() || source.HasMember("$ref")) return nullptr;
  auto p = std::make_unique<Plan>();
  std::vector<std::string> names;

  // Root allOf/anyOf/oneOf/not: natively only if all of them are formulas.
  bool taken[kKeywords] = {};
  bool all_formulas = true;
  for (const auto& m : source.GetObject()) {
    int kw = keyword(str(m.name));
    if (kw < 0) continue;
    taken[kw] = true;
    all_formulas = all_formulas && composition(m.value, kw, p->root, names, 0);
  }
  p->has_formula = all_formulas && (taken[kAllOf] || taken[kAnyOf] || taken[kOneOf] || taken[kNot]) &&
                   !refs_into(source, taken);
  const Value* root = &source;
  if (p->has_formula) {
    p->stripped_source.CopyFrom(source, p->stripped_source.GetAllocator());
    for (int kw = 0; kw < kKeywords; ++kw)
      if (taken[kw]) p->stripped_source.RemoveMember(keyword_name(static_cast<Keyword>(kw)));
    p->stripped.emplace(p->stripped_source);
    root = &p->stripped_source;
  } else {
    p->root = Formula{};
    names.clear();
  }

  p->prune = prunable(*root) && plan_members(*p, *root, source);
  if (!p->prune) {
    p->keys.clear();
    p->other = Member::Feed;
  }
  if (!p->has_formula && !p->prune) return nullptr;
  // The names the formula asks about: looked up on every root member.
  for (size_t i = 0; i < names.size(); ++i) {
    add_key(*p, names[i], p->other);
    for (auto& k : p->keys)
      if (k.name == names[i]) k.bit = static_cast<int>(i);
  }
  return p;
}

}  // namespace er::event::plan
