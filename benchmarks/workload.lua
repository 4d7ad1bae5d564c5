-- wrk script of the dpiguard benchmark: replays a pre-generated list of authenticated requests.
-- Usage: wrk -t1 -cN -dDs -s workload.lua http://HOST:PORT -- REQUESTS.tsv [START-OFFSET]
-- Each line of REQUESTS.tsv: METHOD \t PATH \t BEARER-TOKEN \t ACCEPT (see benchmarks/workload.py).
-- Every thread walks the list from its own offset; done() prints one JSON line after "@@RESULT".

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local file = args[1]
  requests = {}
  for line in io.lines(file) do
    local method, path, token, accept = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$")
    if method then
      local headers = { ["Accept"] = accept, ["User-Agent"] = "dpiguard-bench" }
      if token ~= "" then headers["Authorization"] = "Bearer " .. token end
      requests[#requests + 1] = wrk.format(method, path, headers)
    end
  end
  if #requests == 0 then error("no request in " .. file) end
  index = ((id or 0) * 7919 + tonumber(args[2] or "0")) % #requests
  statuses = {}
end

function request()
  index = index + 1
  if index > #requests then index = 1 end
  return requests[index]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do merged[code] = (merged[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(merged) do parts[#parts + 1] = string.format('"%d":%d', code, n) end
  local e = summary.errors
  io.write("@@RESULT")
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f},"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean,
    table.concat(parts, ",")))
end
