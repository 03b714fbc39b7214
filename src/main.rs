//! The `bars-gateway` command line: `run`, `check`, `demo`, `keygen`. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// See the `mimalloc` feature in Cargo.toml for why.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "bars-gateway",
    version,
    about = "TLS-MA reverse proxy that makes a legacy system a BaRS receiver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM/SIGINT (SIGHUP reloads TLS material).
    Run {
        /// Config file.
        #[arg(long, env = "BARS_GATEWAY_CONFIG", default_value = bars_gateway::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the config and TLS material and print a report; exit 0 if usable, 1 if not.
    Check {
        /// Config file.
        #[arg(long, env = "BARS_GATEWAY_CONFIG", default_value = bars_gateway::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Try it here: a throwaway PKI, a sample legacy receiver and the gateway on loopback, real
    /// BaRS requests through it, then copy-paste curl commands until Ctrl-C.
    Demo {
        /// Exit after the scenario: 0 when every outcome was as expected, 1 otherwise.
        #[arg(long)]
        once: bool,
    },
    /// Make the sender's RSA key pair for the NHS API platform: private key, public key PEM to
    /// register, and a JWKS document with the KID; then print the next steps.
    Keygen {
        /// The key id to register, `<Supplier>-<Environment>-<n>`, e.g. MySupplier-INT-1.
        #[arg(long)]
        kid: String,
        /// Directory to write `<kid>.key`, `<kid>.pub.pem` and `<kid>.jwks.json` into.
        #[arg(long)]
        out: PathBuf,
        /// Encrypt the private key with the password in this file (PKCS#8, AES-256).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// RSA modulus size (tests use 2048 to keep debug builds quick).
        #[arg(long, default_value_t = bars_gateway::keygen::DEFAULT_BITS, hide = true)]
        bits: usize,
    },
}

fn main() -> ExitCode {
    // clap exits with 2 on usage errors, as DESIGN.md §2 asks.
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { once } => block_on(bars_gateway::demo::run(once), |result| match result {
            Ok(outcome) if outcome.success() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(1),
            Err(e) => {
                eprintln!("bars-gateway demo: {e}");
                ExitCode::from(1)
            }
        }),
        Command::Keygen {
            kid,
            out,
            password_file,
            bits,
        } => keygen(&kid, &out, password_file.as_deref(), bits),
        Command::Check { config } => {
            let report = bars_gateway::check::check(&config);
            print!("{}", report.text);
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Run { config } => {
            let settings = match bars_gateway::config::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bars-gateway: {e}");
                    return ExitCode::from(1);
                }
            };
            bars_gateway::init_logging(&settings.log);
            block_on(bars_gateway::run(settings), |result| match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    eprintln!("bars-gateway: {e}");
                    ExitCode::from(1)
                }
            })
        }
    }
}

fn keygen(
    kid: &str,
    out: &std::path::Path,
    password_file: Option<&std::path::Path>,
    bits: usize,
) -> ExitCode {
    if bits < 2048 {
        eprintln!("bars-gateway keygen: --bits must be at least 2048");
        return ExitCode::from(2);
    }
    let password = match password_file.map(std::fs::read_to_string).transpose() {
        Ok(p) => p.map(|p| p.trim_end_matches(['\r', '\n']).to_string()),
        Err(e) => {
            eprintln!("bars-gateway keygen: --password-file: {e}");
            return ExitCode::from(1);
        }
    };
    match bars_gateway::keygen::generate(kid, out, bits, password.as_deref()) {
        Ok(files) => {
            print!(
                "{}",
                bars_gateway::keygen::next_steps(kid, &files, password.is_some())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bars-gateway keygen: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs `future` on a multi-threaded Tokio runtime and maps its result to an exit code.
fn block_on<F: std::future::Future>(
    future: F,
    exit: impl FnOnce(F::Output) -> ExitCode,
) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => exit(runtime.block_on(future)),
        Err(e) => {
            eprintln!("bars-gateway: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}
