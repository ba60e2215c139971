-- wrk script: POST /api/orders of one line (quantity 1) over skus wrk-1..wrk-SKUS.
-- Needs BIDDER_TOKEN; seed.sh with SKUS=N stocks the skus.
-- wrk -t2 -c64 -d10s -s loadtest/wrk/order.lua http://127.0.0.1:8080
local skus = tonumber(os.getenv("SKUS") or "1000")
local token = os.getenv("BIDDER_TOKEN") or error("set BIDDER_TOKEN")

function init(args)
  math.randomseed(os.time())
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  local body = '{"lines":[{"sku":"wrk-' .. math.random(1, skus) .. '","quantity":1}]}'
  return wrk.format("POST", "/api/orders", nil, body)
end
