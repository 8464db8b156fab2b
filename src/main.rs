//! The `wsgate` command: parse arguments, load the configuration, start logging, run.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use wsgate::config::{self, Config};
use wsgate::server::{Reloader, Server};

#[derive(Parser, Debug)]
#[command(name = "wsgate", version, about = "A protocol-level WebSocket gateway")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Worker threads: 0 (the default) is one per CPU; 1 runs everything on the main thread.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway with a configuration file.
    Run {
        #[arg(short, long, default_value = "config/wsgate.yaml")]
        config: PathBuf,
        /// Unix socket for binary upgrades without a dropped connection: a wsgate serving
        /// hand-overs there gives this one its listening sockets and drains; this one then
        /// serves the next hand-over there.
        #[arg(long, value_name = "PATH")]
        handover: Option<PathBuf>,
    },
    /// Run the demo: two chat-room services and the gateway in front of them (open
    /// http://127.0.0.1:8080/ in two tabs).
    Demo {
        /// A configuration with an upstream named "rooms". Default: the built-in demo
        /// configuration (config/wsgate.yaml as shipped), so the demo runs from any directory.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print the resolved routes.
    Check {
        #[arg(short, long, default_value = "config/wsgate.yaml")]
        config: PathBuf,
    },
    /// Proxy one address to one or more backends, with the defaults a config file would have.
    Proxy {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Backend URL (ws:// or wss://); repeat for several backends.
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        /// Sticky key: path:/rooms/{room}, query:NAME, header:NAME, cookie:NAME or client_ip.
        #[arg(long)]
        sticky: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(config) => {
                print!("{}", config::describe(&config));
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Demo { config } => match demo_config(config.as_deref()) {
            Ok(config) => demo(config, cli.threads),
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config: path,
            handover,
        } => match config::load(&path) {
            Ok(config) => run(config, Some(path), cli.threads, handover),
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Proxy { listen, to, sticky } => {
            let yaml = match proxy_yaml(&listen, &to, sticky.as_deref()) {
                Ok(yaml) => yaml,
                Err(message) => {
                    eprintln!("wsgate proxy: {message}");
                    return ExitCode::FAILURE;
                }
            };
            match config::from_yaml_str(&yaml, "<command line>") {
                Ok(config) => run(config, None, cli.threads, None),
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The configuration `wsgate proxy` stands for, as YAML, so it is validated exactly like a file.
fn proxy_yaml(listen: &str, to: &[String], sticky: Option<&str>) -> Result<String, String> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut yaml = format!(
        "listeners:\n  - address: {}\nupstreams:\n  proxy:\n    backends:\n",
        quote(listen)
    );
    for url in to {
        yaml.push_str(&format!("      - {}\n", quote(url)));
    }
    yaml.push_str("routes:\n  - name: proxy\n    upstream: proxy\n");
    if let Some(sticky) = sticky {
        let (kind, value) = match sticky.split_once(':') {
            Some((kind, value)) => (kind, Some(value)),
            None => (sticky, None),
        };
        let line = match (kind, value) {
            ("client_ip", None) => "client_ip: true".to_owned(),
            ("path" | "query" | "header" | "cookie", Some(value)) if !value.is_empty() => {
                format!("{kind}: {}", quote(value))
            }
            _ => {
                return Err(format!(
                    "--sticky {sticky:?}: expected path:/rooms/{{room}}, query:NAME, header:NAME, cookie:NAME or client_ip"
                ));
            }
        };
        yaml.push_str(&format!("    sticky:\n      {line}\n"));
    }
    Ok(yaml)
}

/// The runtime for `threads` workers. One worker is a current-thread runtime: no work
/// stealing and no cross-thread wake-ups, which is what a process pinned to one core wants.
fn runtime(threads: usize) -> Option<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    match builder.enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("wsgate: cannot start the runtime: {error}");
            None
        }
    }
}

/// The demo's built-in configuration, compiled in so an installed binary needs no files.
const DEMO_CONFIG: &str = include_str!("../config/wsgate.yaml");

fn demo_config(path: Option<&std::path::Path>) -> Result<Config, config::ConfigErrors> {
    match path {
        Some(path) => config::load(path),
        None => config::from_yaml_str(DEMO_CONFIG, "<built-in demo config>"),
    }
}

/// The demo: one room service per backend of the config's `rooms` upstream, in this process,
/// then the gateway. Everything stops on Ctrl-C.
fn demo(config: Config, threads: usize) -> ExitCode {
    let Some(rooms) = config.upstreams.iter().find(|u| u.name == "rooms") else {
        eprintln!(
            "wsgate demo: the configuration has no upstream named \"rooms\" to run room services for"
        );
        return ExitCode::FAILURE;
    };
    let backends: Vec<(String, u16)> = rooms
        .backends
        .iter()
        .map(|b| (b.host.clone(), b.port))
        .collect();
    let Some(runtime) = runtime(threads) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let (stop, _) = tokio::sync::watch::channel(false);
        for (index, (host, port)) in backends.iter().enumerate() {
            let listener = match tokio::net::TcpListener::bind((host.as_str(), *port)).await {
                Ok(listener) => listener,
                Err(error) => {
                    eprintln!(
                        "wsgate demo: cannot listen on {host}:{port} for room service {}: {error}",
                        index + 1
                    );
                    return ExitCode::FAILURE;
                }
            };
            let name = format!("room-service-{}", index + 1);
            let mut stopped = stop.subscribe();
            tracing::info!("{name} listening on {host}:{port}");
            tokio::spawn(wsgate::demo::room_service::serve(
                listener,
                name,
                async move {
                    let _ = stopped.wait_for(|stopped| *stopped).await;
                },
            ));
        }
        let status = serve(config, None, None, |addr| {
            tracing::info!("demo chat: open http://{addr}/ in two browser tabs");
        })
        .await;
        let _ = stop.send(true);
        status
    })
}

/// Runs `config`; with `reload_from`, SIGHUP or a change of that file reloads it.
fn run(
    config: Config,
    reload_from: Option<PathBuf>,
    threads: usize,
    handover: Option<PathBuf>,
) -> ExitCode {
    let Some(runtime) = runtime(threads) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(serve(config, reload_from, handover, |addr| {
        tracing::info!("listening on {addr}")
    }))
}

/// Binds, announces each listening address, and serves until SIGTERM or SIGINT, then drains.
async fn serve(
    config: Config,
    reload_from: Option<PathBuf>,
    handover: Option<PathBuf>,
    announce: impl Fn(std::net::SocketAddr),
) -> ExitCode {
    let mut inherited = match &handover {
        Some(path) => match wsgate::handover::take_over(path).await {
            Ok(inherited) => inherited,
            Err(error) => {
                eprintln!("wsgate: {error}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let server = match Server::bind_inheriting(config, inherited.as_mut()).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("wsgate: {error}");
            return ExitCode::FAILURE;
        }
    };
    server.local_addrs().into_iter().for_each(announce);
    if let Some(path) = handover {
        let sockets = match server.handover_sockets() {
            Ok(sockets) => sockets,
            Err(error) => {
                eprintln!("wsgate: cannot prepare the listening sockets for hand-over: {error}");
                return ExitCode::FAILURE;
            }
        };
        let handed_over = server.handed_over();
        tokio::spawn(async move {
            if let Some(inherited) = inherited {
                for address in inherited.unused() {
                    tracing::info!("{address} is no longer configured: closing that listener");
                }
                match inherited.confirm().await {
                    Ok(()) => tracing::info!(
                        "took over the listening sockets; the previous wsgate drains"
                    ),
                    Err(error) => {
                        tracing::warn!("the previous wsgate did not confirm the hand-over: {error}")
                    }
                }
            }
            if let Err(error) = wsgate::handover::serve(path, sockets, handed_over).await {
                tracing::error!("cannot serve hand-overs: {error}");
            }
        });
    }
    if let Some(path) = reload_from {
        tokio::spawn(watch_for_reloads(server.reloader(), path));
    }
    let drain = Arc::clone(&server.gateway().drain);
    server
        .run(async move {
            shutdown_signal().await;
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::warn!("second shutdown signal: closing every connection now");
                drain.close(std::time::Duration::ZERO);
            });
        })
        .await;
    tracing::info!("stopped; exiting");
    ExitCode::SUCCESS
}

/// How often the configuration file's modification time is compared.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads `path` on SIGHUP and whenever its modification time changes. A file that does not
/// load is refused with its `file:line` errors and the running configuration stays.
async fn watch_for_reloads(reloader: Reloader, path: PathBuf) {
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut last = modified(&path);
    let mut poll = tokio::time::interval(CONFIG_POLL);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let why = tokio::select! {
            _ = hup => "SIGHUP",
            _ = poll.tick() => {
                let now = modified(&path);
                if now == last {
                    continue;
                }
                "the file changed"
            }
        };
        last = modified(&path);
        match config::load(&path) {
            Ok(config) => match reloader.reload(config) {
                Ok(()) => tracing::info!("configuration reloaded ({why})"),
                Err(error) => tracing::error!("reload refused ({why}): {error}"),
            },
            Err(errors) => {
                reloader.refused();
                tracing::error!(
                    "reload refused ({why}); the running configuration stays:\n{errors}"
                );
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
