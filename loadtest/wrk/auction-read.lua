-- wrk script: GET /api/auctions/{id} over ids 1..AUCTIONS (default 1000), random.
-- wrk -t2 -c64 -d10s -s loadtest/wrk/auction-read.lua http://127.0.0.1:8080
local auctions = tonumber(os.getenv("AUCTIONS") or "1000")

function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
end

function request()
  return wrk.format("GET", "/api/auctions/" .. math.random(1, auctions))
end
