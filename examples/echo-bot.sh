#!/bin/sh
# echo-bot.sh — answers every incoming NES message with "echo: <text>".
#
#   examples/echo-bot.sh [LISTEN FLAGS...]
#   e.g. examples/echo-bot.sh --socket /run/user/1000/nes/nesd.sock --from alice
#
# `nes listen --exec` runs the command once per incoming message, with the text on
# stdin and NES_FROM, NES_ID, NES_TIMESTAMP, NES_CURSOR (and NES_SOCKET, so the inner
# `nes send` talks to the same daemon) in the environment. The reply is piped, not
# passed as an argument, so any text (even one starting with "-") goes through as is.
# Stop it with Ctrl-C. Started again with `--since CURSOR` (the NES_CURSOR of the last
# message it answered) it also answers what came while it was away.
set -eu
exec nes listen "$@" --exec '{ printf "echo: "; cat; } | nes send -- "$NES_FROM"'
