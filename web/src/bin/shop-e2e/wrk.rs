//! Throughput with wrk: a Lua script logs in 64 sessions and then adds
//! items to them in turn, keeping each session's cookie.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::BoxError;
use super::cluster::which;

/// The script: the first 64 requests log in (keeping the cookies their
/// answers set), then every request adds an item to one of the sessions.
const SCRIPT: &str = r#"
local cookies = {}
local logins = 0
local n = 0
request = function()
  n = n + 1
  if logins < 64 and #cookies < 64 then
    logins = logins + 1
    return wrk.format("POST", "/login?user=wrk")
  end
  local path = "/cart/add?item=w" .. n
  if #cookies == 0 then
    return wrk.format("POST", path)
  end
  return wrk.format("POST", path, { ["Cookie"] = cookies[(n % #cookies) + 1] })
end
response = function(status, headers, body)
  local c = headers["Set-Cookie"] or headers["set-cookie"]
  if c ~= nil and #cookies < 64 then
    cookies[#cookies + 1] = string.match(c, "^([^;]+)")
  end
end
"#;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wrk {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub non_2xx: u64,
    pub errors: u64,
}

/// Runs wrk (`-t1 -c16`) against `nginx` for `secs`.
pub fn run(dir: &Path, nginx: SocketAddr, secs: u64) -> Result<Wrk, BoxError> {
    let wrk = which("wrk")
        .ok_or("wrk is not installed (Debian: apt-get install wrk); the e2e run needs it")?;
    let script = dir.join("cookies.lua");
    std::fs::write(&script, SCRIPT)?;
    let out = Command::new(wrk)
        .args(["-t1", "-c16", "--latency", "--timeout", "5s"])
        .arg(format!("-d{secs}s"))
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{nginx}/"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    parse(&text).ok_or_else(|| format!("unreadable wrk output:\n{text}").into())
}

/// Parses wrk's report.
fn parse(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines().map(str::trim) {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("50%"), Some(v)) => w.p50_us = micros(v)?,
            (Some("99%"), Some(v)) => w.p99_us = micros(v)?,
            (Some("Requests/sec:"), Some(v)) => w.rps = v.parse().ok()?,
            (Some(n), Some("requests")) => w.requests = n.parse().ok()?,
            (Some("Non-2xx"), _) => w.non_2xx = line.rsplit(' ').next()?.parse().ok()?,
            (Some("Socket"), Some("errors:")) => {
                w.errors = line
                    .split(',')
                    .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    (w.rps > 0.0).then_some(w)
}

/// wrk's `1.23ms`, `456.00us`, `1.20s` as µs.
fn micros(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

/// A pause before measuring, so a run starts on warm hosts.
pub const WARMUP: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    #[test]
    fn reads_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:9/\n  1 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.02ms  300.00us   9.00ms   90.00%\n  Latency Distribution\n     50%  812.00us\n     75%    1.10ms\n     90%    1.50ms\n     99%    2.40ms\n  61234 requests in 5.00s, 9.00MB read\n  Non-2xx or 3xx responses: 12\nRequests/sec:  12246.80\nTransfer/sec:      1.80MB\n";
        let w = super::parse(out).unwrap();
        assert_eq!(w.requests, 61234);
        assert!((w.rps - 12246.8).abs() < 1e-6);
        assert!((w.p50_us - 812.0).abs() < 1e-6 && (w.p99_us - 2400.0).abs() < 1e-6);
        assert_eq!(w.non_2xx, 12);
    }
}
