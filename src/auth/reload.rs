//! Loading the token list, and keeping it current when it comes from a file: the file is checked
//! every [`POLL_INTERVAL`] (its stamp, `runtime::watch`: device, inode, size and modification
//! time, so a Kubernetes Secret's `..data` symlink swap counts) and re-read at once on SIGHUP. A list that does not parse is
//! logged and ignored: the previous one keeps serving.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{TokenPolicy, TokenSet, TokenSource};
use crate::runtime::periodic::Periodic;
use crate::runtime::published::Published;
use crate::runtime::watch;

/// How often the token file is checked. A removed token stops working within this, plus a read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The list at start-up: `None` in dev mode. The error names the entry, never a token.
pub fn initial(source: &TokenSource, policy: &TokenPolicy) -> Result<Option<TokenSet>, String> {
    match source {
        TokenSource::Dev => Ok(None),
        TokenSource::Inline(list) => {
            parse_non_empty(list, policy, None).map(Some).map_err(|e| format!("TENSOR_WASM_API_TOKENS: {e}"))
        }
        TokenSource::File(path) => read(path, policy, None).map(Some),
    }
}

fn read(path: &Path, policy: &TokenPolicy, previous: Option<&TokenSet>) -> Result<TokenSet, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    parse_non_empty(&text, policy, previous).map_err(|e| format!("token file {}: {e}", path.display()))
}

/// A configured list that names no token would lock every caller out: almost surely a mistake
/// (an empty Secret), so it is refused like a malformed one.
fn parse_non_empty(list: &str, policy: &TokenPolicy, previous: Option<&TokenSet>) -> Result<TokenSet, String> {
    let set = TokenSet::parse(list, policy, previous).map_err(|e| e.to_string())?;
    if set.is_empty() {
        return Err("the token list names no token".into());
    }
    Ok(set)
}

/// Watches `path` and publishes every list that parses, until its owner stops it. `hangup` is set
/// by the SIGHUP handler.
pub fn spawn_watcher(
    path: PathBuf,
    policy: TokenPolicy,
    published: Arc<Published<TokenSet>>,
    hangup: Arc<AtomicBool>,
) -> std::io::Result<Periodic> {
    let asked = move || hangup.swap(false, Ordering::AcqRel);
    let watched = vec![path.clone()];
    watch::spawn_poller("tw-tokens", POLL_INTERVAL, watched, asked, move |asked| {
        let previous = published.load().1;
        match read(&path, &policy, Some(&previous)) {
            Ok(set) => {
                tracing::info!(
                    tokens = set.len(),
                    reason = if asked { "SIGHUP" } else { "file changed" },
                    "token list reloaded"
                );
                published.publish(set);
            }
            Err(e) => tracing::error!("{e}; keeping the previous token list"),
        }
    })
}
