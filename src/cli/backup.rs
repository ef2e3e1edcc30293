//! `tensor-wasm backup` and `restore`: the command line of `crate::backup`.

use std::path::PathBuf;

use crate::audit::parse_destination;

#[derive(clap::Args)]
pub struct BackupArgs {
    /// The backup directory.
    pub dir: PathBuf,
    /// The server's data dir.
    #[arg(long, env = "TENSOR_WASM_DATA_DIR", default_value = "./tensor-wasm-data")]
    pub data_dir: PathBuf,
    /// The server's audit log setting (`file:/path`; default `file:<data dir>/audit`).
    #[arg(long, env = "TENSOR_WASM_API_AUDIT_LOG")]
    pub audit_log: Option<String>,
}

impl BackupArgs {
    fn audit_dir(&self) -> Result<Option<PathBuf>, String> {
        match &self.audit_log {
            None => Ok(Some(self.data_dir.join("audit"))),
            Some(spec) => {
                parse_destination(spec).map(|(dir, _)| dir).map_err(|e| format!("TENSOR_WASM_API_AUDIT_LOG: {e}"))
            }
        }
    }
}

/// `backup`, or `restore` with `restore`.
pub fn run(args: BackupArgs, restore: bool) -> i32 {
    let result = args.audit_dir().and_then(|audit| {
        // Without an audit directory there is none to copy: an empty path lists nothing.
        let audit = audit.unwrap_or_default();
        if restore {
            crate::backup::restore(&args.dir, &args.data_dir, &audit)
        } else {
            crate::backup::backup(&args.data_dir, &audit, &args.dir)
        }
    });
    match result {
        Ok(summary) => {
            let verb = if restore { "restored" } else { "backed up" };
            println!(
                "{verb}: {} functions, {} pipelines, {} modules, {} audit segments",
                summary.functions, summary.pipelines, summary.modules, summary.audit_segments
            );
            if !summary.checkpoint_keys.is_empty() {
                // On restore, `checkpoints` counts the shards' checkpoint files.
                let what = if restore { "checkpoint files" } else { "signed checkpoints" };
                println!(
                    "{verb}: {} {what}, signed by {} (check with audit verify --public-key)",
                    summary.checkpoints,
                    summary.checkpoint_keys.join(", ")
                );
            }
            for skipped in &summary.skipped {
                println!("left out: {skipped}");
            }
            for damaged in &summary.damaged {
                println!("damaged, carried as it is: {damaged}");
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
