//! `room-service`: the demo chat backend on its own, for putting several instances behind the
//! gateway (`room-service --listen 127.0.0.1:9101 --name a`).

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "room-service",
    version,
    about = "Demo chat-room backend (WebSocket on /rooms/<room>, chat page on /)"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9101")]
    listen: SocketAddr,
    /// Instance name, reported in every event so clients see which backend holds a room
    /// (default: the listen address).
    #[arg(long)]
    name: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("room-service: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(cli.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("room-service: cannot listen on {}: {error}", cli.listen);
                return ExitCode::FAILURE;
            }
        };
        let name = cli.name.unwrap_or_else(|| cli.listen.to_string());
        wsgate::demo::room_service::serve(listener, name, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Ctrl-C, or SIGTERM on Unix (what process managers and `docker stop` send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
