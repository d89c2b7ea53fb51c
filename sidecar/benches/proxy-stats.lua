-- wrk summary for sidecar/benches/proxy.sh: one machine-readable line.
-- Latencies are in µs. "admitted" percentiles assume every non-2xx answer is faster than every
-- 2xx answer (true for the bulkhead scenario, where 2xx take >= the upstream's sleep and 503s
-- are immediate): they are the overall percentiles shifted past the non-2xx share. rej_max_us is
-- the latency just below that share (the slowest rejection if the assumption holds).
done = function(summary, latency, requests)
  local n = summary.requests
  local bad = summary.errors.status
  local errs = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout
  local ok = n - bad
  local adm50, adm99, rejmax = 0, 0, 0
  if n > 0 and ok > 0 then
    local f = bad / n
    adm50 = latency:percentile(100 * (f + (1 - f) * 0.50))
    adm99 = latency:percentile(100 * (f + (1 - f) * 0.99))
    if bad > 0 then rejmax = latency:percentile(100 * f * 0.999) end
  end
  io.write(string.format(
    "WRK requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d sockerr=%d adm_p50_us=%d adm_p99_us=%d rej_max_us=%d\n",
    n, summary.duration, latency:percentile(50), latency:percentile(99), bad, errs,
    adm50, adm99, rejmax))
end
