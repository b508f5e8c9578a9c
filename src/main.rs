//! `ballast`: the one binary. The commands live in [`cli`]; this file only
//! turns their outcome into one line on stderr and an exit code:
//! 0 done, 1 failed or refused, 2 bad arguments or configuration.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One readable line: clap's first paragraph (which names the
            // missing arguments on its indented lines), without "error: ".
            let text = e.render().to_string();
            let first: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).collect();
            let first = one_line(&first.join(" "));
            let first = first.trim_start_matches("error: ");
            let first = if first.is_empty() { "invalid arguments" } else { first };
            eprintln!("ballast: {first} (see `ballast --help`)");
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    if let Err(e) = init_logging(&cli.log, &cli.log_format) {
        eprintln!("ballast: {e:#}");
        return ExitCode::from(cli::EXIT_USAGE);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ballast: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `block_on` runs the command on this (the main) thread: `ballast demo`
    // spawns its nodes from here, and their parent-death signal is tied to
    // the thread that forked them, so it must be one that lives as long as
    // the process.
    match runtime.block_on(cli::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast: {}", one_line(&format!("{e:#}")));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}

/// Errors from libraries may carry newlines (gRPC details, TOML snippets);
/// the contract of the binary is one line per failure.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn init_logging(filter: &str, format: &str) -> Result<()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let filter =
        tracing_subscriber::EnvFilter::try_new(&filter).with_context(|| format!("invalid log filter {filter:?}"))?;
    // No colour codes in log files (`ballast demo` sends each node's stderr to one).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}
