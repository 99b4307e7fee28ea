#include "config/topic.hpp"

#include <algorithm>
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

// NFA simulation: `live[i]` = the first i pattern words can match the key
// words read so far. One pass over the key, O(pattern x key) steps, so no
// pattern can make an attacker-chosen event type backtrack exponentially.
bool match_words(const std::vector<std::string>& words, KeyCursor key, size_t* steps) {
  const size_t n = words.size();
  std::vector<char> live(n + 1, 0), next(n + 1, 0);
  size_t count = 0;
  // '#' may match zero words: its state also reaches the next one.
  auto close_over_hash = [&](std::vector<char>& s) {
    for (size_t i = 0; i < n; ++i, ++count)
      if (s[i] && words[i] == "#") s[i + 1] = 1;
  };
  live[0] = 1;
  close_over_hash(live);
  while (key.has_more) {
    std::string_view word = key.next();
    std::fill(next.begin(), next.end(), 0);
    bool any = false;
    for (size_t i = 0; i < n; ++i, ++count) {
      if (!live[i]) continue;
      const std::string& w = words[i];
      if (w == "#") {
        next[i] = 1;  // '#' swallows this word and may take more
        any = true;
      } else if (w == "*" || w == word) {
        next[i + 1] = 1;
        any = true;
      }
    }
    if (!any) {
      if (steps) *steps = count;
      return false;
    }
    close_over_hash(next);
    live.swap(next);
  }
  if (steps) *steps = count;
  return live[n] != 0;
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

bool TopicPattern::matches(std::string_view routing_key, size_t* steps) const {
  return match_words(words_, KeyCursor(routing_key), steps);
}

}  // namespace er
