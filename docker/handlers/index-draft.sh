#!/bin/sh
# Example exec handler (any language works): the event arrives on stdin and
# its fields in the environment. Exit 0 = ack, 75 = retry, 65 = dead-letter.
set -eu
mkdir -p "$INDEX_DIR"
cat > "$INDEX_DIR/$EVENT_ID.json"
echo "indexed draft event $EVENT_ID ($EVENT_TYPE, aggregate $AGGREGATE_ID) into $INDEX_DIR"
