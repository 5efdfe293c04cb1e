#!/bin/sh
# log-to-file.sh — appends every incoming NES message to FILE, one JSON line each.
#
#   examples/log-to-file.sh FILE [LISTEN FLAGS...]      e.g. --socket PATH, --from alice
#
# Stop it any time and start it again: it resumes after the cursor of the last line in
# FILE, so no message is lost and none is written twice (nesd keeps the event log).
set -eu
file=${1:?usage: log-to-file.sh FILE [LISTEN FLAGS...]}
shift
since=$(tail -n 1 "$file" 2>/dev/null | sed -n 's/.*"cursor":\([0-9][0-9]*\).*/\1/p')
if [ -n "$since" ]; then
  exec nes listen --json --since "$since" "$@" >>"$file"
else
  exec nes listen --json "$@" >>"$file"
fi
