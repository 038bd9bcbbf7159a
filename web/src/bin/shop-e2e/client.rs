//! A cookie-keeping shop client that checks every answer against a model
//! of its cart, and what it found.
//!
//! Each client logs in, then adds items (every third one durable) until
//! told to stop. An answer whose item count is not the model's makes it
//! look at the whole cart: items missing from it are lost (durable ones
//! must never be; local ones only if acked shortly before the kill), items
//! it never added are phantoms (never allowed). A 502, 503 or a dropped
//! connection leaves an add in doubt: either outcome is fine.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Items a cart keeps (the shop's `CART_MAX`).
const CART_MAX: usize = 50;
/// Longest answer we read.
const BODY_MAX: usize = 64 * 1024;

/// One HTTP/1.1 answer.
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub cookie: Option<String>,
    pub host: Option<u64>,
}

/// A keep-alive HTTP/1.1 connection to nginx.
pub struct Http {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http { addr, conn: None }
    }

    /// One request; a transport error drops the connection (the next call
    /// opens another).
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        cookie: Option<&str>,
    ) -> std::io::Result<Answer> {
        let r = self.call_once(method, path, cookie);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn call_once(
        &mut self,
        method: &str,
        path: &str,
        cookie: Option<&str>,
    ) -> std::io::Result<Answer> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("connected above");
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        write!(
            conn.get_mut(),
            "{method} {path} HTTP/1.1\r\nHost: shop\r\n{cookie}Content-Length: 0\r\n\r\n"
        )?;
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status line"))?;
        let (mut len, mut chunked, mut close) = (0usize, false, false);
        let (mut set_cookie, mut host) = (None, None);
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(bad("closed in the headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.parse().map_err(|_| bad("bad length"))?,
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                "set-cookie" => set_cookie = v.split(';').next().map(str::to_string),
                "x-host" => host = v.parse().ok(),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                conn.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("bad chunk"))?;
                if body.len() + n > BODY_MAX {
                    return Err(bad("answer too long"));
                }
                let start = body.len();
                body.resize(start + n + 2, 0);
                conn.read_exact(&mut body[start..])?;
                body.truncate(start + n);
                if n == 0 {
                    break;
                }
            }
        } else {
            if len > BODY_MAX {
                return Err(bad("answer too long"));
            }
            body.resize(len, 0);
            conn.read_exact(&mut body)?;
        }
        if close {
            self.conn = None;
        }
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            cookie: set_cookie,
            host,
        })
    }
}

/// `key=value` of a one-line answer.
pub fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requests: u64,
    pub adds_acked: u64,
    pub in_doubt: u64,
    pub lost_replicated: u64,
    pub lost_local: u64,
    /// Longest time between a lost local item's ack and the kill, in µs.
    pub window_us: u64,
    /// Lost items acked after the kill (never allowed).
    pub lost_after_kill: u64,
    pub phantoms: u64,
    /// The session's host changed after the kill.
    pub failed_over: bool,
    /// Answers that were neither right nor a clear refusal.
    pub errors: Vec<String>,
}

struct Item {
    name: String,
    durable: bool,
    acked: Instant,
}

/// Runs one client until `stop`; `kill_at` is set when a host is killed.
pub fn run(
    id: usize,
    nginx: SocketAddr,
    stop: &AtomicBool,
    kill_at: &std::sync::Mutex<Option<Instant>>,
) -> Report {
    let mut r = Report::default();
    let mut http = Http::new(nginx);
    let mut cookie: Option<String> = None;
    let mut model: Vec<Item> = Vec::new();
    let mut ever: HashSet<String> = HashSet::new();
    let mut host_before_kill: Option<u64> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        r.requests += 1;
        let Some(c) = cookie.clone() else {
            match http.call("POST", &format!("/login?user=c{id}"), None) {
                Ok(a) if a.status == 200 => {
                    cookie = a.cookie;
                    if cookie.is_none() {
                        r.errors.push("login set no cookie".into());
                        return r;
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
            continue;
        };
        n += 1;
        let name = format!("c{id}i{n}");
        let durable = n.is_multiple_of(3);
        let path = format!("/cart/add?item={name}&durable={}", u8::from(durable));
        ever.insert(name.clone());
        let Ok(a) = http.call("POST", &path, Some(&c)) else {
            r.in_doubt += 1;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let killed = *kill_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(h) = a.host {
            match killed {
                None => host_before_kill = Some(h),
                Some(_) if host_before_kill.is_some_and(|b| b != h) => r.failed_over = true,
                Some(_) => {}
            }
        }
        match a.status {
            200 => {}
            401 => {
                // The session is gone: everything in it is lost.
                r.errors.push(format!("session of client {id} lost (401)"));
                count_lost(&mut r, &model, killed, |_| true);
                model.clear();
                cookie = None;
                continue;
            }
            502..=504 => {
                r.in_doubt += 1;
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            s => {
                r.errors
                    .push(format!("add answered {s}: {}", a.body.trim()));
                continue;
            }
        }
        r.adds_acked += 1;
        model.push(Item {
            name,
            durable,
            acked: Instant::now(),
        });
        let items: Option<usize> = field(&a.body, "items").and_then(|v| v.parse().ok());
        if items == Some(model.len().min(CART_MAX)) {
            continue;
        }
        // Not what the model says: look at the whole cart.
        r.requests += 1;
        let cart = match http.call("GET", "/cart", Some(&c)) {
            Ok(a) if a.status == 200 => a.body,
            _ => continue,
        };
        let order: Vec<&str> = field(&cart, "cart")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .collect();
        let held: HashSet<&str> = order.iter().copied().collect();
        r.phantoms += held.iter().filter(|i| !ever.contains(**i)).count() as u64;
        let recent = model.len().saturating_sub(CART_MAX);
        count_lost(&mut r, &model[recent..], killed, |it| {
            !held.contains(it.name.as_str())
        });
        // The cart as it is now is the model from here on (adds that were
        // in doubt and did land join it).
        let mut known: std::collections::HashMap<String, Item> =
            model.drain(..).map(|it| (it.name.clone(), it)).collect();
        model = order
            .iter()
            .map(|name| {
                known.remove(*name).unwrap_or_else(|| Item {
                    name: (*name).to_string(),
                    durable: false,
                    acked: Instant::now(),
                })
            })
            .collect();
    }
    r
}

fn count_lost(
    r: &mut Report,
    items: &[Item],
    killed: Option<Instant>,
    lost: impl Fn(&Item) -> bool,
) {
    for it in items.iter().filter(|it| lost(it)) {
        if it.durable {
            r.lost_replicated += 1;
            continue;
        }
        r.lost_local += 1;
        match killed {
            Some(k) if it.acked <= k => {
                r.window_us = r.window_us.max((k - it.acked).as_micros() as u64);
            }
            _ => r.lost_after_kill += 1,
        }
    }
}

/// Runs `clients` clients until `stop`, each on a thread.
pub fn run_all(
    clients: usize,
    nginx: SocketAddr,
    stop: Arc<AtomicBool>,
    kill_at: Arc<std::sync::Mutex<Option<Instant>>>,
) -> std::thread::JoinHandle<Vec<Report>> {
    std::thread::spawn(move || {
        let handles: Vec<_> = (0..clients)
            .map(|id| {
                let (stop, kill_at) = (Arc::clone(&stop), Arc::clone(&kill_at));
                std::thread::spawn(move || run(id, nginx, &stop, &kill_at))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Report {
                    errors: vec!["a client thread panicked".into()],
                    ..Report::default()
                })
            })
            .collect()
    })
}
