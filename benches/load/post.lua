-- wrk script: POSTs one prepared KServe v2 body (BODY_FILE), with the binary extension's
-- header when HEADER_LEN is set, and prints a JSON summary line at the end.
wrk.method = "POST"
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.body = f:read("*a")
f:close()
local header_len = os.getenv("HEADER_LEN")
if header_len and header_len ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_len
  wrk.headers["Content-Type"] = "application/octet-stream"
end

-- The JSON summary line (run from the repository root).
dofile("benches/load/summary.lua")
