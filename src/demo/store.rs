//! Room history in PostgreSQL (`--history`): every message an instance's clients post is
//! written once, by that instance; joiners get the last messages of a room from the database,
//! so history survives restarts and is the same on every instance.
//!
//! The schema is created on start by the SQL files in `migrations/room_service/`, applied in
//! order under an advisory lock (instances may start together) and recorded in
//! `room_service_migrations`; they run again on every reconnection, so a database restored
//! from nothing is set up too.
//!
//! Invariants:
//! - chat never waits on the database: the hub offers messages to a bounded queue
//!   ([`QUEUE`]) that one writer task drains in order, in batches; reads on join have a
//!   deadline ([`READ_DEADLINE`]), and a failed read falls back to the instance's memory;
//! - a batch that fails to be written is retried until it is written, in order, so an outage
//!   shorter than it takes to fill the queue loses nothing; rows are unique by
//!   `(origin, room, seq)`, so a retry after a lost reply stores nothing twice;
//! - what is lost, counted in `history_lost` and logged: messages posted while the queue is
//!   full (a long outage), and those still queued when the service stops and the database does
//!   not take them within [`FLUSH_DEADLINE`].
//!
//! Connections are plain TCP (`NoTls`): the database is expected on loopback or a private
//! network.

use super::events::{ChatMessage, MAX_TEXT_LEN, clean_user};
use super::stats::Stats;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_postgres::{Client, NoTls};

/// Messages waiting to be written: at chat rates, minutes of an outage.
pub(crate) const QUEUE: usize = 10_000;
/// Messages written in one statement.
const BATCH: usize = 200;
/// Deadline of a connection attempt, the migrations and one write.
const DEADLINE: Duration = Duration::from_secs(5);
/// A joiner waits this long for the history before it gets the instance's memory instead.
pub(crate) const READ_DEADLINE: Duration = Duration::from_secs(2);
/// On shutdown, how long queued messages may take to be written.
pub(crate) const FLUSH_DEADLINE: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Any constant both instances agree on: serialises concurrent migrations.
const MIGRATION_LOCK: i64 = 0x7773_6761_7465_0001;

/// The migrations, in the order they apply; a file is never edited once released.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "0001_messages",
    include_str!("../../migrations/room_service/0001_messages.sql"),
)];

/// A `postgres://` URL that parsed; connections are made by [`spawn`].
#[derive(Clone)]
pub struct HistoryUrl(tokio_postgres::Config);

/// Without the password a URL may carry.
impl std::fmt::Debug for HistoryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryUrl")
            .field("dbname", &self.0.get_dbname())
            .finish_non_exhaustive()
    }
}

impl HistoryUrl {
    /// Checks `url` without connecting.
    pub fn parse(url: &str) -> Result<Self, String> {
        url.parse::<tokio_postgres::Config>()
            .map(Self)
            .map_err(|error| format!("invalid history URL: {error}"))
    }
}

type Shared = watch::Receiver<Option<Arc<Client>>>;

/// Reads history; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    client: Shared,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("connected", &self.client.borrow().is_some())
            .finish()
    }
}

/// Starts the connection keeper and the writer (draining `messages`). Both end when `stop`
/// turns `true`; the writer first tries to write what is queued ([`FLUSH_DEADLINE`]), and the
/// returned handle completes when it is done.
pub(crate) fn spawn(
    url: &HistoryUrl,
    stats: Arc<Stats>,
    messages: mpsc::Receiver<Arc<ChatMessage>>,
    stop: watch::Receiver<bool>,
) -> (Store, JoinHandle<()>) {
    stats.history_configured();
    let (tx, rx) = watch::channel(None);
    tokio::spawn(keep_connected(
        url.0.clone(),
        Arc::clone(&stats),
        tx,
        stop.clone(),
    ));
    let writer = tokio::spawn(write(messages, rx.clone(), stats, stop));
    (Store { client: rx }, writer)
}

impl Store {
    /// The last `limit` messages of `room`, oldest first.
    pub(crate) async fn recent(
        &self,
        room: &str,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, String> {
        let client = self
            .client
            .borrow()
            .clone()
            .ok_or("not connected to the database")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&room, &limit];
        let read = client.query(
            "SELECT room, origin, seq, user_name, text, server FROM \
             (SELECT * FROM room_messages WHERE room = $1 ORDER BY id DESC LIMIT $2) recent \
             ORDER BY id",
            &params,
        );
        let rows = match timeout(READ_DEADLINE, read).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(error)) => return Err(error.to_string()),
            Err(_) => return Err("timed out".to_owned()),
        };
        let mut messages = Vec::with_capacity(rows.len());
        for row in rows {
            match message_from(&row) {
                Some(message) => messages.push(message),
                None => tracing::warn!(room, "history: skipped a stored message that is not valid"),
            }
        }
        Ok(messages)
    }
}

/// A row as a message, if it holds what a client could have sent.
fn message_from(row: &tokio_postgres::Row) -> Option<ChatMessage> {
    let room: String = row.try_get(0).ok()?;
    let origin: i64 = row.try_get(1).ok()?;
    let seq: i64 = row.try_get(2).ok()?;
    let user: String = row.try_get(3).ok()?;
    let text: String = row.try_get(4).ok()?;
    let server: String = row.try_get(5).ok()?;
    if clean_user(&user) != Some(user.as_str()) || text.len() > MAX_TEXT_LEN {
        return None;
    }
    Some(ChatMessage {
        room: room.into(),
        user: user.into(),
        text,
        server: server.into(),
        seq: u64::try_from(seq).ok()?,
        origin: u64::from_ne_bytes(origin.to_ne_bytes()),
    })
}

/// Waits `pause` unless the service stops first; `false` if it did.
async fn pause_unless_stopped(pause: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        _ = stop.wait_for(|stopped| *stopped) => false,
    }
}

/// Keeps one connection open and migrated, published in `shared` while it is up.
async fn keep_connected(
    config: tokio_postgres::Config,
    stats: Arc<Stats>,
    shared: watch::Sender<Option<Arc<Client>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        match timeout(DEADLINE, config.connect(NoTls)).await {
            Ok(Ok((mut client, connection))) => {
                let mut driver = tokio::spawn(connection);
                match timeout(DEADLINE, migrate(&mut client)).await {
                    Ok(Ok(())) => {
                        backoff = BACKOFF_MIN;
                        if stats.set_history_up(true) {
                            tracing::info!("history: connected to the database");
                        }
                        shared.send_replace(Some(Arc::new(client)));
                        tokio::select! {
                            ended = &mut driver => {
                                let error = match ended {
                                    Ok(Err(error)) => error.to_string(),
                                    _ => "closed".to_owned(),
                                };
                                tracing::warn!(%error, "history: database connection lost; reconnecting");
                            }
                            // The client stays published for the writer's final flush.
                            _ = stop.wait_for(|stopped| *stopped) => return,
                        }
                        shared.send_replace(None);
                        stats.set_history_up(false);
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "history: cannot prepare the schema");
                        driver.abort();
                    }
                    Err(_) => {
                        tracing::warn!("history: preparing the schema timed out");
                        driver.abort();
                    }
                }
            }
            Ok(Err(error)) => {
                if first || stats.set_history_up(false) {
                    tracing::warn!(%error, "history: cannot connect to the database; retrying");
                }
            }
            Err(_) => {
                if first || stats.set_history_up(false) {
                    tracing::warn!("history: connecting to the database timed out; retrying");
                }
            }
        }
        first = false;
        if !pause_unless_stopped(backoff, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Applies the migrations not yet recorded, in one transaction.
async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // Silences the notice that the table exists, which every start but the first would log.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning; \
         CREATE TABLE IF NOT EXISTS room_service_migrations (\
         version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let mut applied = Vec::new();
    for row in tx
        .query("SELECT version FROM room_service_migrations", &[])
        .await?
    {
        applied.push(row.try_get::<_, i32>(0)?);
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO room_service_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tracing::info!(migration = name, "history: applied");
    }
    tx.commit().await
}

async fn insert(client: &Client, batch: &[Arc<ChatMessage>]) -> Result<u64, String> {
    let rooms: Vec<&str> = batch.iter().map(|m| &*m.room).collect();
    let origins: Vec<i64> = batch
        .iter()
        .map(|m| i64::from_ne_bytes(m.origin.to_ne_bytes()))
        .collect();
    let seqs: Vec<i64> = batch
        .iter()
        .map(|m| i64::try_from(m.seq).unwrap_or(i64::MAX))
        .collect();
    let users: Vec<&str> = batch.iter().map(|m| &*m.user).collect();
    let texts: Vec<&str> = batch.iter().map(|m| m.text.as_str()).collect();
    let servers: Vec<&str> = batch.iter().map(|m| &*m.server).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&rooms, &origins, &seqs, &users, &texts, &servers];
    // unnest yields the rows in array order, so ids follow the order messages were posted.
    let write = client.execute(
        "INSERT INTO room_messages (room, origin, seq, user_name, text, server) \
         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[]) \
         ON CONFLICT (origin, room, seq) DO NOTHING",
        &params,
    );
    match timeout(DEADLINE, write).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Writes queued messages in order, retrying a failed batch until it is written or the
/// service stops.
async fn write(
    mut messages: mpsc::Receiver<Arc<ChatMessage>>,
    client: Shared,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    'batches: loop {
        tokio::select! {
            received = messages.recv_many(&mut batch, BATCH) => if received == 0 { return },
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let current = client.borrow().clone();
            let result = match current {
                Some(client) => insert(&client, &batch).await,
                None => Err("not connected to the database".to_owned()),
            };
            match result {
                Ok(_) => {
                    let count = batch.len() as u64;
                    Stats::add(&stats.history_written, count);
                    Stats::sub(&stats.history_pending, count);
                    batch.clear();
                    if failing {
                        tracing::info!("history: writes resumed");
                        failing = false;
                    }
                    continue 'batches;
                }
                Err(error) => {
                    Stats::add(&stats.history_write_failures, 1);
                    if !failing {
                        tracing::warn!(%error, queued = batch.len() + messages.len(),
                            "history: write failed; retrying, messages are queued meanwhile");
                        failing = true;
                    }
                }
            }
            if !pause_unless_stopped(backoff, &mut stop).await {
                break 'batches;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    flush(batch, messages, client, stats).await;
}

/// On shutdown: one attempt, within [`FLUSH_DEADLINE`], at what is still queued.
async fn flush(
    mut batch: Vec<Arc<ChatMessage>>,
    mut messages: mpsc::Receiver<Arc<ChatMessage>>,
    client: Shared,
    stats: Arc<Stats>,
) {
    while let Ok(message) = messages.try_recv() {
        batch.push(message);
    }
    if batch.is_empty() {
        return;
    }
    let current = client.borrow().clone();
    let written = timeout(FLUSH_DEADLINE, async {
        let client = current.ok_or("not connected to the database".to_owned())?;
        for chunk in batch.chunks(BATCH) {
            insert(&client, chunk).await?;
        }
        Ok::<_, String>(())
    })
    .await;
    let count = batch.len() as u64;
    Stats::sub(&stats.history_pending, count);
    match written {
        Ok(Ok(())) => Stats::add(&stats.history_written, count),
        failed => {
            Stats::add(&stats.history_lost, count);
            let error = match failed {
                Ok(Err(error)) => error,
                _ => "timed out".to_owned(),
            };
            tracing::warn!(%error, lost = count, "history: messages not written at shutdown");
        }
    }
}
