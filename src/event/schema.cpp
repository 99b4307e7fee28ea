// Schemas are compiled once at load. validate() drives one SAX parse of the
// body into the envelope and type validators at once (no DOM), their state on
// a per-thread buffer; only a failure parses a DOM, to explain itself.
// decode_validate() does the same on the envelope decoder's own parse.
// Each validator sees only what its schema's plan leaves to it
// (schema_plan.hpp): RapidJSON ran the envelope's allOf/anyOf as six more
// validators over the whole body, half of the cost. build/er_schema_bench
// measures it (bench/schema_bench.cpp).
#include "event/schema.hpp"

#include "event/envelope_sax.hpp"
#include "event/schema_plan.hpp"

#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/internal/regex.h>
#include <rapidjson/memorystream.h>
#include <rapidjson/pointer.h>
#include <rapidjson/reader.h>
#include <rapidjson/schema.h>
#include <rapidjson/stringbuffer.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>

namespace fs = std::filesystem;

namespace er::event {

using rapidjson::SizeType;
using rapidjson::Value;

struct detail::CompiledSchema {
  std::string file;            // base name, for details
  rapidjson::Document source;  // kept to explain failures
  std::optional<rapidjson::SchemaDocument> compiled;
  std::unique_ptr<plan::Plan> plan;  // null: the validator sees every parser event
};

namespace {

using Pool = rapidjson::MemoryPoolAllocator<rapidjson::CrtAllocator>;
using Validator =
    rapidjson::GenericSchemaValidator<rapidjson::SchemaDocument, rapidjson::BaseReaderHandler<rapidjson::UTF8<>>, Pool>;

constexpr size_t kScratchBytes = 32 * 1024;  // a typical event's validator state fits
constexpr unsigned kMaxDepth = 64;           // as decode(): bounds the recursive parser
constexpr size_t kMaxDetail = 300;

// http://json-schema.org/draft-04/schema ("format" dropped: RapidJSON ignores it).
constexpr char kMetaSchema[] = R"json({"id":"http://json-schema.org/draft-04/schema#",
"$schema":"http://json-schema.org/draft-04/schema#","description":"Core schema meta-schema",
"definitions":{"schemaArray":{"type":"array","minItems":1,"items":{"$ref":"#"}},
"positiveInteger":{"type":"integer","minimum":0},
"positiveIntegerDefault0":{"allOf":[{"$ref":"#/definitions/positiveInteger"},{"default":0}]},
"simpleTypes":{"enum":["array","boolean","integer","null","number","object","string"]},
"stringArray":{"type":"array","items":{"type":"string"},"minItems":1,"uniqueItems":true}},
"type":"object","properties":{"id":{"type":"string"},"$schema":{"type":"string"},
"title":{"type":"string"},"description":{"type":"string"},"default":{},
"multipleOf":{"type":"number","minimum":0,"exclusiveMinimum":true},"maximum":{"type":"number"},
"exclusiveMaximum":{"type":"boolean","default":false},"minimum":{"type":"number"},
"exclusiveMinimum":{"type":"boolean","default":false},
"maxLength":{"$ref":"#/definitions/positiveInteger"},
"minLength":{"$ref":"#/definitions/positiveIntegerDefault0"},"pattern":{"type":"string"},
"additionalItems":{"anyOf":[{"type":"boolean"},{"$ref":"#"}],"default":{}},
"items":{"anyOf":[{"$ref":"#"},{"$ref":"#/definitions/schemaArray"}],"default":{}},
"maxItems":{"$ref":"#/definitions/positiveInteger"},
"minItems":{"$ref":"#/definitions/positiveIntegerDefault0"},
"uniqueItems":{"type":"boolean","default":false},
"maxProperties":{"$ref":"#/definitions/positiveInteger"},
"minProperties":{"$ref":"#/definitions/positiveIntegerDefault0"},
"required":{"$ref":"#/definitions/stringArray"},
"additionalProperties":{"anyOf":[{"type":"boolean"},{"$ref":"#"}],"default":{}},
"definitions":{"type":"object","additionalProperties":{"$ref":"#"},"default":{}},
"properties":{"type":"object","additionalProperties":{"$ref":"#"},"default":{}},
"patternProperties":{"type":"object","additionalProperties":{"$ref":"#"},"default":{}},
"dependencies":{"type":"object","additionalProperties":{"anyOf":[{"$ref":"#"},{"$ref":"#/definitions/stringArray"}]}},
"enum":{"type":"array","minItems":1,"uniqueItems":true},
"type":{"anyOf":[{"$ref":"#/definitions/simpleTypes"},{"type":"array","items":{"$ref":"#/definitions/simpleTypes"},"minItems":1,"uniqueItems":true}]},
"allOf":{"$ref":"#/definitions/schemaArray"},"anyOf":{"$ref":"#/definitions/schemaArray"},
"oneOf":{"$ref":"#/definitions/schemaArray"},"not":{"$ref":"#"}},
"dependencies":{"exclusiveMaximum":["maximum"],"exclusiveMinimum":["minimum"]},"default":{}})json";

const rapidjson::SchemaDocument& meta_schema() {
  static const rapidjson::Document doc = [] {
    rapidjson::Document d;
    d.Parse(kMetaSchema);
    return d;
  }();
  static const rapidjson::SchemaDocument schema(doc);
  return schema;
}

std::string uri(const rapidjson::Pointer& p) {
  rapidjson::StringBuffer sb;
  p.StringifyUriFragment(sb);
  return sb.GetString();
}

std::string quoted(const char* s, size_t len, size_t max = 40) {
  std::string out = "'";
  out.append(s, std::min(len, max));
  return out + (len > max ? "...'" : "'");
}

std::string read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  int err = std::ferror(f) ? errno : 0;
  std::fclose(f);
  if (err) throw std::runtime_error(path + ": cannot read: " + std::strerror(err));
  return text;
}

// Walks every subschema for what RapidJSON 1.1 would silently ignore, or
// crash on, instead of reporting it.
class Checker {
 public:
  Checker(const std::string& path, const Value& root) : path_(path), root_(root) {}

  void schema(const Value& s, const std::string& at) {
    if (!s.IsObject()) return;  // the meta-schema has already rejected it
    for (auto& m : s.GetObject()) {
      std::string key(m.name.GetString(), m.name.GetStringLength());
      std::string here = at + "/" + escape(key);
      const Value& v = m.value;
      if (key == "format") {
        fail(here, "'format' is not checked by RapidJSON; use 'pattern'");
      } else if (key == "pattern" && v.IsString()) {
        regex(v, here);
      } else if (key == "$ref" && v.IsString()) {
        ref(v, here);
      } else if (key == "not" || key == "additionalProperties" || key == "additionalItems" ||
                 (key == "items" && v.IsObject())) {
        schema(v, here);
      } else if ((key == "allOf" || key == "anyOf" || key == "oneOf" || key == "items") && v.IsArray()) {
        for (SizeType i = 0; i < v.Size(); ++i) schema(v[i], here + "/" + std::to_string(i));
      } else if ((key == "properties" || key == "patternProperties" || key == "definitions" ||
                  key == "dependencies") && v.IsObject()) {
        for (auto& p : v.GetObject()) {
          std::string sub = here + "/" + escape(std::string(p.name.GetString(), p.name.GetStringLength()));
          if (key == "patternProperties") regex(p.name, sub);
          schema(p.value, sub);
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& at, const std::string& why) const {
    throw std::runtime_error(path_ + ": invalid schema at #" + at + ": " + why);
  }

  static std::string escape(const std::string& token) {
    std::string out;
    for (char c : token) out += c == '~' ? "~0" : c == '/' ? "~1" : std::string(1, c);
    return out;
  }

  void regex(const Value& v, const std::string& at) const {
    std::string pattern(v.GetString(), v.GetStringLength());
    if (pattern.empty()) return;  // matches anything, as RapidJSON treats it
    if (const char* why = screen(pattern))
      fail(at, "pattern " + quoted(pattern.data(), pattern.size()) + ": " + why);
    rapidjson::internal::GenericRegex<rapidjson::UTF8<>> re(pattern.c_str());
    if (!re.IsValid())
      fail(at, "RapidJSON cannot compile the pattern " + quoted(pattern.data(), pattern.size()) +
                   " (its regex has no \\d, \\w, \\s, lookaround or backreferences; use [0-9])");
  }

  // RapidJSON 1.1's regex compiler asserts, or reads outside its stack, on
  // some malformed patterns instead of failing: catch those first.
  static const char* screen(const std::string& p) {
    int depth = 0;
    bool atom = false;  // the current alternative has something to repeat
    for (size_t i = 0; i < p.size(); ++i) {
      switch (p[i]) {
        case '\\': ++i, atom = true; break;
        case '[':
          for (++i; i < p.size() && p[i] != ']'; ++i) i += p[i] == '\\';
          atom = true;
          break;
        case '(': ++depth, atom = false; break;
        case '|':
          if (!atom) return "empty alternative";
          atom = false;
          break;
        case ')':
          if (depth == 0) return "unbalanced ')'";
          if (!atom) return "empty group or alternative";
          --depth;
          break;
        case '?': case '*': case '+': case '{':
          if (!atom) return "nothing to repeat";
          if (p[i] == '{') {  // each repeat copies the states: bound them
            char* end = nullptr;
            unsigned long n = std::strtoul(p.c_str() + i + 1, &end, 10);
            unsigned long m = *end == ',' ? std::strtoul(end + 1, nullptr, 10) : 0;
            if (n > 1000 || m > 1000) return "repeat count above 1000";
          }
          break;
        case '^': case '$': break;
        default: atom = true;
      }
    }
    return depth > 0 ? "unbalanced '('" : nullptr;
  }

  void ref(const Value& v, const std::string& at) const {
    std::string target(v.GetString(), v.GetStringLength());
    for (int hops = 0;; ++hops) {
      if (target.empty() || target[0] != '#')
        fail(at, "$ref '" + target + "': only references within the same file ('#...') are supported");
      rapidjson::Pointer p(target.c_str(), target.size());
      const Value* t = p.IsValid() ? p.Get(root_) : nullptr;
      if (!t) fail(at, "$ref '" + target + "' points to nothing");
      if (!t->IsObject()) fail(at, "$ref '" + target + "' does not point to a schema object");
      auto next = t->FindMember("$ref");
      if (next == t->MemberEnd() || !next->value.IsString()) return;
      if (hops == 32) fail(at, "circular $ref");
      target.assign(next->value.GetString(), next->value.GetStringLength());
    }
  }

  const std::string& path_;
  const Value& root_;
};

// One schema's check of one body: RapidJSON's validator on what the schema's
// plan leaves to it (schema_plan.hpp), the plan's root formula natively.
// Fed the parser's events up to its first failure, and no further.
class Check {
 public:
  Check(const detail::CompiledSchema& s, Pool& pool)
      : s_(s), plan_(s.plan.get()), v_(plan_ && plan_->stripped ? *plan_->stripped : *s.compiled, &pool) {}

  bool Null() { return scalar([](Validator& v) { return v.Null(); }); }
  bool Bool(bool x) { return scalar([x](Validator& v) { return v.Bool(x); }); }
  bool Int(int x) { return scalar([x](Validator& v) { return v.Int(x); }); }
  bool Uint(unsigned x) { return scalar([x](Validator& v) { return v.Uint(x); }); }
  bool Int64(int64_t x) { return scalar([x](Validator& v) { return v.Int64(x); }); }
  bool Uint64(uint64_t x) { return scalar([x](Validator& v) { return v.Uint64(x); }); }
  bool Double(double x) { return scalar([x](Validator& v) { return v.Double(x); }); }
  bool RawNumber(const char* s, SizeType n, bool c) { return scalar([&](Validator& v) { return v.RawNumber(s, n, c); }); }
  bool String(const char* s, SizeType n, bool c) { return scalar([&](Validator& v) { return v.String(s, n, c); }); }
  bool Key(const char* s, SizeType n, bool c) {
    if (!plan_) return v_.Key(s, n, c);
    if (skip_) return true;
    if (depth_ == 1 && object_) {
      const plan::RootKey* k = plan_->find(s, n);
      if (k && k->bit >= 0) present_ |= uint64_t{1} << k->bit;
      next_ = !plan_->prune ? plan::Member::Feed : k ? k->action : plan_->other;
      if (next_ == plan::Member::Skip) return true;
    }
    return v_.Key(s, n, c);
  }
  bool StartObject() { return start(true); }
  bool EndObject(SizeType n) { return end(true, n); }
  bool StartArray() { return start(false); }
  bool EndArray(SizeType n) { return end(false, n); }

  bool valid() const { return v_.IsValid() && failed_ == plan::kKeywords; }
  std::string explain(const char* body, size_t len) const;

 private:
  template <typename F>
  bool scalar(F f) {
    if (!plan_) return f(v_);
    if (skip_) return true;
    if (depth_ == 1 && object_) {
      plan::Member a = next_;
      next_ = plan::Member::Feed;
      return a == plan::Member::Skip || f(v_);
    }
    return f(v_) && (depth_ > 0 || root_end());
  }
  bool start(bool object) {
    if (!plan_) return object ? v_.StartObject() : v_.StartArray();
    if (skip_) return ++depth_, true;
    if (depth_ == 0) object_ = object;
    plan::Member a = plan::Member::Feed;
    if (depth_ == 1 && object_) std::swap(a, next_);
    ++depth_;
    if (a != plan::Member::Feed) {
      // Only the kind of this value matters, or nothing: the validator gets
      // an empty one, or nothing, in its place.
      skip_ = depth_;
      stand_in_ = a == plan::Member::Kind;
      if (!stand_in_) return true;
    }
    return object ? v_.StartObject() : v_.StartArray();
  }
  bool end(bool object, SizeType n) {
    if (!plan_) return object ? v_.EndObject(n) : v_.EndArray(n);
    if (skip_) {
      if (depth_-- != skip_) return true;
      skip_ = 0;
      return !stand_in_ || (object ? v_.EndObject(0) : v_.EndArray(0));
    }
    --depth_;
    return (object ? v_.EndObject(n) : v_.EndArray(n)) && (depth_ > 0 || root_end());
  }
  // The root value is complete and the validator accepts it: RapidJSON
  // would now check the root's allOf/anyOf/oneOf/not.
  bool root_end() {
    if (!plan_->has_formula) return true;
    failed_ = plan_->first_failure(present_, object_);
    return failed_ == plan::kKeywords;
  }

  const detail::CompiledSchema& s_;
  const plan::Plan* plan_;
  Validator v_;
  unsigned depth_ = 0;
  unsigned skip_ = 0;  // the depth of the value left out, 0: none
  bool stand_in_ = false;
  bool object_ = false;  // the root is an object
  plan::Member next_ = plan::Member::Feed;  // for the root member's value to come
  uint64_t present_ = 0;  // the formula's names seen as root members
  plan::Keyword failed_ = plan::kKeywords;
};

// Fans the parser's events out to the envelope and type validators, and
// stops a too deeply nested body before the recursive parser follows it.
class Fanout {
 public:
  Fanout(Check* a, Check* b) : a_(a), b_(b) {}
  bool too_deep = false;

  bool Null() { return each([](Check& v) { return v.Null(); }); }
  bool Bool(bool x) { return each([x](Check& v) { return v.Bool(x); }); }
  bool Int(int x) { return each([x](Check& v) { return v.Int(x); }); }
  bool Uint(unsigned x) { return each([x](Check& v) { return v.Uint(x); }); }
  bool Int64(int64_t x) { return each([x](Check& v) { return v.Int64(x); }); }
  bool Uint64(uint64_t x) { return each([x](Check& v) { return v.Uint64(x); }); }
  bool Double(double x) { return each([x](Check& v) { return v.Double(x); }); }
  bool RawNumber(const char* s, SizeType n, bool c) { return each([&](Check& v) { return v.RawNumber(s, n, c); }); }
  bool String(const char* s, SizeType n, bool c) { return each([&](Check& v) { return v.String(s, n, c); }); }
  bool Key(const char* s, SizeType n, bool c) { return each([&](Check& v) { return v.Key(s, n, c); }); }
  bool StartObject() { return open() && each([](Check& v) { return v.StartObject(); }); }
  bool EndObject(SizeType n) { --depth_; return each([n](Check& v) { return v.EndObject(n); }); }
  bool StartArray() { return open() && each([](Check& v) { return v.StartArray(); }); }
  bool EndArray(SizeType n) { --depth_; return each([n](Check& v) { return v.EndArray(n); }); }

 private:
  template <typename F>
  bool each(F f) { return (!a_ || f(*a_)) && (!b_ || f(*b_)); }
  bool open() {
    if (++depth_ <= kMaxDepth) return true;
    too_deep = true;
    return false;
  }
  Check* a_;
  Check* b_;
  unsigned depth_ = 0;
};

// Parser events seen before the event type is known, for the type validator.
struct Token {
  enum Kind : unsigned char { Null, Bool, Int, Uint, Int64, Uint64, Double, String, Key,
                              StartObject, EndObject, StartArray, EndArray };
  Token(Kind k) : kind(k), u(0) {}  // NOLINT: implicit, for on({Token::Null})
  Kind kind;
  SizeType n = 0;  // string length, or member/element count
  union {
    int64_t i;
    uint64_t u;
    double d;
    size_t off;    // of a string in the text buffer
  };
};

// Bounds on that buffer: an event type that comes later than this (or only
// from the routing key, in a larger body) costs a second parse instead.
constexpr size_t kMaxTokens = 256;
constexpr size_t kMaxTokenText = 4096;

struct Scratch {
  std::unique_ptr<char[]> buf{new char[kScratchBytes]};
  rapidjson::Reader reader;  // keeps its stack between calls
  std::vector<Token> tokens;
  std::string text;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// The decoder's tee: the envelope validator sees the parse from its first
// event, the type validator from the moment the decoder knows the event type
// (the events before it are replayed from a small buffer). A validator that
// failed is fed no more; the parse goes on for the envelope.
using Types = std::map<std::string, std::unique_ptr<detail::CompiledSchema>, std::less<>>;

class ValidatingTee {
 public:
  ValidatingTee(Check* env, const Types& types, Pool& pool, const Envelope& out, Scratch& sc)
      : ev_(env), types_(types), pool_(pool), out_(out), sc_(sc), decided_(types.empty()) {
    sc_.tokens.clear();
    sc_.text.clear();
  }

  // The event type is known: start its validator on what came before.
  void decide(std::string_view type) {
    decided_ = true;
    auto t = types_.find(type);
    if (t == types_.end()) return;
    schema_ = t->second.get();
    if (overflow_) return;  // the caller parses again for this one
    tv_.emplace(*schema_, pool_);
    for (size_t i = 0; i < sc_.tokens.size(); ++i) {
      if (!feed(*tv_, sc_.tokens[i])) {
        tv_failed_at_ = i;  // buffered from the first event on: i is its place
        break;
      }
    }
  }
  // Which failure validate() would report: the one that came first in the
  // body (its parse stops there); on the same event, the envelope's.
  bool envelope_failed_first() const { return ev_failed_at_ <= tv_failed_at_; }
  bool decided() const { return decided_; }
  const detail::CompiledSchema* type_schema() const { return schema_; }
  // Null when there is no type schema, or it needs a parse of its own.
  Check* type_validator() { return tv_ ? &*tv_ : nullptr; }

  void Null() { on({Token::Null}); }
  void Bool(bool b) { Token t{Token::Bool}; t.i = b; on(t); }
  void Int(int x) { Token t{Token::Int}; t.i = x; on(t); }
  void Uint(unsigned x) { Token t{Token::Uint}; t.u = x; on(t); }
  void Int64(int64_t x) { Token t{Token::Int64}; t.i = x; on(t); }
  void Uint64(uint64_t x) { Token t{Token::Uint64}; t.u = x; on(t); }
  void Double(double x) { Token t{Token::Double}; t.d = x; on(t); }
  void String(const char* s, SizeType n) { on({Token::String}, s, n); }
  void Key(const char* s, SizeType n) { on({Token::Key}, s, n); }
  void StartObject() { on({Token::StartObject}); }
  void EndObject(SizeType n) { Token t{Token::EndObject}; t.n = n; on(t); }
  void StartArray() { on({Token::StartArray}); }
  void EndArray(SizeType n) { Token t{Token::EndArray}; t.n = n; on(t); }

 private:
  void on(Token t, const char* s = nullptr, SizeType n = 0) {
    t.n = s ? n : t.n;
    // The decoder has just taken the event type from this very event.
    if (!decided_ && !out_.event_type.empty()) decide(out_.event_type);
    const size_t at = pos_++;
    if (ev_ && ev_failed_at_ == kNever && !feed(*ev_, t, s)) ev_failed_at_ = at;
    if (decided_) {
      if (tv_ && tv_failed_at_ == kNever && !feed(*tv_, t, s)) tv_failed_at_ = at;
    } else if (!overflow_) {
      if (sc_.tokens.size() == kMaxTokens || (s && sc_.text.size() + n > kMaxTokenText)) {
        overflow_ = true;
        return;
      }
      if (s) {
        t.off = sc_.text.size();
        sc_.text.append(s, n);
      }
      sc_.tokens.push_back(t);
    }
  }

  bool feed(Check& v, const Token& t, const char* s = nullptr) {
    if (!s && (t.kind == Token::String || t.kind == Token::Key)) s = sc_.text.data() + t.off;
    switch (t.kind) {
      case Token::Null: return v.Null();
      case Token::Bool: return v.Bool(t.i != 0);
      case Token::Int: return v.Int(static_cast<int>(t.i));
      case Token::Uint: return v.Uint(static_cast<unsigned>(t.u));
      case Token::Int64: return v.Int64(t.i);
      case Token::Uint64: return v.Uint64(t.u);
      case Token::Double: return v.Double(t.d);
      case Token::String: return v.String(s, t.n, true);
      case Token::Key: return v.Key(s, t.n, true);
      case Token::StartObject: return v.StartObject();
      case Token::EndObject: return v.EndObject(t.n);
      case Token::StartArray: return v.StartArray();
      case Token::EndArray: return v.EndArray(t.n);
    }
    return false;
  }

  Check* ev_;
  const Types& types_;
  Pool& pool_;
  const Envelope& out_;
  Scratch& sc_;
  std::optional<Check> tv_;
  const detail::CompiledSchema* schema_ = nullptr;
  static constexpr size_t kNever = ~size_t{0};
  size_t pos_ = 0;  // parser events so far
  size_t ev_failed_at_ = kNever;
  size_t tv_failed_at_ = kNever;
  bool decided_;
  bool overflow_ = false;
};

// Follows local $refs (load() made sure they end).
const Value* deref(const Value* s, const Value& root) {
  while (s && s->IsObject()) {
    auto r = s->FindMember("$ref");
    if (r == s->MemberEnd() || !r->value.IsString()) break;
    s = rapidjson::Pointer(r->value.GetString(), r->value.GetStringLength()).Get(root);
  }
  return s;
}

// The properties whose absence fails `schema` for `obj`: "'a'", "'a', 'b'",
// or "'a' or 'b'" for an anyOf; empty when something else is wrong.
std::string missing_required(const Value* schema, const Value& obj, const Value& root, int depth = 0) {
  schema = deref(schema, root);
  if (!schema || !schema->IsObject() || !obj.IsObject() || depth > 8) return {};
  std::string out;
  auto req = schema->FindMember("required");
  if (req != schema->MemberEnd() && req->value.IsArray()) {
    for (auto& name : req->value.GetArray()) {
      if (!name.IsString() || obj.HasMember(name)) continue;
      out += (out.empty() ? "" : ", ") + quoted(name.GetString(), name.GetStringLength());
    }
    if (!out.empty()) return out;
  }
  auto all = schema->FindMember("allOf");
  if (all != schema->MemberEnd() && all->value.IsArray()) {
    for (auto& branch : all->value.GetArray()) {
      out = missing_required(&branch, obj, root, depth + 1);
      if (!out.empty()) return out;
    }
  }
  auto any = schema->FindMember("anyOf");
  if (any != schema->MemberEnd() && any->value.IsArray()) {
    for (auto& branch : any->value.GetArray()) {
      std::string one = missing_required(&branch, obj, root, depth + 1);
      if (one.empty()) return {};  // this branch fails for another reason
      out += (out.empty() ? "" : " or ") + one;
    }
  }
  return out;
}

const char* kind(const Value& v) {
  switch (v.GetType()) {
    case rapidjson::kNullType: return "null";
    case rapidjson::kFalseType:
    case rapidjson::kTrueType: return "boolean";
    case rapidjson::kObjectType: return "object";
    case rapidjson::kArrayType: return "array";
    case rapidjson::kStringType: return "string";
    default: return v.IsInt64() || v.IsUint64() ? "integer" : "number";
  }
}

// "<file>: <keyword>: <what> at <instance path>", from where the validator
// failed; the body is parsed again only here, to name what is wrong.
std::string explain(const detail::CompiledSchema& s, const char* failed_keyword, const rapidjson::Pointer& schema_at,
                    const rapidjson::Pointer& instance_at, const char* body, size_t len) {
  std::string keyword = failed_keyword ? failed_keyword : "?";
  std::string where = uri(instance_at);
  const Value* schema = deref(schema_at.Get(s.source), s.source);
  rapidjson::Document doc;
  doc.Parse(body, len);  // may fail: the validator can stop before a syntax error
  const Value* inst = doc.HasParseError() ? nullptr : instance_at.Get(doc);

  std::string what;
  if (inst && (keyword == "required" || keyword == "allOf" || keyword == "anyOf")) {
    std::string names = missing_required(schema, *inst, s.source);
    if (!names.empty()) {
      keyword = "required";
      bool several = names.find("', '") != std::string::npos;
      what = std::string("missing ") + (several ? "properties " : "property ") + names;
    }
  } else if (inst && keyword == "type" && schema && schema->HasMember("type")) {
    const Value& t = (*schema)["type"];
    std::string expected;
    if (t.IsString()) expected = t.GetString();
    for (SizeType i = 0; t.IsArray() && i < t.Size(); ++i)
      if (t[i].IsString()) expected += (expected.empty() ? "" : " or ") + std::string(t[i].GetString());
    what = "expected " + expected + ", got " + kind(*inst);
  } else if (inst && keyword == "pattern" && inst->IsString()) {
    what = quoted(inst->GetString(), inst->GetStringLength()) + " does not match";
  } else if (keyword == "additionalProperties") {
    what = "property not allowed";
  }
  std::string out = s.file + ": " + keyword + ": " + (what.empty() ? "failed" : what) + " at " + where;
  if (out.size() > kMaxDetail) out.replace(kMaxDetail - 3, std::string::npos, "...");
  return out;
}

// A root allOf/anyOf/oneOf/not that failed in the plan's formula is reported
// as RapidJSON reports it: the root schema, at the root. The stripped
// schema's pointers are the source's (only root keys were taken out).
std::string Check::explain(const char* body, size_t len) const {
  if (failed_ != plan::kKeywords)
    return event::explain(s_, plan::keyword_name(failed_), rapidjson::Pointer(), rapidjson::Pointer(), body, len);
  return event::explain(s_, v_.GetInvalidSchemaKeyword(), v_.GetInvalidSchemaPointer(), v_.GetInvalidDocumentPointer(),
                        body, len);
}

std::unique_ptr<detail::CompiledSchema> compile(const fs::path& file, Validation mode) {
  const std::string path = file.string();
  std::string text = read_file(path);
  auto s = std::make_unique<detail::CompiledSchema>();
  s->file = file.filename().string();
  rapidjson::Document& doc = s->source;
  doc.Parse<rapidjson::kParseValidateEncodingFlag>(text.data(), text.size());
  if (doc.HasParseError()) {
    size_t off = doc.GetErrorOffset(), line = 1, col = 1;
    for (size_t i = 0; i < off && i < text.size(); ++i) text[i] == '\n' ? (++line, col = 1) : ++col;
    throw std::runtime_error(path + ": invalid JSON at offset " + std::to_string(off) + " (line " +
                             std::to_string(line) + ", column " + std::to_string(col) +
                             "): " + rapidjson::GetParseError_En(doc.GetParseError()));
  }
  if (!doc.IsObject()) throw std::runtime_error(path + ": invalid schema: the top level must be an object");
  auto ver = doc.FindMember("$schema");
  if (ver != doc.MemberEnd() && ver->value.IsString()) {
    std::string v = ver->value.GetString();
    if (v != "http://json-schema.org/draft-04/schema#" && v != "http://json-schema.org/draft-04/schema")
      throw std::runtime_error(path + ": invalid schema: $schema '" + v +
                               "' is not draft-04, the only draft RapidJSON 1.1 implements");
  }
  rapidjson::SchemaValidator meta(meta_schema());
  if (!doc.Accept(meta))
    throw std::runtime_error(path + ": invalid schema at " + uri(meta.GetInvalidDocumentPointer()) +
                             ": not valid draft-04 (meta-schema keyword '" +
                             meta.GetInvalidSchemaKeyword() + "' at " + uri(meta.GetInvalidSchemaPointer()) + ")");
  Checker(path, doc).schema(doc, "");
  s->compiled.emplace(doc);
  if (mode == Validation::Planned) s->plan = plan::make(doc);
  return s;
}

}  // namespace

SchemaSet::SchemaSet() = default;
SchemaSet::~SchemaSet() = default;

std::shared_ptr<const SchemaSet> SchemaSet::load(const std::string& dir, Validation mode) {
  std::error_code ec;
  fs::directory_iterator it(dir, ec), end;
  if (ec) throw std::runtime_error(dir + ": " + ec.message());
  std::vector<fs::path> files;
  for (; it != end; it.increment(ec)) {
    if (ec) throw std::runtime_error(dir + ": " + ec.message());
    std::string name = it->path().filename().string();
    if (name[0] == '.' || it->path().extension() != ".json") continue;
    if (it->is_directory(ec)) continue;  // a dangling symlink is read, and reported
    files.push_back(it->path());
  }
  if (ec) throw std::runtime_error(dir + ": " + ec.message());
  std::sort(files.begin(), files.end());

  std::shared_ptr<SchemaSet> set(new SchemaSet);
  for (const auto& f : files) {
    std::string type = f.stem().string();
    if (type == "envelope")
      set->envelope_ = compile(f, mode);
    else
      set->types_.emplace(type, compile(f, mode));
  }
  return set;
}

namespace {
// One parse into the given validators; the caller holds the set's mutex.
bool run_validators(const detail::CompiledSchema* env, const detail::CompiledSchema* type, const char* body,
                    size_t len, std::string& detail) {
  if (!body) body = "", len = 0;
  Scratch& sc = scratch();
  Pool pool(sc.buf.get(), kScratchBytes);
  std::optional<Check> ev, tv;
  if (env) ev.emplace(*env, pool);
  if (type) tv.emplace(*type, pool);
  Fanout fan(ev ? &*ev : nullptr, tv ? &*tv : nullptr);
  rapidjson::MemoryStream stream(body, len);
  rapidjson::ParseResult r = sc.reader.Parse<rapidjson::kParseValidateEncodingFlag>(stream, fan);

  if (ev && !ev->valid()) {
    detail = ev->explain(body, len);
  } else if (tv && !tv->valid()) {
    detail = tv->explain(body, len);
  } else if (fan.too_deep) {
    detail = "nesting deeper than 64 levels";
  } else if (r.IsError()) {
    detail = "invalid JSON at offset " + std::to_string(r.Offset()) + ": " + rapidjson::GetParseError_En(r.Code());
  } else if (stream.Tell() != len) {
    // MemoryStream reports a raw NUL byte as the end of input.
    detail = "invalid JSON at offset " + std::to_string(stream.Tell()) + ": NUL byte outside a string.";
  } else {
    return true;
  }
  return false;
}
}  // namespace

bool SchemaSet::validate(const char* body, size_t len, std::string_view event_type, std::string& detail) const {
  detail.clear();
  auto t = types_.find(event_type);
  const auto* type = t == types_.end() ? nullptr : t->second.get();
  const auto* env = envelope_.get();
  if (!env && !type) return true;
  std::lock_guard<std::mutex> lock(mutex_);
  return run_validators(env, type, body, len, detail);
}

DecodeStatus SchemaSet::decode_validate(const char* body, size_t len, std::string_view routing_key, Envelope& out,
                                        std::string& detail, bool& valid) const {
  valid = true;
  const auto* env = envelope_.get();
  if (!env && types_.empty()) return decode(body, len, routing_key, out, detail);
  Scratch& sc = scratch();
  std::lock_guard<std::mutex> lock(mutex_);
  const auto* type = envelope_.get();  // (`detail` is the string here)
  type = nullptr;
  {
    Pool pool(sc.buf.get(), kScratchBytes);
    std::optional<Check> ev;
    if (env) ev.emplace(*env, pool);
    ValidatingTee tee(ev ? &*ev : nullptr, types_, pool, out, sc);
    DecodeStatus status = sax::decode_with(body, len, routing_key, out, detail, tee);
    if (status != DecodeStatus::Ok) return status;
    if (!tee.decided()) tee.decide(out.event_type);  // the routing key's
    type = tee.type_schema();
    Check* tv = tee.type_validator();
    if (!type || tv) {
      if (ev && !ev->valid() && (!tv || tv->valid() || tee.envelope_failed_first())) {
        detail = ev->explain(body, len);
        valid = false;
      } else if (tv && !tv->valid()) {
        detail = tv->explain(body, len);
        valid = false;
      }
      return status;
    }
  }
  // The event type came too late for the buffer: validate() as it is, on a
  // second parse.
  valid = run_validators(env, type, body, len, detail);
  return DecodeStatus::Ok;
}

size_t SchemaSet::size() const { return types_.size() + (envelope_ ? 1 : 0); }

std::vector<std::string> SchemaSet::event_types() const {
  std::vector<std::string> out;
  for (const auto& [name, schema] : types_) out.push_back(name);
  return out;
}

}  // namespace er::event
