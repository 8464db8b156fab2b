//! `room-service`: the demo chat backend on its own, for putting several instances behind the
//! gateway (`room-service --listen 127.0.0.1:9101 --name a`), sharing rooms through Redis
//! (`--broker redis://127.0.0.1:6379`) and history through PostgreSQL
//! (`--history postgres://user@127.0.0.1/db`).

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use wsgate::demo::broker::BrokerUrl;
use wsgate::demo::room_service::{Options, serve_with};
use wsgate::demo::store::HistoryUrl;

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
    /// Share rooms with other instances through Redis pub/sub (redis://host[:port][/db]).
    /// Default: rooms live in this process.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Keep room history in PostgreSQL (postgres://user[:password]@host[:port]/db); the schema
    /// is created on start. Default: history in memory.
    #[arg(long, value_name = "URL")]
    history: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let broker = match cli.broker.as_deref().map(BrokerUrl::parse).transpose() {
        Ok(broker) => broker,
        Err(error) => {
            eprintln!("room-service: --broker: {error}");
            return ExitCode::FAILURE;
        }
    };
    let history = match cli.history.as_deref().map(HistoryUrl::parse).transpose() {
        Ok(history) => history,
        Err(error) => {
            eprintln!("room-service: --history: {error}");
            return ExitCode::FAILURE;
        }
    };
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
        let options = Options {
            name: cli.name.unwrap_or_else(|| cli.listen.to_string()),
            broker,
            history,
        };
        serve_with(listener, options, shutdown_signal()).await;
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
