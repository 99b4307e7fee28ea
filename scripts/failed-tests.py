#!/usr/bin/env python3
"""Prints the end of each failed test's output from ctest's LastTest.log.

Usage: failed-tests.py BUILD_DIR [LINES]

ctest --output-on-failure prints a failed test's output where the test ends,
in the middle of a long run; a CI log cut to its head and tail can lose it.
scripts/test.sh calls this last, so the reasons are at the very end.
"""
import os
import re
import sys

REASON = re.compile(r"^(\S+: )?FAIL: |^(FAIL|ERROR): test|FAILED:|AssertionError|Sanitizer|runtime error:")


def main():
    build = sys.argv[1]
    lines = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    log = os.path.join(build, "Testing", "Temporary", "LastTest.log")
    try:
        text = open(log, encoding="utf-8", errors="replace").read()
    except OSError as e:
        print("failed-tests: cannot read %s: %s" % (log, e))
        return
    # One block per test: '"NAME" start time:' ... 'Output:' ... '<end of output>'
    # ... 'Test Passed.' or 'Test Failed.' ... '"NAME" end time:'.
    pattern = re.compile(r'^"(?P<name>[^"\n]*)" start time:.*?^Output:\n-+\n'
                         r'(?P<out>.*?)^<end of output>\n(?P<tail>.*?)^"(?P=name)" end time:',
                         re.M | re.S)
    for m in pattern.finditer(text):
        if "Test Passed." in m.group("tail"):
            continue
        took = re.search(r"^Test time =\s*(\S+ sec)", m.group("tail"), re.M)
        out = m.group("out").rstrip("\n").split("\n")
        print("----- %s: failed after %s (%d output lines) -----"
              % (m.group("name"), took.group(1) if took else "?", len(out)))
        # The lines that name a failure (unittest, Catch2, the shell tests,
        # the sanitizers), wherever they are: cleanup output can bury them.
        named = [l for l in out if REASON.search(l)]
        if named:
            print("\n".join(named[:30]))
            if len(named) > 30:
                print("... %d more such lines" % (len(named) - 30))
            print("----- %s: the end of its output -----" % m.group("name"))
        print("\n".join(out[-lines:]))
    print("-----")


if __name__ == "__main__":
    main()
