#!/usr/bin/env python3
"""Example exec handler in Python: reads the event from stdin, prints a line.

Exit codes: 0 ack, 75 (EX_TEMPFAIL) retry, 65 (EX_DATAERR) dead-letter.
"""
import json
import os
import sys

try:
    event = json.load(sys.stdin)
except ValueError as e:
    print(f"not JSON: {e}", file=sys.stderr)
    sys.exit(65)

payload = event.get("payload", {})
print(f"rag event {os.environ['EVENT_TYPE']} id={os.environ['EVENT_ID']} "
      f"attempt={os.environ['ATTEMPT']} payload keys={sorted(payload)}")
