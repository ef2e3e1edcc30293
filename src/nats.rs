//! The fleet's NATS connection, as every client of it opens one: the registry's client thread
//! (`functions::registry`) and the limiter's share thread (`auth::fleet`). Each runs on its own
//! thread, never a shard's.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The fleet's NATS, as `--registry nats://…` and its flags give it (`config::RegistryConfig`
/// parses them). Here rather than in `config`, which names this type: both NATS clients take it,
/// and `auth` (the limiter's) must not name `config`, which names `auth`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsConfig {
    /// `nats://host:port` or `tls://host:port`, one or more.
    pub servers: Vec<String>,
    /// A NATS credentials file (JWT and NKey seed), `--registry-creds`.
    pub creds: Option<PathBuf>,
    /// How long a deploy or delete waits for JetStream's acknowledgement.
    pub timeout: Duration,
    /// The bytes the object store may hold: modules and tensor files of every tenant.
    pub max_object_bytes: u64,
    /// JetStream replicas of the bucket and the store, set when this replica creates them: 3 for a
    /// NATS cluster that must survive a node, 1 for a single server.
    pub replicas: usize,
    /// A change that reaches this replica later than this after JetStream stored it is counted
    /// (`tensor_wasm_registry_late_changes_total`) and logged.
    pub propagation: Duration,
    /// How often a replica checks that the object store holds its functions' files, storing
    /// again what it lost.
    pub repair_interval: Duration,
}

/// How often a client pings NATS; two unanswered pings drop the connection.
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// A connection, and a flag set at any disconnection, however short: whoever holds it ends its
/// session then and connects again (state kept on the server, a watch's consumer or a
/// subscription, may be gone after a reconnect).
pub struct Connection {
    pub client: async_nats::Client,
    dropped: Arc<AtomicBool>,
}

impl Connection {
    /// Connects as `name`, with `--registry-creds` and `--registry-timeout-ms`.
    pub async fn open(config: &NatsConfig, name: &str) -> Result<Connection, String> {
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(config.timeout)
            .request_timeout(Some(config.timeout));
        if let Some(creds) = &config.creds {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| format!("cannot read --registry-creds {}: {e}", creds.display()))?;
        }
        // A dead server is noticed within a few pings (async-nats gives up after two missed):
        // the default interval of a minute would leave a hung NATS looking healthy that long.
        // One attempt to reconnect, then the client closes: a session ends at any disconnection
        // and a new one connects, so an abandoned client must not hold commands queued to send
        // whenever NATS returns (a change answered 503 would land then).
        options = options.ping_interval(PING_INTERVAL).max_reconnects(1);
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        options = options.event_callback(move |event| {
            if matches!(event, async_nats::Event::Disconnected) {
                flag.store(true, Ordering::Relaxed);
            }
            std::future::ready(())
        });
        let client = options.connect(config.servers.clone()).await.map_err(|e| format!("connect: {e}"))?;
        Ok(Connection { client, dropped })
    }

    /// Whether the connection is down now, or dropped at any moment since it was opened.
    pub fn is_down(&self) -> bool {
        self.client.connection_state() != async_nats::connection::State::Connected
            || self.dropped.load(Ordering::Relaxed)
    }
}

/// The servers as logs may show them: without a `user:password@` or token.
pub fn redacted(servers: &[String]) -> Vec<String> {
    servers
        .iter()
        .map(|s| match (s.split_once("://"), s.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
            _ => s.clone(),
        })
        .collect()
}
