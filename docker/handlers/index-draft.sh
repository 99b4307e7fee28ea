#!/bin/sh
# Example exec handler (any language works): the event arrives on stdin and
# its fields in the environment. Exit 0 = ack, 75 = retry, 65 = dead-letter.
#
# Everything in the event comes from the publisher and is untrusted. The id
# becomes a file name, so it must not be able to leave $INDEX_DIR ("../x").
set -eu
export LC_ALL=C  # bracket ranges mean ASCII only
id=${EVENT_ID-}
case "$id" in
  '' | .* | *[!A-Za-z0-9._:-]*)
    echo "index-draft: refusing unsafe event id (allowed: A-Z a-z 0-9 . _ : -, not starting with '.')" >&2
    exit 65 ;;
esac
if [ "${#id}" -gt 128 ]; then
  echo "index-draft: refusing event id longer than 128 characters" >&2
  exit 65
fi
mkdir -p "$INDEX_DIR"
cat > "$INDEX_DIR/$id.json"
echo "indexed draft event $id ($EVENT_TYPE, aggregate $AGGREGATE_ID) into $INDEX_DIR"
