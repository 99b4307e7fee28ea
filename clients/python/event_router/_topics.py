"""Event-type patterns in the style of RabbitMQ topic bindings.

Words are separated by '.'; '*' matches exactly one word, '#' zero or more.
"""


def compile_pattern(pattern):
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("an event-type pattern must be a non-empty string, got %r" % (pattern,))
    return tuple(pattern.split("."))


def _close(words, states):
    # A '#' may match zero words: whoever stands on it also stands after it.
    stack = list(states)
    while stack:
        i = stack.pop()
        if i < len(words) and words[i] == "#" and i + 1 not in states:
            states.add(i + 1)
            stack.append(i + 1)
    return states


def matches(words, key):
    """Whether the compiled pattern `words` matches the event type `key`.

    An NFA walk, linear in the key's words: event types come from publishers
    and may be long, so no recursion and no backtracking.
    """
    n = len(words)
    states = _close(words, {0})
    for w in (key.split(".") if key else ()):
        nxt = set()
        for i in states:
            if i < n:
                p = words[i]
                if p == "#":
                    nxt.add(i)
                elif p == "*" or p == w:
                    nxt.add(i + 1)
        if not nxt:
            return False
        states = _close(words, nxt)
    return n in states
