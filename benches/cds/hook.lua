-- wrk script: POSTs the prepared CDS Hooks request (BODY_FILE) with a fresh JWT per request
-- from TOKENS_FILE (each wrk thread takes every n-th token: a jti is never sent twice), and
-- prints a JSON summary line at the end.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("offset", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
  tokens = {}
  local stride = tonumber(os.getenv("THREADS"))
  local i = 0
  for line in io.lines(os.getenv("TOKENS_FILE")) do
    if i % stride == offset then
      table.insert(tokens, line)
    end
    i = i + 1
  end
  next_token = 1
end

function request()
  local t = tokens[next_token]
  if t == nil then
    t = "exhausted"
  end
  next_token = next_token + 1
  wrk.headers["Authorization"] = "Bearer " .. t
  return wrk.format()
end

-- The JSON summary line (run from the repository root).
dofile("benches/load/summary.lua")
