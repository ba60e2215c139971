#!/usr/bin/env bash
# Seeds a running gavel for the wrk scripts beside this file: registers (or logs
# in) a seller and a bidder through the API, creates AUCTIONS (default 1000) open
# auctions and stocks SKUS (default 0) skus wrk-1..wrk-N, and prints
# `export BIDDER_TOKEN=…` for bid.lua and order.lua.
#   eval "$(loadtest/wrk/seed.sh http://127.0.0.1:8080)"
set -euo pipefail
target=${1:-http://127.0.0.1:8080}
n=${AUCTIONS:-1000}

session() { # email role -> token
    curl -s -o /dev/null -X POST "$target/api/accounts" -H 'content-type: application/json' \
        -d "{\"email\":\"$1\",\"password\":\"wrk-password\",\"role\":\"$2\"}"
    curl -s -X POST "$target/api/sessions" -H 'content-type: application/json' \
        -d "{\"email\":\"$1\",\"password\":\"wrk-password\"}" | sed -E 's/.*"token":"([^"]+)".*/\1/'
}
seller=$(session wrk-seller@example.com seller)
bidder=$(session wrk-bidder@example.com bidder)

ends=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
body="{\"title\":\"lot\",\"reserve\":1,\"min_increment\":1,\"starts_at\":\"2020-01-01T00:00:00Z\",\"ends_at\":\"$ends\"}"
urls=$(mktemp)
if ((n > 0)); then
    for _ in $(seq "$n"); do printf 'url = "%s/api/auctions"\n' "$target"; done > "$urls"
    curl -s --no-progress-meter --parallel --parallel-max 16 -K "$urls" >/dev/null \
        -H "authorization: Bearer $seller" -H 'content-type: application/json' -d "$body"
fi
skus=${SKUS:-0}
if ((skus > 0)); then
    for i in $(seq "$skus"); do printf 'url = "%s/api/inventory/wrk-%d"\n' "$target" "$i"; done > "$urls"
    curl -s --no-progress-meter --parallel --parallel-max 16 -K "$urls" -X PUT >/dev/null \
        -H "authorization: Bearer $seller" -H 'content-type: application/json' \
        -d '{"title":"stock","available":1000000000}'
fi
rm -f "$urls"
echo "seeded $n auctions and $skus skus at $target" >&2
echo "export BIDDER_TOKEN=$bidder"
