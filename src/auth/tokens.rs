//! The token list: its grammar, the keyed `token_id`, and constant-time lookup.
//!
//! `TENSOR_WASM_API_TOKENS` (or the file named by `TENSOR_WASM_API_TOKENS_FILE`) is a list of
//! entries separated by commas (or newlines in a file):
//!
//! ```text
//! ADMIN_TOKEN:tenant=*,SVC7_TOKEN:tenant=7,FLEET_TOKEN:tenant=1,2,3
//! ```
//!
//! Tenant ids are comma-separated too, so a bare number continues the entry before it: above,
//! `FLEET_TOKEN` may act for tenants 1, 2 and 3. Errors name the entry's position and never echo a
//! token.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::rate_limit::{GlobalBucket, RateLimit};
use crate::metrics::Counter;
use crate::runtime::padded::CachePadded;

/// How token entries are built: the `token_id` key, the rate limit, and the number of shards
/// (each shard counts into its own slot).
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    pub token_id_key: Vec<u8>,
    pub rate_limit: Option<RateLimit>,
    pub shards: usize,
}

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 512;

/// The tenants a token may act for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Wildcard,
    Tenants(BTreeSet<u64>),
}

impl Scope {
    pub fn allows(&self, tenant: u64) -> bool {
        match self {
            Scope::Wildcard => true,
            Scope::Tenants(set) => set.contains(&tenant),
        }
    }
}

/// One configured token. The secret never leaves this struct.
pub struct TokenEntry {
    secret: Box<[u8]>,
    /// A keyed hash of the token: what logs, metrics and the audit log carry.
    pub id: String,
    pub scope: Scope,
    /// The token's rate-limit bucket, shared by every shard; `None` without a rate limit.
    pub bucket: Option<GlobalBucket>,
    /// Requests admitted and refused for the rate, one slot per shard, each written only by its
    /// shard and on cache lines of its own: 128 bytes per token and shard, so that shards admitting
    /// the same token never write to one line.
    pub counts: Box<[CachePadded<RateCounts>]>,
}

/// One shard's counts of a token's requests.
#[derive(Default)]
pub struct RateCounts {
    pub admitted: Counter,
    pub limited: Counter,
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEntry").field("id", &self.id).field("scope", &self.scope).finish_non_exhaustive()
    }
}

/// A parsed token list.
#[derive(Debug, Default)]
pub struct TokenSet {
    by_digest: HashMap<[u8; 32], Arc<TokenEntry>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct TokenListError {
    /// 1-based position of the entry in the list.
    pub entry: usize,
    pub reason: &'static str,
}

impl fmt::Display for TokenListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token list entry {}: {}", self.entry, self.reason)
    }
}

impl TokenSet {
    /// Parses a token list. Entries of `previous` whose token and scope are unchanged are kept as
    /// they are, with their rate-limit state and counters: a reload does not reset them.
    pub fn parse(list: &str, policy: &TokenPolicy, previous: Option<&TokenSet>) -> Result<TokenSet, TokenListError> {
        let mut entries: Vec<(String, Scope)> = Vec::new();
        let pieces = list.split([',', '\n']).map(str::trim).filter(|p| !p.is_empty());
        for piece in pieces {
            let position = entries.len() + 1;
            let err = |reason| TokenListError { entry: position, reason };
            if let Some((token, scope)) = piece.split_once(':') {
                let token = token.trim();
                if token.len() < MIN_TOKEN_LEN {
                    return Err(err("the token is shorter than 16 characters"));
                }
                if token.len() > MAX_TOKEN_LEN {
                    return Err(err("the token is longer than 512 characters"));
                }
                if !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(err("the token has characters other than visible ASCII"));
                }
                let spec = scope
                    .trim()
                    .strip_prefix("tenant=")
                    .ok_or(err("expected `TOKEN:tenant=*` or `TOKEN:tenant=ID[,ID…]`"))?;
                let scope = match spec.trim() {
                    "*" => Scope::Wildcard,
                    id => Scope::Tenants(BTreeSet::from([id.parse().map_err(|_| err("a tenant id is not a u64"))?])),
                };
                if entries.iter().any(|(t, _)| t == token) {
                    return Err(err("the token appears twice"));
                }
                entries.push((token.to_string(), scope));
            } else {
                // A bare tenant id continues the previous entry.
                let entry = entries.len();
                let id: u64 = piece.parse().map_err(|_| TokenListError {
                    entry: entry + 1,
                    reason: "expected `TOKEN:tenant=…`, or a tenant id continuing the entry before",
                })?;
                match entries.last_mut() {
                    Some((_, Scope::Tenants(set))) => {
                        set.insert(id);
                    }
                    Some((_, Scope::Wildcard)) => {
                        return Err(TokenListError { entry, reason: "a tenant id follows a wildcard scope" });
                    }
                    None => return Err(TokenListError { entry: 1, reason: "the list starts with a bare tenant id" }),
                }
            }
        }
        let by_digest = entries
            .into_iter()
            .map(|(token, scope)| {
                let digest = lookup_key(token.as_bytes());
                let kept = previous.and_then(|p| p.by_digest.get(&digest)).filter(|e| e.scope == scope);
                let entry = match kept {
                    Some(e) => e.clone(),
                    None => Arc::new(TokenEntry {
                        id: token_id(&policy.token_id_key, token.as_bytes()),
                        secret: token.into_bytes().into(),
                        scope,
                        bucket: policy.rate_limit.map(GlobalBucket::new),
                        counts: (0..policy.shards).map(|_| CachePadded::default()).collect(),
                    }),
                };
                (digest, entry)
            })
            .collect();
        Ok(TokenSet { by_digest })
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Every entry, keyed by the SHA-256 of its token.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8; 32], &Arc<TokenEntry>)> {
        self.by_digest.iter()
    }

    /// The entry for `presented`, if any. The lookup goes by the SHA-256 of the presented token,
    /// and the final comparison is constant-time, so timing reveals nothing about a token's bytes.
    pub fn find(&self, presented: &[u8]) -> Option<&Arc<TokenEntry>> {
        self.by_digest.get(&lookup_key(presented)).filter(|e| e.matches(presented))
    }
}

/// The key under which [`TokenSet::entries`] are stored.
pub fn lookup_key(presented: &[u8]) -> [u8; 32] {
    Sha256::digest(presented).into()
}

impl TokenEntry {
    /// Requests admitted and refused for the rate, summed over the shards.
    pub fn totals(&self) -> (u64, u64) {
        self.counts
            .iter()
            .fold((0, 0), |(admitted, limited), c| (admitted + c.admitted.get(), limited + c.limited.get()))
    }

    /// Whether `presented` is this token, in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&self.secret, presented)
    }
}

/// `token_id`: HMAC-SHA-256 of the token under `key`, first 64 bits, hex. Stable across restarts
/// and replicas that share the key.
pub fn token_id(key: &[u8], token: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(token);
    let first: [u8; 8] = mac.finalize().into_bytes()[..8].try_into().expect("SHA-256 has 32 bytes");
    format!("{:016x}", u64::from_be_bytes(first))
}

/// Equality whose running time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(key: &str) -> TokenPolicy {
        TokenPolicy { token_id_key: key.as_bytes().to_vec(), rate_limit: None, shards: 2 }
    }

    const A: &str = "aaaaaaaaaaaaaaaa-admin";
    const B: &str = "bbbbbbbbbbbbbbbb-svc7";
    const C: &str = "cccccccccccccccc-fleet";

    #[test]
    fn parses_the_grammar() {
        let list = format!("{A}:tenant=*, {B}:tenant=7,{C}:tenant=1,2, 3\n");
        let set = TokenSet::parse(&list, &policy("k"), None).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.find(A.as_bytes()).unwrap().scope, Scope::Wildcard);
        assert_eq!(set.find(B.as_bytes()).unwrap().scope, Scope::Tenants(BTreeSet::from([7])));
        assert_eq!(set.find(C.as_bytes()).unwrap().scope, Scope::Tenants(BTreeSet::from([1, 2, 3])));
        assert!(set.find(b"aaaaaaaaaaaaaaaa-admiN").is_none());
        assert!(set.find(b"").is_none());
        assert!(TokenSet::parse("", &policy("k"), None).unwrap().is_empty());
        // A reload keeps unchanged entries (and their state), and replaces changed ones.
        let again = TokenSet::parse(&format!("{A}:tenant=*,{B}:tenant=8"), &policy("k"), Some(&set)).unwrap();
        assert!(Arc::ptr_eq(again.find(A.as_bytes()).unwrap(), set.find(A.as_bytes()).unwrap()));
        assert!(!Arc::ptr_eq(again.find(B.as_bytes()).unwrap(), set.find(B.as_bytes()).unwrap()));
    }

    #[test]
    fn errors_name_the_entry_and_never_the_token() {
        let cases = [
            (format!("{A}:tenant=*,t1ny:tenant=1"), 2),
            (format!("{A}:tenant=*,{B}:tenants=1"), 2),
            (format!("{A}:tenant=x"), 1),
            (format!("{A}:tenant=*,4"), 1),
            ("5".to_string(), 1),
            (format!("{A}:tenant=1,{A}:tenant=2"), 2),
            (format!("{A}:tenant=1,{B}:tenant=2,x"), 3),
        ];
        for (list, entry) in cases {
            let e = TokenSet::parse(&list, &policy("k"), None).unwrap_err();
            assert_eq!(e.entry, entry, "{list}: {e}");
            let text = e.to_string();
            for secret in [A, B, "t1ny"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    #[test]
    fn token_ids_are_keyed_and_stable() {
        assert_eq!(token_id(b"k1", A.as_bytes()), token_id(b"k1", A.as_bytes()));
        assert_ne!(token_id(b"k1", A.as_bytes()), token_id(b"k2", A.as_bytes()));
        assert_eq!(token_id(b"k1", A.as_bytes()).len(), 16);
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"a", b"ab")
        );
    }
}
