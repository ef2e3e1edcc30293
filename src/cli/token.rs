//! `tensor-wasm token generate`: a fresh bearer token and its `TENSOR_WASM_API_TOKENS` entry.

use clap::Args;

use crate::auth::tokens::token_id;
use crate::functions::record::hex;

#[derive(Args)]
pub struct GenerateArgs {
    /// The tenants the token may act for (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', required_unless_present = "all_tenants", conflicts_with = "all_tenants")]
    pub tenant: Vec<u64>,
    /// Let the token act for every tenant (`tenant=*`): for administrators only.
    #[arg(long)]
    pub all_tenants: bool,
    /// The key of `token_id`, to print the id the logs and audit records will show.
    #[arg(long, env = "TENSOR_WASM_API_TOKEN_ID_KEY", hide_env_values = true)]
    pub token_id_key: Option<String>,
}

/// Prints 256 random bits as 64 hex digits, the list entry, and the token's id.
pub fn generate(args: GenerateArgs) -> i32 {
    let mut bytes = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut bytes) {
        eprintln!("error: the OS random source failed: {e}");
        return 1;
    }
    let token = hex(&bytes);
    let scope = if args.all_tenants {
        "*".to_string()
    } else {
        args.tenant.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    };
    let key = args.token_id_key.unwrap_or_else(|| DEFAULT_TOKEN_ID_KEY.to_string());
    println!("token:    {token}");
    println!("entry:    {token}:tenant={scope}");
    println!("token_id: {}", token_id(key.as_bytes(), token.as_bytes()));
    eprintln!("Store the token in your secret manager now; the server keeps only its hash.");
    0
}

/// The `token_id` key when none is configured: ids are then stable, but anyone can compute them.
pub(crate) const DEFAULT_TOKEN_ID_KEY: &str = "tensor-wasm/token-id/v1";

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Print a new 256-bit token, its `TENSOR_WASM_API_TOKENS` entry and its token_id.
    Generate(GenerateArgs),
}
