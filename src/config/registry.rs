//! `--registry`: where the catalog lives (functions::registry uses it).

use std::path::PathBuf;
use std::time::Duration;

pub use crate::nats::NatsConfig;

/// Where the catalog lives: the data dir alone, or a NATS JetStream shared by the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum RegistryConfig {
    #[default]
    File,
    Nats(NatsConfig),
}

impl RegistryConfig {
    /// Parses `--registry`: `file`, or a comma-separated list of `nats://` or `tls://` URLs.
    pub fn parse(
        text: &str,
        creds: Option<PathBuf>,
        (timeout, propagation, repair_interval): (Duration, Duration, Duration),
        (max_object_bytes, replicas): (u64, usize),
    ) -> Result<RegistryConfig, String> {
        let text = text.trim();
        if text == "file" {
            if creds.is_some() {
                return Err("--registry-creds needs --registry nats://…".into());
            }
            return Ok(RegistryConfig::File);
        }
        let servers: Vec<String> = text.split(',').map(|s| s.trim().to_string()).collect();
        for server in &servers {
            let rest = server.strip_prefix("nats://").or_else(|| server.strip_prefix("tls://"));
            match rest {
                Some(hostport)
                    if hostport.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) => {}
                _ => {
                    return Err(format!(
                        "--registry: `{server}` is not `file` or nats://HOST:PORT (or tls://HOST:PORT)"
                    ))
                }
            }
        }
        // Read at every connect: a missing one would fail each of them, for ever, with the replica
        // listening but never in step.
        if let Some(creds) = &creds {
            std::fs::metadata(creds).map_err(|e| format!("--registry-creds {}: {e}", creds.display())).and_then(
                |m| {
                    if m.is_file() {
                        Ok(())
                    } else {
                        Err(format!("--registry-creds {} is not a file", creds.display()))
                    }
                },
            )?;
        }
        if !(1..=5).contains(&replicas) {
            return Err(format!("--registry-replicas must be 1 to 5 (JetStream's limit), not {replicas}"));
        }
        Ok(RegistryConfig::Nats(NatsConfig {
            servers,
            creds,
            timeout,
            max_object_bytes,
            replicas,
            propagation,
            repair_interval,
        }))
    }
}
