#!/bin/sh
# log-to-file.sh — appends every incoming NES message to FILE, one JSON line each.
#
#   examples/log-to-file.sh FILE [LISTEN FLAGS...]      e.g. --socket PATH, --from alice
#
# Stop it any time and start it again: it resumes after the cursor of the last line in
# FILE, so no message is lost and none is written twice (nesd keeps the event log). If
# FILE was written from another store (nesd's store re-created or restored from an older
# copy), nes listen refuses that cursor and says so (exit 1) rather than skip messages.
set -eu
file=${1:?usage: log-to-file.sh FILE [LISTEN FLAGS...]}
shift
# The cursor is an opaque string ("cursor":"..."); files written before were numbers.
since=$(tail -n 1 "$file" 2>/dev/null | sed -n -e 's/.*"cursor":"\([^"]*\)".*/\1/p' -e 's/.*"cursor":\([0-9][0-9]*\).*/\1/p')
if [ -n "$since" ]; then
  exec nes listen --json --since "$since" "$@" >>"$file"
else
  exec nes listen --json "$@" >>"$file"
fi
