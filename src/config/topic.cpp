#include "config/topic.hpp"

#include <stdexcept>

namespace er {

namespace {

// Walks a routing key word by word without allocating. An empty key has no
// words (RabbitMQ semantics), while "a." has two: "a" and "".
struct KeyCursor {
  std::string_view rest;
  bool has_more;

  explicit KeyCursor(std::string_view key) : rest(key), has_more(!key.empty()) {}

  std::string_view next() {
    auto dot = rest.find('.');
    std::string_view word = rest.substr(0, dot);
    if (dot == std::string_view::npos) {
      rest = {};
      has_more = false;
    } else {
      rest.remove_prefix(dot + 1);
    }
    return word;
  }
};

bool match_from(const std::vector<std::string>& words, size_t pi, KeyCursor key) {
  while (pi < words.size()) {
    const std::string& w = words[pi];
    if (w == "#") {
      // "#.#" is the same as "#"; collapsing keeps backtracking shallow.
      while (pi + 1 < words.size() && words[pi + 1] == "#") ++pi;
      if (pi + 1 == words.size()) return true;
      for (;;) {
        if (match_from(words, pi + 1, key)) return true;
        if (!key.has_more) return false;
        key.next();
      }
    }
    if (!key.has_more) return false;
    std::string_view word = key.next();
    if (w != "*" && w != word) return false;
    ++pi;
  }
  return !key.has_more;
}

}  // namespace

TopicPattern::TopicPattern(std::string_view pattern) : text_(pattern) {
  if (pattern.empty()) throw std::invalid_argument("empty topic pattern");
  std::string_view rest = pattern;
  for (;;) {
    auto dot = rest.find('.');
    std::string_view word = rest.substr(0, dot);
    if (word.empty())
      throw std::invalid_argument("invalid topic pattern '" + text_ + "': empty word");
    if (word.size() > 1 && word.find_first_of("*#") != std::string_view::npos)
      throw std::invalid_argument("invalid topic pattern '" + text_ +
                                  "': '*' and '#' must be whole words");
    words_.emplace_back(word);
    if (dot == std::string_view::npos) break;
    rest.remove_prefix(dot + 1);
  }
}

bool TopicPattern::matches(std::string_view routing_key) const {
  return match_from(words_, 0, KeyCursor(routing_key));
}

}  // namespace er
