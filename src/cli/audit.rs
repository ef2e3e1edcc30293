//! `tensor-wasm audit`: verify the log, make a checkpoint key pair, tail the records.

use std::path::PathBuf;

use clap::Subcommand;

use super::EXIT_USAGE;
use crate::audit::chain::replica_name;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check every record's framing and every shard's hash chain, and with --public-key every
    /// signed checkpoint against the log; exits 1 if anything is broken, missing or changed.
    Verify {
        /// The audit directory (or one shard's directory).
        dir: PathBuf,
        /// The checkpoints' public key (`FILE.pub` of `audit keygen`).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// More checkpoints: a file (the server's stdout as a log shipper kept it, or a
        /// `checkpoints` file) or a directory of such files. The audit directory's own are always read.
        #[arg(long, requires = "public_key")]
        checkpoints: Option<PathBuf>,
        /// The fleet replica the log is (its `--replica-id`): a record that names another is
        /// broken, and only this replica's checkpoints (and those that name none) are checked.
        /// Default: the replicas its records and its own checkpoint files name.
        #[arg(long)]
        replica: Option<String>,
    },
    /// Write a new Ed25519 key pair for signing checkpoints: FILE (mode 0600) and FILE.pub.
    Keygen {
        /// Where the private key goes; the public key goes to the same path plus `.pub`.
        #[arg(long)]
        out: PathBuf,
        /// The key's name, which every checkpoint's origin starts with. Default:
        /// `<hostname>/tensor-wasm-audit`.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the newest records as JSON lines, the active segment's included.
    Tail {
        /// How many records.
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
        /// Keep printing records as they are written.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The audit directory.
        dir: PathBuf,
    },
}

/// `tensor-wasm audit ...`.
pub fn run(command: AuditCommand) -> i32 {
    match command {
        AuditCommand::Verify { dir, public_key, checkpoints, replica } => {
            let replica = match replica.as_deref().map(crate::audit::ReplicaId::parse).transpose() {
                Ok(replica) => replica,
                Err(e) => {
                    eprintln!("tensor-wasm: --replica {e}");
                    return EXIT_USAGE;
                }
            };
            verify_audit(&dir, public_key, checkpoints, replica.as_ref())
        }
        AuditCommand::Keygen { out, name } => {
            let host = super::host_name()
                .map(|n| n.replace(|c: char| c.is_whitespace() || c == '+', "-"))
                .unwrap_or_else(|| "localhost".into());
            let name = name.unwrap_or_else(|| format!("{host}/tensor-wasm-audit"));
            let written = crate::audit::checkpoint::SigningKey::generate(&name).and_then(|key| {
                let public = key.write_pair(&out)?;
                Ok((public, key.verifier().to_text()))
            });
            match written {
                Ok((public, vkey)) => {
                    println!("private key: {} (keep it secret: whoever holds it can sign checkpoints)", out.display());
                    println!("public key:  {}", public.display());
                    println!("{vkey}");
                    0
                }
                Err(e) => {
                    eprintln!("tensor-wasm: {e}");
                    1
                }
            }
        }
        AuditCommand::Tail { n, follow, dir } => {
            let result = if follow {
                crate::audit::follow(&dir, n)
            } else {
                crate::audit::tail(&dir, n).map(|lines| lines.iter().for_each(|l| println!("{l}")))
            };
            match result {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("tensor-wasm: cannot read {}: {e}", dir.display());
                    EXIT_USAGE
                }
            }
        }
    }
}

fn verify_audit(
    dir: &std::path::Path,
    public_key: Option<PathBuf>,
    checkpoints: Option<PathBuf>,
    replica: Option<&crate::audit::ReplicaId>,
) -> i32 {
    let key = match public_key.as_deref().map(crate::audit::checkpoint::VerifierKey::load).transpose() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("tensor-wasm: --public-key: {e}");
            return EXIT_USAGE;
        }
    };
    let report = match crate::audit::verify::verify(dir, key.as_ref(), checkpoints.as_deref(), replica) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("tensor-wasm: cannot read {}: {e}", dir.display());
            return EXIT_USAGE;
        }
    };
    for broken in &report.broken {
        eprintln!(
            "tensor-wasm: broken audit record: {} at offset {} (seq {}): {}",
            broken.file.display(),
            broken.offset,
            broken.seq,
            broken.reason
        );
    }
    if report.broken.is_empty() {
        println!("ok: {} records, every chain intact", report.records);
    } else {
        println!("{} records verify; {} damaged regions", report.records, report.broken.len());
    }
    if !report.replicas.is_empty() {
        let names: Vec<&str> = report.replicas.iter().map(|r| r.as_str()).collect();
        let unnamed = match report.unnamed {
            0 => String::new(),
            n => format!(" ({n} records name none)"),
        };
        println!("replicas: {}{unnamed}", names.join(", "));
    }
    for h in &report.handovers {
        println!(
            "note: {} goes on as {} (the chain's records before it name {}): a start under another --replica-id",
            h.file.display(),
            replica_name(h.to.as_ref()),
            replica_name(h.from.as_ref())
        );
    }
    for path in &report.unfinished {
        println!(
            "note: {} ends in a record cut short by a crash (never acknowledged); the next start cuts it away",
            path.display()
        );
    }
    if let Some(checks) = &report.checkpoints {
        for c in &checks.contradicted {
            eprintln!(
                "tensor-wasm: records lost or changed: checkpoint {} at seq {} signed at {} ms ({}) proves it: {}{}",
                c.checkpoint.origin,
                c.checkpoint.size,
                c.checkpoint.time_unix_ms,
                c.source.display(),
                c.reason,
                match c.of_shard {
                    1 => String::new(),
                    n => format!(" ({n} checkpoints of the shard contradicted; this is the earliest)"),
                }
            );
        }
        for path in &checks.forged {
            eprintln!(
                "tensor-wasm: a checkpoint in {} has a signature that does not verify (forged or damaged)",
                path.display()
            );
        }
        if let Some(shipped) = &checks.shipped_for_others {
            let names: Vec<&str> = shipped.iter().map(|r| r.as_str()).collect();
            eprintln!(
                "tensor-wasm: the checkpoints given are of replicas {} and this log names none of them: \
                 a log is checked against its own replica's shipped checkpoints",
                names.join(", ")
            );
        }
        if checks.verified == 0 {
            eprintln!("tensor-wasm: no checkpoint signed by this key was found: nothing proves the log is complete");
        }
        println!("checkpoints: {} verified", checks.verified);
        for (shard, cp) in &checks.newest {
            println!(
                "  shard {shard}: the log matches the checkpoint at seq {} signed at {} ms",
                cp.size, cp.time_unix_ms
            );
        }
        for (shard, n) in &checks.uncovered {
            println!("note: shard {shard}: {n} records after its last checkpoint are not covered by one");
        }
        if checks.beyond_retention > 0 {
            println!("note: {} checkpoints are older than the oldest record kept (retention)", checks.beyond_retention);
        }
        for (other, n) in &checks.other_replicas {
            println!(
                "note: {n} checkpoints of replica {other}, another replica's log, are not checked against this one"
            );
        }
        if checks.ignored > 0 {
            println!("note: {} notes ignored (another key's, malformed, or cut short)", checks.ignored);
        }
    }
    if report.ok() {
        0
    } else {
        1
    }
}
