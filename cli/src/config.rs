//! TOML config files for `sessio node` and `sessio agent` (`--config F`).
//!
//! Every key is optional and named like its command-line flag, with `_`
//! for `-`; a flag given on the command line wins over the file. Unknown
//! keys are refused, so a typo is an error that names it, never a silently
//! ignored setting.
//!
//! ```toml
//! # node.toml
//! listen = "10.0.0.5:7700"
//! node_id = 3
//! secret_file = "bank.key"
//! sessions_max = 5_000_000
//! metrics_addr = "127.0.0.1:9700"
//! ```
//!
//! ```toml
//! # agent.toml
//! arena = "shop"
//! nodes = ["1=10.0.0.5:7700", "2=10.0.0.6:7700", "3=10.0.0.7:7700"]
//! secret_file = "bank.key"
//! host_id = 12
//! flush_interval_us = 500
//! ```
//!
//! A relative `secret_file` is taken relative to the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Largest config file read.
pub const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// `sessio node` settings from a file.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Address to listen on.
    pub listen: Option<SocketAddr>,
    /// This node's id in the bank (1-65535).
    pub node_id: Option<u16>,
    /// File holding the bank's secret.
    pub secret_file: Option<PathBuf>,
    /// Most sessions held.
    pub sessions_max: Option<u64>,
    /// Most record bytes held.
    pub bytes_max: Option<u64>,
    /// Most open connections.
    pub connections_max: Option<u32>,
    /// Threads serving connections.
    pub threads: Option<usize>,
    /// Copies past their session's absolute expiry by this long are dropped.
    pub expiry_grace_ms: Option<u64>,
    /// Copies not written for this long are dropped (0: never).
    pub copy_idle_max_ms: Option<u64>,
    /// Use the epoll engine instead of `io_uring`.
    pub epoll: Option<bool>,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
}

/// `sessio agent` settings from a file.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Shared-memory arena name (or a path, with `file = true`).
    pub arena: Option<String>,
    /// Treat `arena` as a file path.
    pub file: Option<bool>,
    /// The bank: `"id=ip:port,..."` or a list of `"id=ip:port"`.
    pub nodes: Option<Nodes>,
    /// File holding the bank's secret.
    pub secret_file: Option<PathBuf>,
    /// Copies kept per session.
    pub replicas: Option<usize>,
    /// This host's id.
    pub host_id: Option<u64>,
    /// How often dirty sessions are shipped, in microseconds.
    pub flush_interval_us: Option<u64>,
    /// Use the epoll engine instead of `io_uring`.
    pub epoll: Option<bool>,
    /// Print stats this often, in ms (0: never).
    pub stats_interval_ms: Option<u64>,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
}

/// The bank as written in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a string \"id=ip:port,...\" or a list of \"id=ip:port\""
)]
pub enum Nodes {
    /// `"1=10.0.0.5:7700,2=10.0.0.6:7700"`.
    One(String),
    /// `["1=10.0.0.5:7700", "2=10.0.0.6:7700"]`.
    List(Vec<String>),
}

impl Nodes {
    /// The `--nodes` form: `id=ip:port,...`.
    pub fn joined(&self) -> String {
        match self {
            Nodes::One(s) => s.clone(),
            Nodes::List(v) => v.join(","),
        }
    }
}

/// Settings whose paths can be relative to the config file.
pub trait Relative {
    /// Makes relative paths relative to `dir`.
    fn relative_to(&mut self, dir: &Path);
}

impl Relative for NodeFile {
    fn relative_to(&mut self, dir: &Path) {
        if let Some(p) = self.secret_file.as_mut().filter(|p| p.is_relative()) {
            *p = dir.join(&*p);
        }
    }
}

impl Relative for AgentFile {
    fn relative_to(&mut self, dir: &Path) {
        if let Some(p) = self.secret_file.as_mut().filter(|p| p.is_relative()) {
            *p = dir.join(&*p);
        }
    }
}

/// Reads and checks a config file. Errors name the file, and the line and
/// key at fault.
pub fn load<T: DeserializeOwned + Relative>(path: &Path) -> Result<T, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("config {shown}: {e}"))?;
    if meta.len() > CONFIG_BYTES_MAX {
        return Err(format!(
            "config {shown}: {} bytes, more than the {CONFIG_BYTES_MAX} read",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("config {shown}: {e}"))?;
    let mut t: T = parse(&text).map_err(|e| format!("config {shown}: {e}"))?;
    if let Some(dir) = path.parent() {
        t.relative_to(dir);
    }
    Ok(t)
}

/// Parses config text.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
}

/// The value of a required setting: the flag, else the file's key.
pub fn required<T>(flag: Option<T>, file: Option<T>, key: &str) -> Result<T, String> {
    flag.or(file).ok_or_else(|| {
        format!(
            "--{} is required (or `{key}` in the --config file)",
            key.replace('_', "-")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_parses_and_names_bad_fields() {
        let f: NodeFile =
            parse("listen = \"127.0.0.1:7700\"\nnode_id = 3\nsessions_max = 1_000\n").unwrap();
        assert_eq!(f.node_id, Some(3));
        assert_eq!(f.sessions_max, Some(1000));
        assert_eq!(f.listen, Some("127.0.0.1:7700".parse().unwrap()));

        let e = parse::<NodeFile>("node_id = 3\nnod_id = 4\n").unwrap_err();
        assert!(e.contains("nod_id") && e.contains("line 2"), "{e}");
        let e = parse::<NodeFile>("node_id = \"three\"\n").unwrap_err();
        assert!(e.contains("node_id") && e.contains("u16"), "{e}");
        let e = parse::<NodeFile>("node_id = 70000\n").unwrap_err();
        assert!(e.contains("node_id"), "{e}");
        let e = parse::<NodeFile>("listen = \"nowhere\"\n").unwrap_err();
        assert!(e.contains("listen") && e.contains("address"), "{e}");
    }

    #[test]
    fn agent_nodes_take_both_forms() {
        let a: AgentFile = parse("nodes = \"1=127.0.0.1:1,2=127.0.0.1:2\"\n").unwrap();
        assert_eq!(a.nodes.unwrap().joined(), "1=127.0.0.1:1,2=127.0.0.1:2");
        let a: AgentFile = parse("nodes = [\"1=127.0.0.1:1\", \"2=127.0.0.1:2\"]\n").unwrap();
        assert_eq!(a.nodes.unwrap().joined(), "1=127.0.0.1:1,2=127.0.0.1:2");
        let e = parse::<AgentFile>("nodes = 5\n").unwrap_err();
        assert!(e.contains("nodes") && e.contains("id=ip:port"), "{e}");
    }

    #[test]
    fn flags_win_and_missing_settings_are_named() {
        assert_eq!(required(Some(1), Some(2), "node_id"), Ok(1));
        assert_eq!(required(None, Some(2), "node_id"), Ok(2));
        let e = required::<u16>(None, None, "node_id").unwrap_err();
        assert!(e.contains("--node-id") && e.contains("`node_id`"), "{e}");
    }

    #[test]
    fn secret_file_is_relative_to_the_config() {
        let mut f: NodeFile = parse("secret_file = \"bank.key\"\n").unwrap();
        f.relative_to(Path::new("/etc/sessio"));
        assert_eq!(f.secret_file.unwrap(), Path::new("/etc/sessio/bank.key"));
    }
}
