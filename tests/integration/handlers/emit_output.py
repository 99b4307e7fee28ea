#!/usr/bin/python3
"""Exec handler for the log tests: writes raw bytes to stdout/stderr.

usage: emit_output.py
Reads the event from stdin. Its payload may hold:
  stdout_hex / stderr_hex: bytes (hex) written as they are to stdout / stderr
  exit_code: the exit status (default 0)
"""
import json
import os
import sys


def main():
    raw = sys.stdin.buffer.read()
    try:
        payload = json.loads(raw).get("payload") or {}
    except (ValueError, AttributeError):
        payload = {}
    for key, fd in (("stdout_hex", 1), ("stderr_hex", 2)):
        if payload.get(key):
            data = bytes.fromhex(payload[key])
            while data:
                data = data[os.write(fd, data):]
    return int(payload.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
