-- wrk script: POST /api/bids with amounts that rise, over auctions 1..AUCTIONS.
-- Needs BIDDER_TOKEN (seed.sh prints it).
-- wrk -t2 -c64 -d10s -s loadtest/wrk/bid.lua http://127.0.0.1:8080
local auctions = tonumber(os.getenv("AUCTIONS") or "1000")
local token = os.getenv("BIDDER_TOKEN") or error("set BIDDER_TOKEN")
local counter = 0
local thread_no = 0
local threads = 0
local statuses = {}

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  math.randomseed(os.time() + thread_no)
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  counter = counter + 1
  -- Rising amounts, distinct per thread, so most bids beat the last one.
  local amount = counter * 16 + thread_no + 1000
  local body = '{"auction_id":' .. math.random(1, auctions) .. ',"amount":' .. amount .. '}'
  return wrk.format("POST", "/api/bids", nil, body)
end
