//! `sessio fetch SID`: what the bank holds of one session, asked of every
//! node, read-only: nothing is installed, no owner is fenced. For an
//! operator who wants to know whether a session survived, and where.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use sessio_engine::Sid;
use sessio_net::{Backend, Client, ClientConfig, Epoll, Fetch, Identity, IoUring, Message};
use sessio_remote::placement::{Placement, REPLICAS_DEFAULT};

/// The handshake id this tool introduces itself with (not a host's).
const OPERATOR_ID: u64 = u64::MAX - 1;

/// Arguments of `sessio fetch`.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    /// The session (32 hex digits).
    pub sid: String,
    /// The bank: id=ip:port,id=ip:port,...
    #[arg(long)]
    pub nodes: String,
    /// File holding the bank's 32-byte secret.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Copies kept per session (to say which nodes own it).
    #[arg(long, default_value_t = REPLICAS_DEFAULT)]
    pub replicas: usize,
    /// Time allowed per node, in ms.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Use the epoll engine instead of `io_uring`.
    #[arg(long)]
    pub epoll: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// One node's answer.
enum Answer {
    Copy {
        version: u64,
        epoch: u64,
        bytes: usize,
    },
    None,
    Failed(String),
}

pub fn run(a: &FetchArgs) -> Result<String, String> {
    let sid: Sid = a
        .sid
        .parse()
        .map_err(|_| format!("bad SID {:?}: expected 32 hex digits", a.sid))?;
    let members = Placement::parse_members(&a.nodes).map_err(|e| e.to_string())?;
    let placement = Placement::new(members, a.replicas).map_err(|e| e.to_string())?;
    let secret = sessio_net::Secret::from_file(&a.secret_file).map_err(|e| e.to_string())?;
    let answers = if a.epoll || !IoUring::available() {
        ask::<Epoll>(&placement, sid, &secret, a.timeout_ms)
    } else {
        ask::<IoUring>(&placement, sid, &secret, a.timeout_ms)
    }?;
    let owners = placement.owners(&sid.0);
    if a.json {
        let nodes: Vec<_> = placement
            .members()
            .iter()
            .zip(&answers)
            .map(|(m, ans)| {
                let mut v = json!({
                    "node": m.id,
                    "addr": m.addr.to_string(),
                    "owner": owners.contains(&m.id),
                });
                match ans {
                    Answer::Copy {
                        version,
                        epoch,
                        bytes,
                    } => {
                        v["version"] = json!(version);
                        v["epoch"] = json!(epoch);
                        v["bytes"] = json!(bytes);
                    }
                    Answer::None => v["found"] = json!(false),
                    Answer::Failed(e) => v["error"] = json!(e),
                }
                v
            })
            .collect();
        return Ok(format!(
            "{:#}\n",
            json!({ "sid": sid.to_string(), "nodes": nodes })
        ));
    }
    let mut out = format!("session {sid}: owners {owners:?}\n");
    for (m, ans) in placement.members().iter().zip(&answers) {
        let role = if owners.contains(&m.id) {
            "owner"
        } else {
            "other"
        };
        let what = match ans {
            Answer::Copy {
                version,
                epoch,
                bytes,
            } => format!("version {version}  epoch {epoch}  {bytes} bytes"),
            Answer::None => "no copy".to_string(),
            Answer::Failed(e) => format!("no answer: {e}"),
        };
        let _ = writeln!(out, "node {} ({}, {role}): {what}", m.id, m.addr);
    }
    Ok(out)
}

/// Asks every node of the bank, one after another.
fn ask<B: Backend>(
    placement: &Placement,
    sid: Sid,
    secret: &sessio_net::Secret,
    timeout_ms: u64,
) -> Result<Vec<Answer>, String> {
    let rt = B::runtime().map_err(|e| format!("no I/O runtime: {e}"))?;
    let identity = Identity::with_random_incarnation(OPERATOR_ID).map_err(|e| e.to_string())?;
    let mut cc = ClientConfig::new(identity);
    cc.handshake_timeout_ms = timeout_ms;
    cc.io_timeout_ms = timeout_ms;
    let limit = Duration::from_millis(timeout_ms.saturating_mul(2));
    Ok(placement
        .members()
        .iter()
        .map(|m| {
            B::run(&rt, async {
                let attempt = async {
                    let mut c = Client::<B>::connect(m.addr, cc.clone(), secret.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    if c.peer().identity.id != u64::from(m.id) {
                        return Err(format!(
                            "the node there proved id {}, not {}",
                            c.peer().identity.id,
                            m.id
                        ));
                    }
                    c.call(&Message::Fetch(Fetch {
                        request_id: 1,
                        sid: sid.0,
                    }))
                    .await
                    .map_err(|e| e.to_string())
                };
                match B::timeout(limit, attempt).await {
                    Ok(Ok(Message::FetchReply(r))) => match r.found {
                        Some(f) => Answer::Copy {
                            version: f.version,
                            epoch: f.epoch,
                            bytes: f.record.len(),
                        },
                        None => Answer::None,
                    },
                    Ok(Ok(other)) => Answer::Failed(format!("unexpected {:?}", other.kind())),
                    Ok(Err(e)) => Answer::Failed(e),
                    Err(_) => Answer::Failed(format!("no answer within {limit:?}")),
                }
            })
        })
        .collect())
}
