//! Command line: one file per subcommand. `serve` and its flags (every flag has a
//! `TENSOR_WASM_*` env var), `audit`, the client commands (`client`), `observe`,
//! `token generate` (`token`), `backup`/`restore` (`backup`) and `doctor`. Here: the command
//! enum and `main`.
//!
//! Boundary: the top of the crate; nothing imports `cli` but `main.rs`.

pub mod audit;
pub mod backup;
pub mod client;
pub mod doctor;
pub mod observe;
pub mod serve;
pub mod token;

pub use audit::AuditCommand;
pub use backup::BackupArgs;
pub use serve::ServeArgs;
pub use token::TokenCommand;

use clap::{Parser, Subcommand};

use crate::config::ServerConfig;

pub use crate::config::EXIT_USAGE;

/// This host's name (`gethostname`; in Kubernetes the pod's name), or `None` when it cannot be
/// read or is empty.
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (rc == 0 && !name.is_empty()).then_some(name)
}

#[derive(Parser)]
#[command(name = "tensor-wasm", version, about = "Serverless runtime for WebAssembly functions on GPU hosts")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP server: one pinned shard per allowed CPU.
    Serve(Box<ServeArgs>),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Deploy a module to a running server.
    Deploy(client::DeployArgs),
    /// Invoke a function on a running server; prints its answer.
    Invoke(client::InvokeArgs),
    /// List, show or delete a running server's functions.
    #[command(subcommand)]
    Functions(client::FunctionsCommand),
    /// Bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// A live one-screen board of a running server; `--once` for CI and deploy windows.
    Observe(observe::ObserveArgs),
    /// Copy the data dir (functions, pipelines, modules, sealed audit segments) into a new
    /// directory, while the server runs.
    Backup(BackupArgs),
    /// Put a backup into an empty data dir.
    Restore(BackupArgs),
    /// Check this host the way the server would use it: CPUs, memlock, io_uring, the data dir,
    /// the clock, and each GPU with a tiny computation checked against a float64 reference.
    Doctor(doctor::DoctorArgs),
    /// The server's compile child (`wasm::compile`): a module on stdin, its artifact on stdout.
    #[command(name = "compile-guest", hide = true)]
    CompileGuest {
        #[arg(long)]
        guest_perf_map: bool,
    },
}

/// The configuration `tensor-wasm serve ARGS…` would run with (for benchmarks and embedders).
pub fn serve_config<I, T>(args: I) -> Result<ServerConfig, String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv = ["tensor-wasm".into(), "serve".into()].into_iter().chain(args.into_iter().map(Into::into));
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Serve(args) => (*args).into_config(),
        _ => Err("not a serve command".into()),
    }
}

/// Parses the command line, runs the command and returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return 0;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return EXIT_USAGE;
            }
            // clap's rendering spans several lines; operators and scripts want one.
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string();
            // "the following required arguments were not provided:" names them on the next line.
            if first.ends_with(':') {
                first = format!("{first} {}", lines.next().unwrap_or_default());
            }
            eprintln!("tensor-wasm: {first}");
            return EXIT_USAGE;
        }
    };
    match cli.command {
        Command::Audit(command) => audit::run(command),
        Command::Deploy(args) => client::deploy(args),
        Command::Invoke(args) => client::invoke(args),
        Command::Functions(command) => client::functions(command),
        Command::Token(TokenCommand::Generate(args)) => token::generate(args),
        Command::Observe(args) => observe::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Backup(args) => backup::run(args, false),
        Command::Restore(args) => backup::run(args, true),
        Command::CompileGuest { guest_perf_map } => crate::wasm::compile::child_main(match guest_perf_map {
            true => crate::config::GuestProfiler::PerfMap,
            false => crate::config::GuestProfiler::Off,
        }),
        Command::Serve(args) => serve::run(*args),
    }
}
