#include <catch2/catch.hpp>

#include <stdexcept>

#include "config/topic.hpp"

using er::TopicPattern;

namespace {
bool m(const char* pattern, const char* key) { return TopicPattern(pattern).matches(key); }
}  // namespace

TEST_CASE("literal patterns match exactly", "[topic]") {
  CHECK(m("a", "a"));
  CHECK(m("a.b.c", "a.b.c"));
  CHECK_FALSE(m("a.b", "a.b.c"));
  CHECK_FALSE(m("a.b.c", "a.b"));
  CHECK_FALSE(m("a", "ab"));
  CHECK_FALSE(m("a", ""));
  CHECK_FALSE(m("a.b", "a.bb"));
}

TEST_CASE("'*' matches exactly one word", "[topic]") {
  CHECK(m("*", "a"));
  CHECK_FALSE(m("*", ""));
  CHECK_FALSE(m("*", "a.b"));
  CHECK(m("speaker.*", "speaker.created"));
  CHECK_FALSE(m("speaker.*", "speaker"));
  CHECK_FALSE(m("speaker.*", "speaker.a.b"));
  CHECK(m("a.*.c", "a.b.c"));
  CHECK_FALSE(m("a.*.c", "a.c"));
  CHECK_FALSE(m("a.*.c", "a.b.b.c"));
  CHECK(m("*.*", "a.b"));
  CHECK_FALSE(m("*.*", "a"));
  // Routing keys may contain empty words even though patterns may not.
  CHECK(m("a.*", "a."));
  CHECK(m("a.*.b", "a..b"));
}

TEST_CASE("'#' matches zero or more words", "[topic]") {
  CHECK(m("#", ""));
  CHECK(m("#", "a"));
  CHECK(m("#", "a.b.c"));
  CHECK(m("a.#", "a"));
  CHECK(m("a.#", "a.b"));
  CHECK(m("a.#", "a.b.c"));
  CHECK_FALSE(m("a.#", "b.a"));
  CHECK_FALSE(m("a.#", ""));
  CHECK(m("#.a", "a"));
  CHECK(m("#.a", "x.y.a"));
  CHECK_FALSE(m("#.a", "a.x"));
  CHECK_FALSE(m("#.a", ""));
  CHECK(m("a.#.b", "a.b"));
  CHECK(m("a.#.b", "a.x.y.b"));
  CHECK_FALSE(m("a.#.b", "a.x.y"));
}

TEST_CASE("multiple '#' and mixes with '*'", "[topic]") {
  CHECK(m("#.#", ""));
  CHECK(m("#.#", "a.b"));
  CHECK(m("#.a.#", "a"));
  CHECK(m("#.a.#", "x.a.y.z"));
  CHECK_FALSE(m("#.a.#", "x.b.y"));
  CHECK(m("#.a.#.b.#", "a.b"));
  CHECK(m("#.a.#.b.#", "q.a.r.s.b.t"));
  CHECK_FALSE(m("#.a.#.b.#", "b.a"));
  CHECK(m("#.*", "a"));
  CHECK(m("#.*", "a.b.c"));
  CHECK_FALSE(m("#.*", ""));
  CHECK(m("*.#", "a"));
  CHECK_FALSE(m("*.#", ""));
  CHECK(m("*.#.*", "a.b"));
  CHECK_FALSE(m("*.#.*", "a"));
  CHECK(m("a.#.#.b", "a.b"));
  // Backtracking: the first 'a' seen is not the one that lets the rest match.
  CHECK(m("#.a.b", "a.a.b"));
  CHECK(m("#.a.*.c", "a.a.x.c"));
}

TEST_CASE("text() keeps the original pattern", "[topic]") {
  CHECK(TopicPattern("speaker.*").text() == "speaker.*");
}

TEST_CASE("malformed patterns are rejected", "[topic]") {
  CHECK_THROWS_WITH(TopicPattern(""), "empty topic pattern");
  CHECK_THROWS_WITH(TopicPattern("a..b"), "invalid topic pattern 'a..b': empty word");
  CHECK_THROWS_AS(TopicPattern(".a"), std::invalid_argument);
  CHECK_THROWS_AS(TopicPattern("a."), std::invalid_argument);
  CHECK_THROWS_AS(TopicPattern("."), std::invalid_argument);
  CHECK_THROWS_WITH(TopicPattern("a.b*"),
                    "invalid topic pattern 'a.b*': '*' and '#' must be whole words");
  CHECK_THROWS_AS(TopicPattern("#a"), std::invalid_argument);
  CHECK_THROWS_AS(TopicPattern("**"), std::invalid_argument);
  CHECK_THROWS_AS(TopicPattern("*#"), std::invalid_argument);
  CHECK_NOTHROW(TopicPattern("#"));
  CHECK_NOTHROW(TopicPattern("a.*.#"));
}

TEST_CASE("'#' in the middle cannot make matching exponential", "[topic]") {
  // A backtracking matcher tries C(60, k) splits of the key for these
  // patterns and would not finish; an attacker chooses the event type.
  std::string key = "a";
  for (int i = 1; i < 60; ++i) key += ".a";
  for (const char* pattern : {"#.a.#.a.#.a.#.a.#.a.#.a.#.x", "#.#.#.#.#.#.#.x", "#.*.#.*.#.*.#.*.#.b"}) {
    TopicPattern p(pattern);
    size_t words = 1;
    for (const char* c = pattern; *c; ++c) words += *c == '.';
    size_t steps = 0;
    CHECK_FALSE(p.matches(key, &steps));
    CHECK(steps > 0);
    CHECK(steps <= (words + 1) * 61 * 2);  // linear in pattern x key
  }
  size_t steps = 0;
  CHECK(TopicPattern("#.a.#.a.#.a.#.a.#.a.#.a.#.a").matches(key, &steps));
  CHECK(steps <= 15 * 61 * 2);
  CHECK(TopicPattern("#.a.#.a.#.a.#.a.#.a.#.a.#").matches(key + ".x"));
  CHECK_FALSE(TopicPattern("#.a.#.a.#.a.#.a.#.a.#.a.#.a").matches(key + ".x"));
}
