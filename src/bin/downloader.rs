//! Command line of the `downloader` binary: one subcommand per component.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use downloader::config::{Config, StoreKind};
use downloader::thumbnail::Thumbnailer;
use downloader::web::Info;

#[derive(Parser)]
#[command(
    name = "downloader",
    version = downloader::VERSION,
    about = "Rate-limited downloads, thumbnails and callbacks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    #[command(alias = "api")]
    Web {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(short = 'c', long = "config", default_value = "config.json")]
        config: PathBuf,
    },
    /// Download queued jobs.
    Processor {
        #[arg(short = 'c', long = "config", default_value = "config.json")]
        config: PathBuf,
    },
    /// Deliver callbacks and delete expired files.
    Notifier {
        #[arg(short = 'c', long = "config", default_value = "config.json")]
        config: PathBuf,
    },
    /// Run web, processor and notifier in one process (embedded store by default).
    Serve {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Without one: embedded store and files under ./data.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Make thumbnails of image files.
    Thumbnail(downloader::thumbnail::cli::Args),
    /// List and retry failed callbacks (dead letters).
    Callbacks {
        #[command(subcommand)]
        command: downloader::web::callbacks::Command,
    },
    /// Manage API tokens (`api.tokens`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new secret for a client and the `api.tokens` entry that accepts it.
    New {
        /// The token's name: its tenant, shown in logs (letters, digits, '.', '_', '-').
        name: String,
        /// What it may do (repeat for several): submit, read, admin.
        #[arg(long = "scope", value_enum, required = true)]
        scopes: Vec<downloader::auth::Scope>,
    },
}

/// `downloader token new`: the secret on stdout's first line, the config entry on
/// its second; nothing is stored anywhere.
fn token(command: TokenCommand) -> ExitCode {
    use std::io::Write;
    let TokenCommand::New { name, scopes } = command;
    match downloader::auth::new_token(&name, &scopes) {
        Ok((secret, entry)) => {
            let entry = serde_json::to_string(&entry).expect("a token entry is JSON");
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{secret}\n{entry}");
            say(format_args!(
                "downloader: give the first line to the client (it is shown only once); \
                 add the second to api.tokens in the config of every component"
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(format_args!("downloader: {e}"));
            ExitCode::from(2)
        }
    }
}

/// Prints to stderr, ignoring a closed stderr (eprintln! would panic).
fn say(msg: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        say(format_args!("downloader: config error: {e}"));
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Thumbnail(args) = cli.command {
        return downloader::thumbnail::cli::run(args);
    }
    if let Command::Token { command } = cli.command {
        return token(command);
    }
    if let Command::Version = cli.command {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "downloader {}", downloader::VERSION);
        return ExitCode::SUCCESS;
    }
    let config_path = config_path_of(&cli.command);
    let cfg = match &config_path {
        Some(p) => match load(p) {
            Ok(c) => Some(c),
            Err(code) => return code,
        },
        None => None,
    };
    let separate = !matches!(
        cli.command,
        Command::Serve { .. } | Command::Callbacks { .. }
    );
    if let (true, Some(cfg), Some(path)) = (separate, &cfg, &config_path)
        && let StoreKind::Embedded(store) = cfg.store_kind()
    {
        say(format_args!(
            "downloader: {}: selects the embedded store ({}), which only one process can use; \
             separate web, processor and notifier processes need a shared store (add a `redis` \
             section), or run all three in one process with `downloader serve`",
            path.display(),
            store.display()
        ));
        return ExitCode::from(2);
    }
    downloader::logging::init(&cfg.as_ref().map(|c| c.log.clone()).unwrap_or_default());
    // Before the runtime starts its threads: this edits the environment.
    let activated = downloader::systemd::take_listener();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(format_args!("downloader: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let span = tracing::info_span!(
        "downloader",
        component = cli.command.name(),
        host = %downloader::logging::hostname()
    );
    // Config::parse runs before logging is set up: its warnings are logged now.
    if let (Some(cfg), Some(path)) = (&cfg, &config_path) {
        span.in_scope(|| cfg.warn_ignored_keys(path));
    }
    runtime.block_on(tracing::Instrument::instrument(
        run(cli.command, cfg, activated),
        span,
    ))
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Web { .. } => "web",
            Command::Processor { .. } => "processor",
            Command::Notifier { .. } => "notifier",
            Command::Serve { .. } => "serve",
            Command::Thumbnail(_) => "thumbnail",
            Command::Token { .. } => "token",
            Command::Callbacks { .. } => "callbacks",
            Command::Version => "version",
        }
    }
}

fn config_path_of(command: &Command) -> Option<PathBuf> {
    match command {
        Command::Web { config, .. }
        | Command::Processor { config }
        | Command::Notifier { config } => Some(config.clone()),
        Command::Serve { config, .. } => config.clone(),
        Command::Callbacks { command } => Some(command.config().to_path_buf()),
        Command::Thumbnail(_) | Command::Token { .. } | Command::Version => None,
    }
}

async fn run(
    command: Command,
    cfg: Option<Config>,
    activated: Option<std::net::TcpListener>,
) -> ExitCode {
    let result = match (command, cfg) {
        (Command::Callbacks { command }, Some(cfg)) => {
            return downloader::web::callbacks::run_cli(command, &cfg).await;
        }
        (Command::Serve { host, port, .. }, cfg) => serve(cfg, activated, &host, port).await,
        (Command::Web { host, port, .. }, Some(cfg)) => web(cfg, activated, &host, port).await,
        (Command::Processor { .. }, Some(cfg)) => processor(cfg).await,
        (Command::Notifier { .. }, Some(cfg)) => notifier(cfg).await,
        _ => unreachable!(
            "every component but serve has a config path; thumbnail, token and version return early"
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "exiting");
            say(format_args!("downloader: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The socket systemd passed (socket activation: restarts lose no connection), else
/// a new one on `host:port`.
async fn listen(
    activated: Option<std::net::TcpListener>,
    host: &str,
    port: u16,
) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = match activated {
        Some(l) => tokio::net::TcpListener::from_std(l)?,
        None => tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?,
    };
    tracing::info!(addr = %listener.local_addr()?, "web listening");
    Ok(listener)
}

async fn web(
    cfg: Config,
    activated: Option<std::net::TcpListener>,
    host: &str,
    port: u16,
) -> anyhow::Result<()> {
    let store = downloader::connect_store(&cfg).await?;
    let shutdown = downloader::shutdown_on_signals();
    let listener = listen(activated, host, port).await?;
    let guard = guard(&cfg, "web")?;
    let state = downloader::web::AppState {
        store,
        heartbeat_path: cfg.api.heartbeat_path.clone(),
        submit_limits: cfg.submit_limits(),
        info: Arc::new(Info::new(vec!["web"], cfg.store_kind().name())),
        guard,
        aggr_settings: cfg.api.aggregation_settings,
        proxies: Arc::new(cfg.proxy_policy().map_err(anyhow::Error::msg)?),
        callback_guard: Arc::new(cfg.callback_guard().map_err(anyhow::Error::msg)?),
    };
    let thumbnailer = Arc::new(Thumbnailer::new(cfg.thumbnail.clone()));
    cfg.warn_body_budget();
    let app = downloader::web::router(state, cfg.api.max_body_bytes, None, thumbnailer);
    let sd = downloader::systemd::ready(shutdown.clone());
    downloader::web::serve(
        listener,
        app,
        shutdown,
        downloader::web::Limits::from_config(&cfg.api),
    )
    .await?;
    let _ = sd.await;
    Ok(())
}

/// All three components in one process, sharing one store and one shutdown.
async fn serve(
    cfg: Option<Config>,
    activated: Option<std::net::TcpListener>,
    host: &str,
    port: u16,
) -> anyhow::Result<()> {
    let listener = listen(activated, host, port).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let mut cfg = cfg.unwrap_or_else(|| Config::serve_defaults(&base));
    if cfg.download_url().is_err() {
        cfg.processor.download_url = Some(format!("{base}/files"));
    }
    if cfg.processor.admin_addr.is_some() || cfg.notifier.admin_addr.is_some() {
        tracing::warn!(
            "processor.admin_addr and notifier.admin_addr are not used by serve: \
             /metrics, /healthz and /info are on its own port"
        );
    }
    let store = downloader::connect_store(&cfg).await?;
    let shutdown = downloader::shutdown_on_signals();
    let thumbnailer = Arc::new(Thumbnailer::new(cfg.thumbnail.clone()));
    let processor = Arc::new(downloader::processor::Processor::new(
        &cfg,
        store.clone(),
        thumbnailer.clone(),
    )?);
    let notifier = Arc::new(downloader::notifier::Notifier::new(&cfg, store.clone())?);
    let guard = guard(&cfg, "serve")?;
    let state = downloader::web::AppState {
        store,
        heartbeat_path: cfg.api.heartbeat_path.clone(),
        submit_limits: cfg.submit_limits(),
        info: Arc::new(Info::new(
            vec!["web", "processor", "notifier"],
            cfg.store_kind().name(),
        )),
        guard,
        aggr_settings: cfg.api.aggregation_settings,
        proxies: Arc::new(cfg.proxy_policy().map_err(anyhow::Error::msg)?),
        callback_guard: Arc::new(cfg.callback_guard().map_err(anyhow::Error::msg)?),
    };
    let root = cfg.storage_root().map_err(anyhow::Error::msg)?;
    cfg.warn_body_budget();
    let app = downloader::web::router(state, cfg.api.max_body_bytes, Some(root), thumbnailer);
    tracing::info!(download_url = %cfg.download_url().unwrap_or_default(), "serve started");
    let sd = downloader::systemd::ready(shutdown.clone());
    let (web, (), (), _) = tokio::join!(
        downloader::web::serve(
            listener,
            app,
            shutdown.clone(),
            downloader::web::Limits::from_config(&cfg.api)
        ),
        processor.run(&cfg, shutdown.clone()),
        notifier.run(&cfg, shutdown.clone()),
        sd,
    );
    web?;
    tracing::info!("serve stopped");
    Ok(())
}

/// The request guard of a listener (`api.tokens`, ...), with the start-up warning
/// when the listener is open to anyone.
fn guard(cfg: &Config, what: &str) -> anyhow::Result<Arc<downloader::web::Guard>> {
    let g = downloader::web::Guard::from_config(&cfg.api).map_err(anyhow::Error::msg)?;
    g.warn_if_open(what);
    Ok(Arc::new(g))
}

/// The admin listener of `processor` or `notifier` when `key` (its config key) sets
/// one, bound before READY so that an address in use fails the start.
async fn admin_listener(
    addr: Option<&str>,
    key: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{key}: cannot listen on {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "admin listening");
    Ok(Some(listener))
}

/// Runs `work`, serving `/metrics`, `/healthz` and `/info` on `admin` (if any) until
/// `work` is done, so that they still answer while jobs drain at shutdown.
async fn with_admin(
    cfg: &Config,
    admin: Option<tokio::net::TcpListener>,
    ops: downloader::web::ops::OpsState,
    work: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    let admin_guard = match admin {
        Some(_) => Some(guard(cfg, "admin")?),
        None => None,
    };
    let server = async {
        match (admin, admin_guard) {
            (Some(l), Some(g)) => {
                let app = downloader::web::admin_router(ops, g);
                downloader::web::serve(
                    l,
                    app,
                    stop.clone(),
                    downloader::web::Limits::from_config(&cfg.api),
                )
                .await
            }
            _ => Ok(()),
        }
    };
    let work = async {
        work.await;
        stop.cancel();
    };
    let (served, ()) = tokio::join!(server, work);
    Ok(served?)
}

async fn processor(cfg: Config) -> anyhow::Result<()> {
    let store = downloader::connect_store(&cfg).await?;
    let shutdown = downloader::shutdown_on_signals();
    let admin = admin_listener(cfg.processor.admin_addr.as_deref(), "processor.admin_addr").await?;
    let thumbnailer = Arc::new(Thumbnailer::new(cfg.thumbnail.clone()));
    let p = Arc::new(downloader::processor::Processor::new(
        &cfg,
        store.clone(),
        thumbnailer.clone(),
    )?);
    let info = Arc::new(Info::new(vec!["processor"], cfg.store_kind().name()));
    let ops = downloader::web::ops::OpsState::new(info, store, Some(thumbnailer));
    tracing::info!("processor started");
    let sd = downloader::systemd::ready(shutdown.clone());
    with_admin(&cfg, admin, ops, p.run(&cfg, shutdown)).await?;
    let _ = sd.await;
    tracing::info!("processor stopped");
    Ok(())
}

async fn notifier(cfg: Config) -> anyhow::Result<()> {
    let store = downloader::connect_store(&cfg).await?;
    let shutdown = downloader::shutdown_on_signals();
    let admin = admin_listener(cfg.notifier.admin_addr.as_deref(), "notifier.admin_addr").await?;
    let n = Arc::new(downloader::notifier::Notifier::new(&cfg, store.clone())?);
    let info = Arc::new(Info::new(vec!["notifier"], cfg.store_kind().name()));
    let ops = downloader::web::ops::OpsState::new(info, store, None);
    tracing::info!("notifier started");
    let sd = downloader::systemd::ready(shutdown.clone());
    with_admin(&cfg, admin, ops, n.run(&cfg, shutdown)).await?;
    let _ = sd.await;
    tracing::info!("notifier stopped");
    Ok(())
}
