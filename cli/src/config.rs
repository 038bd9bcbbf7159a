//! Settings of `sessio node` and `sessio agent`: command-line flags and
//! TOML config files (`--config F`) from one struct per command.
//!
//! Each struct derives both `clap::Args` and `serde::Deserialize`, so a
//! setting is declared once: its flag, its file key (named like the flag,
//! with `_` for `-`), its help text and its default, which clap shows in
//! `--help` and takes from the library's constant. A flag given on the
//! command line wins over the file, and the file over the default. Every
//! key is optional in the file. Unknown keys are refused, so a typo is an
//! error that names it, never a silently ignored setting.
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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sessio_remote::node::{self, ExpiryRule};
use sessio_remote::placement::REPLICAS_DEFAULT;
use sessio_remote::replicator::FLUSH_INTERVAL_US_DEFAULT;

/// Largest config file read.
pub const CONFIG_BYTES_MAX: u64 = 1 << 20;
/// Threads of a node (`NodeConfig::new` serves on one).
pub const THREADS_DEFAULT: usize = 1;
/// A host's id when none is given.
pub const HOST_ID_DEFAULT: u64 = 1;
/// How often the agent prints its stats.
pub const STATS_INTERVAL_MS_DEFAULT: u64 = 5000;

/// Declares the settings of one command: the struct, with its `--config`
/// flag first, and its [`Default`] and [`Layered`] impls. The fields are
/// listed once, here, so the file keys, the flags and the layering of one
/// over the other cannot drift apart. Each field's name is its clap id.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $ty:ident {
            $($(#[$field_meta:meta])* pub $field:ident: $field_ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Args, Deserialize, Debug, Clone, PartialEq, Eq)]
        #[serde(deny_unknown_fields, default)]
        pub struct $ty {
            /// TOML file with any of these settings (keys named like the flags,
            /// `_` for `-`); flags win over the file.
            #[arg(long)]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $($(#[$field_meta])* pub $field: $field_ty,)*
        }

        impl Default for $ty {
            fn default() -> Self {
                defaults()
            }
        }

        impl Layered for $ty {
            fn config(&self) -> Option<&Path> {
                self.config.as_deref()
            }

            fn relative_to(&mut self, dir: &Path) {
                relative_to(&mut self.secret_file, dir);
            }

            fn over(self, file: Self, given: &Given<'_>) -> Self {
                $ty {
                    config: self.config,
                    $($field: given.pick(stringify!($field), self.$field, file.$field),)*
                }
            }
        }
    };
}

settings! {
    /// `sessio node` settings.
    pub struct NodeSettings {
        /// Address to listen on (port 0 picks one; the bound address is printed).
        #[arg(long)]
        pub listen: Option<SocketAddr>,
        /// This node's id in the bank (1-65535).
        #[arg(long)]
        pub node_id: Option<u16>,
        /// File holding the bank's 32-byte secret (raw, or 64 hex digits).
        #[arg(long)]
        pub secret_file: Option<PathBuf>,
        /// Most sessions held; more are refused.
        #[arg(long, default_value_t = node::SESSIONS_MAX_DEFAULT)]
        pub sessions_max: u64,
        /// Most record bytes held; more are refused.
        #[arg(long, default_value_t = node::BYTES_MAX_DEFAULT)]
        pub bytes_max: u64,
        /// Most open connections.
        #[arg(long, default_value_t = sessio_net::server::CONNECTIONS_MAX_DEFAULT)]
        pub connections_max: u32,
        /// Threads serving connections, sharing the port and the store (1-64).
        #[arg(long, default_value_t = THREADS_DEFAULT)]
        pub threads: usize,
        /// Drop a copy once its session's absolute expiry passed this long ago,
        /// in ms.
        #[arg(long, default_value_t = node::EXPIRY_GRACE_MS_DEFAULT)]
        pub expiry_grace_ms: u64,
        /// Drop a copy not written for this long, in ms (0: never); host reads
        /// do not reach the node, so keep it well above the longest idle TTL.
        #[arg(long, default_value_t = ExpiryRule::default().idle_max_ms)]
        pub copy_idle_max_ms: u64,
        /// Networks hosts may connect from, as CIDRs (repeat the flag or
        /// separate with commas); others are closed at accept. Default: any.
        #[arg(long, value_delimiter = ',')]
        pub allow: Vec<ipnet::IpNet>,
        /// Most connections in the handshake, per serving thread; a newer
        /// one evicts the oldest that has waited 20 ms.
        #[arg(long, default_value_t = sessio_net::server::HANDSHAKES_MAX_DEFAULT)]
        pub handshakes_max: u32,
        /// Most connections in the handshake from one address, per serving
        /// thread.
        #[arg(long, default_value_t = sessio_net::server::HANDSHAKES_PER_ADDR_MAX_DEFAULT)]
        pub handshakes_per_addr_max: u32,
        /// Use the epoll engine instead of `io_uring`.
        #[arg(long)]
        pub epoll: bool,
        /// Serve Prometheus text metrics on this address (GET /metrics).
        #[arg(long)]
        pub metrics_addr: Option<SocketAddr>,
    }
}

settings! {
    /// `sessio agent` settings.
    pub struct AgentSettings {
        /// Shared-memory arena name (or a path, with --file).
        #[arg(long)]
        pub arena: Option<String>,
        /// Treat --arena as a file path (file-backed arena).
        #[arg(long)]
        pub file: bool,
        /// The bank: id=ip:port,id=ip:port,... (in the file, also a list of
        /// "id=ip:port").
        #[arg(long)]
        pub nodes: Option<Nodes>,
        /// File holding the bank's 32-byte secret.
        #[arg(long)]
        pub secret_file: Option<PathBuf>,
        /// Copies kept per session.
        #[arg(long, default_value_t = REPLICAS_DEFAULT)]
        pub replicas: usize,
        /// This host's id.
        #[arg(long, default_value_t = HOST_ID_DEFAULT)]
        pub host_id: u64,
        /// How often dirty sessions are shipped, in microseconds.
        #[arg(long, default_value_t = FLUSH_INTERVAL_US_DEFAULT)]
        pub flush_interval_us: u64,
        /// A node that answers no batch for this long is taken as down, in ms.
        #[arg(long, default_value_t = sessio_remote::replicator::ACK_TIMEOUT_MS_DEFAULT)]
        pub ack_timeout_ms: u64,
        /// Use the epoll engine instead of `io_uring`.
        #[arg(long)]
        pub epoll: bool,
        /// Print stats this often, in ms (0: never).
        #[arg(long, default_value_t = STATS_INTERVAL_MS_DEFAULT)]
        pub stats_interval_ms: u64,
        /// Serve Prometheus text metrics on this address (GET /metrics).
        #[arg(long)]
        pub metrics_addr: Option<SocketAddr>,
    }
}

/// The bank: `--nodes id=ip:port,...`, or in a file that string or a list
/// of `"id=ip:port"`.
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

impl std::str::FromStr for Nodes {
    type Err = Infallible;

    /// The flag's form; `Placement::parse_members` checks it.
    fn from_str(s: &str) -> Result<Nodes, Infallible> {
        Ok(Nodes::One(s.to_string()))
    }
}

/// Settings the file holds: every key defaults to clap's default, so the
/// defaults are written once, on the flags.
fn defaults<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    T::from_arg_matches(&cmd.get_matches_from(["defaults"]))
        .expect("every setting is optional or has a default")
}

/// Settings that come from flags and a config file.
pub trait Layered: Sized + DeserializeOwned {
    /// The `--config` flag.
    fn config(&self) -> Option<&Path>;

    /// Makes relative paths of a file's settings relative to its `dir`.
    fn relative_to(&mut self, dir: &Path);

    /// Each setting from `self` (the flags) where `flags` says it was
    /// given on the command line, else from `file`.
    fn over(self, file: Self, flags: &Given<'_>) -> Self;

    /// The settings: the flags given in `matches` (those `self` was parsed
    /// from) over the `--config` file's keys over the defaults.
    fn resolve(self, matches: &ArgMatches) -> Result<Self, String> {
        let Some(path) = self.config() else {
            return Ok(self);
        };
        let file = load(path)?;
        Ok(self.over(file, &Given(matches)))
    }
}

/// Which settings were given on the command line.
pub struct Given<'a>(&'a ArgMatches);

impl Given<'_> {
    /// `flag` if the setting `id` (its field name) was given on the
    /// command line, else `file`.
    pub fn pick<T>(&self, id: &str, flag: T, file: T) -> T {
        if self.0.value_source(id) == Some(ValueSource::CommandLine) {
            flag
        } else {
            file
        }
    }
}

fn relative_to(p: &mut Option<PathBuf>, dir: &Path) {
    if let Some(p) = p.as_mut().filter(|p| p.is_relative()) {
        *p = dir.join(&*p);
    }
}

/// Reads and checks a config file. Errors name the file, and the line and
/// key at fault.
pub fn load<T: Layered>(path: &Path) -> Result<T, String> {
    let shown = path.display();
    let text = read_bounded(path).map_err(|e| format!("config {shown}: {e}"))?;
    let mut t: T = parse(&text).map_err(|e| format!("config {shown}: {e}"))?;
    if let Some(dir) = path.parent() {
        t.relative_to(dir);
    }
    Ok(t)
}

/// The text of a regular file of at most [`CONFIG_BYTES_MAX`] bytes. The
/// file is opened without blocking and checked on the open descriptor, so
/// a FIFO cannot hang the process and a device such as `/dev/zero` cannot
/// grow it without bound (the read itself stops at the limit too).
fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > CONFIG_BYTES_MAX {
        return Err(format!(
            "{} bytes, more than the {CONFIG_BYTES_MAX} read",
            meta.len()
        ));
    }
    let mut text = String::new();
    file.take(CONFIG_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > CONFIG_BYTES_MAX {
        return Err(format!("more than the {CONFIG_BYTES_MAX} bytes read"));
    }
    Ok(text)
}

/// Parses config text.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
}

/// The value of a required setting, or an error naming its flag and key.
pub fn required<T>(value: Option<T>, key: &str) -> Result<T, String> {
    value.ok_or_else(|| {
        format!(
            "--{} is required (or `{key}` in the --config file)",
            key.replace('_', "-")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `sessio node ARGS` as parsed, with its matches.
    #[derive(clap::Parser, Debug)]
    struct Node {
        #[command(flatten)]
        s: NodeSettings,
    }

    fn flags(args: &[&str]) -> (NodeSettings, ArgMatches) {
        let m =
            Node::command().get_matches_from(std::iter::once("node").chain(args.iter().copied()));
        (Node::from_arg_matches(&m).unwrap().s, m)
    }

    #[test]
    fn node_file_parses_and_names_bad_fields() {
        let f: NodeSettings =
            parse("listen = \"127.0.0.1:7700\"\nnode_id = 3\nsessions_max = 1_000\n").unwrap();
        assert_eq!(f.node_id, Some(3));
        assert_eq!(f.sessions_max, 1000);
        assert_eq!(f.listen, Some("127.0.0.1:7700".parse().unwrap()));
        assert_eq!(
            f.bytes_max,
            node::BYTES_MAX_DEFAULT,
            "a missing key is the default"
        );

        let e = parse::<NodeSettings>("node_id = 3\nnod_id = 4\n").unwrap_err();
        assert!(e.contains("nod_id") && e.contains("line 2"), "{e}");
        let e = parse::<NodeSettings>("node_id = \"three\"\n").unwrap_err();
        assert!(e.contains("node_id") && e.contains("u16"), "{e}");
        let e = parse::<NodeSettings>("node_id = 70000\n").unwrap_err();
        assert!(e.contains("node_id"), "{e}");
        let e = parse::<NodeSettings>("listen = \"nowhere\"\n").unwrap_err();
        assert!(e.contains("listen") && e.contains("address"), "{e}");
        let e = parse::<NodeSettings>("config = \"other.toml\"\n").unwrap_err();
        assert!(e.contains("config"), "no --config in a config file: {e}");
    }

    #[test]
    fn agent_nodes_take_both_forms() {
        let a: AgentSettings = parse("nodes = \"1=127.0.0.1:1,2=127.0.0.1:2\"\n").unwrap();
        assert_eq!(a.nodes.unwrap().joined(), "1=127.0.0.1:1,2=127.0.0.1:2");
        let a: AgentSettings = parse("nodes = [\"1=127.0.0.1:1\", \"2=127.0.0.1:2\"]\n").unwrap();
        assert_eq!(a.nodes.unwrap().joined(), "1=127.0.0.1:1,2=127.0.0.1:2");
        let e = parse::<AgentSettings>("nodes = 5\n").unwrap_err();
        assert!(e.contains("nodes") && e.contains("id=ip:port"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file_over_the_defaults() {
        let file: NodeSettings =
            parse("node_id = 2\nsessions_max = 7\nthreads = 3\nepoll = true\n").unwrap();
        let (given, m) = flags(&["--node-id", "1", "--threads", "4"]);
        let s = given.over(file, &Given(&m));
        assert_eq!(s.node_id, Some(1));
        assert_eq!(s.threads, 4);
        assert_eq!(s.sessions_max, 7, "the file wins over a default");
        assert!(s.epoll);
        assert_eq!(s.bytes_max, node::BYTES_MAX_DEFAULT);
        assert_eq!(s.listen, None);

        // A flag equal to its default still wins.
        let (given, m) = flags(&["--sessions-max", &node::SESSIONS_MAX_DEFAULT.to_string()]);
        let s = given.over(parse("sessions_max = 7\n").unwrap(), &Given(&m));
        assert_eq!(s.sessions_max, node::SESSIONS_MAX_DEFAULT);
    }

    #[test]
    fn defaults_are_the_library_constants() {
        let (s, _) = flags(&[]);
        assert_eq!(s, NodeSettings::default());
        assert_eq!(s.sessions_max, node::SESSIONS_MAX_DEFAULT);
        assert_eq!(
            s.connections_max,
            sessio_net::server::CONNECTIONS_MAX_DEFAULT
        );
        assert_eq!(s.expiry_grace_ms, ExpiryRule::default().grace_ms);
        assert_eq!(
            AgentSettings::default().flush_interval_us,
            FLUSH_INTERVAL_US_DEFAULT
        );
        let help = Node::command().render_long_help().to_string();
        assert!(
            help.contains(&format!("[default: {}]", node::BYTES_MAX_DEFAULT)),
            "{help}"
        );
    }

    #[test]
    fn missing_settings_are_named() {
        assert_eq!(required(Some(1), "node_id"), Ok(1));
        let e = required::<u16>(None, "node_id").unwrap_err();
        assert!(e.contains("--node-id") && e.contains("`node_id`"), "{e}");
    }

    #[test]
    fn secret_file_is_relative_to_the_config() {
        let mut f: NodeSettings = parse("secret_file = \"bank.key\"\n").unwrap();
        f.relative_to(Path::new("/etc/sessio"));
        assert_eq!(f.secret_file.unwrap(), Path::new("/etc/sessio/bank.key"));
    }
}
