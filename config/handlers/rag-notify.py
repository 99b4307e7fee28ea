#!/usr/bin/env python3
"""Example exec handler in Python: reads the event from stdin, prints a line.

Exit codes: 0 ack, 75 (EX_TEMPFAIL) retry, 65 (EX_DATAERR) dead-letter.

The event comes from the publisher and is untrusted: check its shape before
use, and print bounded, escaped text only (the line goes to the daemon's log).
"""
import json
import os
import re
import sys

SAFE_ID = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}")


def reject(why):
    print("rag-notify: " + why, file=sys.stderr)
    sys.exit(65)


try:
    event = json.load(sys.stdin)
except ValueError as e:
    reject("not JSON: %s" % str(e)[:200])
if not isinstance(event, dict):
    reject("the event is not a JSON object")
payload = event.get("payload", {})
if not isinstance(payload, dict):
    reject("payload is not a JSON object")
event_id = os.environ.get("EVENT_ID", "")
if not SAFE_ID.fullmatch(event_id):
    reject("unsafe event id")

keys = sorted(payload)[:20]
print("rag event %s id=%s attempt=%s payload keys=%s%s" % (
    ascii(os.environ.get("EVENT_TYPE", ""))[:130], event_id, os.environ.get("ATTEMPT", "?"),
    ascii([k[:64] for k in keys]), " (+%d more)" % (len(payload) - 20) if len(payload) > 20 else ""))
