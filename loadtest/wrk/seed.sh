#!/usr/bin/env bash
# Creates AUCTIONS (default 1000) open auctions on a running gavel, for the wrk
# scripts beside this file. Needs GAVEL_JWT_SECRET (the server's) and the gavel
# binary (GAVEL, default target/release/gavel).
set -euo pipefail
target=${1:-http://127.0.0.1:8080}
gavel=${GAVEL:-target/release/gavel}
n=${AUCTIONS:-1000}
seller=$("$gavel" token --sub 1 --role seller)
ends=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
body="{\"title\":\"lot\",\"reserve\":1,\"min_increment\":1,\"starts_at\":\"2020-01-01T00:00:00Z\",\"ends_at\":\"$ends\"}"
for _ in $(seq "$n"); do
    printf 'url = "%s/api/auctions"\n' "$target"
done > /tmp/gavel-seed-urls.$$
curl -s -o /dev/null --parallel --parallel-max 16 -K /tmp/gavel-seed-urls.$$ \
    -H "authorization: Bearer $seller" -H 'content-type: application/json' -d "$body"
rm -f /tmp/gavel-seed-urls.$$
echo "seeded $n auctions at $target"
