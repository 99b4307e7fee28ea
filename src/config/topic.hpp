#pragma once
// AMQP topic patterns: words separated by '.', '*' matches exactly one word,
// '#' matches zero or more words.
#include <string>
#include <string_view>
#include <vector>

namespace er {

class TopicPattern {
 public:
  // Throws std::invalid_argument with a message for a malformed pattern
  // (empty pattern, empty word, '*' or '#' mixed with other characters in a word).
  explicit TopicPattern(std::string_view pattern);

  // Time is O(pattern words x key words). `steps`, if given, receives the
  // number of inner steps taken (tests use it to check the bound).
  bool matches(std::string_view routing_key, size_t* steps = nullptr) const;
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  std::vector<std::string> words_;
};

}  // namespace er
