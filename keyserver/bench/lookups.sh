#!/usr/bin/env bash
# Lookups per second of GET /users/<name> for an activated user.
#
# Release build, loopback, rate limits off, the same client as for the original server:
#   wrk -t2 -c32 -d10s
# Needs: wrk (apt-get install -y wrk), curl, openssl, python3.
# DATABASE=postgres://... benchmarks against PostgreSQL instead of a fresh SQLite file;
# SERVE_ARGS="--cache-ttl 0" (say) adds flags to `serve`.
# Prints the wrk report and a last line "lookups/s: N".
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
for tool in wrk curl openssl python3; do
    command -v "$tool" >/dev/null || { echo "lookups.sh: needs $tool (apt-get install -y $tool)" >&2; exit 1; }
done

cargo build --release -p nes-keyserver --manifest-path "$root/Cargo.toml" >&2
bin="$root/target/release/nes-keyserver"

tmp=$(mktemp -d)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
database=${DATABASE:-sqlite://$tmp/ks.db}

"$bin" keygen --out "$tmp/server.key" >/dev/null 2>&1
"$bin" serve --listen "127.0.0.1:$port" --database "$database" --key "$tmp/server.key" \
    --public-url "$base" --mail-dir "$tmp/mail" --register-rate 0 --lookup-rate 0 \
    ${SERVE_ARGS:-} 2>"$tmp/server.log" &
server_pid=$!

for _ in $(seq 1 300); do
    curl -fs "$base/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "$base/healthz" >/dev/null || { echo "lookups.sh: the server did not start:" >&2; cat "$tmp/server.log" >&2; exit 1; }

# A user with two fresh keys, registered and activated through the mail link.
name="bench_$$"
for kind in message sign; do
    openssl genrsa -out "$tmp/$kind.key" 2048 2>/dev/null
    openssl rsa -in "$tmp/$kind.key" -pubout -out "$tmp/$kind.pub" 2>/dev/null
done
python3 - "$name" "$tmp" >"$tmp/register.json" <<'PY'
import json, sys
name, tmp = sys.argv[1], sys.argv[2]
print(json.dumps({"username": name, "email": name + "@example.org",
                  "public_key_message": open(tmp + "/message.pub").read(),
                  "public_key_sign": open(tmp + "/sign.pub").read()}))
PY
curl -fs -X POST -H 'Content-Type: application/json' --data-binary @"$tmp/register.json" "$base/users" >/dev/null
activate=$(grep -h '^Activate: ' "$tmp"/mail/*.eml | head -1 | sed 's/^Activate: //; s/\r$//')
curl -fs "$activate" >/dev/null
curl -fs "$base/users/$name" >/dev/null

wrk -t2 -c32 -d10s "$base/users/$name" | tee "$tmp/wrk.txt"
if grep -q 'Non-2xx' "$tmp/wrk.txt"; then
    echo "lookups.sh: some lookups failed" >&2
    exit 1
fi
echo "lookups/s: $(awk '/^Requests\/sec:/ {print $2}' "$tmp/wrk.txt")"
