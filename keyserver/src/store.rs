//! Storage: SQLite (embedded, the default) or PostgreSQL (several key servers behind a
//! load balancer on one database), behind the one type [`Store`].
//!
//! Both backends share the SQL text: parameters are `$1`, `$2`, ..., which PostgreSQL
//! reads as positions and sqlx's SQLite driver binds by their number too. The schema (`migrations/<backend>/`, run at startup by
//! sqlx, embedded in the binary) differs only in the bytes type (`BLOB`/`BYTEA`).
//!
//! One table, `users`, one row per name: *pending* (`active = FALSE`) from registration
//! until the activation link is followed or `expires_ms` passes, then *active* with the
//! signed answer in `answer`. A pending row past `expires_ms` is dead: it blocks nothing
//! (registration removes it first) and the cleanup task deletes it.
//!
//! A second table, `prekeys`, holds each active user's newest signed v3 prekey, verbatim
//! as uploaded, one row per user. Its `username` references `users` with `ON DELETE
//! CASCADE` (SQLite: `PRAGMA foreign_keys = ON`, set on every connection), so every way a
//! user row goes (the delete link, expiry) takes the prekey with it in the same statement.
//!
//! Enum dispatch instead of `sqlx::Any`: each arm is type-checked against its real
//! driver (bytes, booleans, transactions), and SQLite can take its write lock up front
//! (`BEGIN IMMEDIATE`) so concurrent registrations wait instead of failing.

use crate::tokens::TokenHash;
use nes_proto::Username;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::Duration;

/// The database.
#[derive(Debug, Clone)]
pub enum Store {
    /// `sqlite://PATH`.
    Sqlite(SqlitePool),
    /// `postgres://...`.
    Postgres(PgPool),
}

/// A database failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The driver failed (connection, SQL, constraint).
    #[error("{0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The SQLite file's directory could not be created.
    #[error("cannot create the directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A registration to insert, already checked.
#[derive(Debug)]
pub struct NewUser<'a> {
    /// `username`.
    pub username: &'a Username,
    /// `email` as registered.
    pub email: &'a str,
    /// `email` lower-cased, the key of the per-address cap.
    pub email_key: &'a str,
    /// `public_key_message`, verbatim.
    pub public_key_message: &'a str,
    /// `public_key_sign`, verbatim.
    pub public_key_sign: &'a str,
    /// Hash of the activation token.
    pub activation_hash: &'a TokenHash,
    /// Hash of the delete token.
    pub delete_hash: &'a TokenHash,
    /// Now, Unix ms.
    pub created_ms: i64,
    /// When the activation link stops working, Unix ms.
    pub expires_ms: i64,
}

/// What [`Store::register`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The pending row is in.
    Created,
    /// An active user or a live pending registration has the name.
    NameTaken,
    /// The e-mail address has the maximum of live pending registrations; the oldest
    /// expires at `first_expiry_ms`.
    TooManyPending {
        /// Unix ms when a slot frees up.
        first_expiry_ms: i64,
    },
}

/// A user as the token route needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserState {
    /// Registered, not yet activated.
    Pending {
        /// Hash of the activation token.
        activation_hash: Vec<u8>,
        /// When the activation link stops working, Unix ms.
        expires_ms: i64,
        /// `public_key_message`, verbatim.
        public_key_message: String,
        /// `public_key_sign`, verbatim.
        public_key_sign: String,
    },
    /// Activated: has a signed answer.
    Active {
        /// Hash of the delete token.
        delete_hash: Vec<u8>,
    },
}

/// A signed prekey to store, already checked (signature, name, times).
#[derive(Debug)]
pub struct NewPrekey<'a> {
    /// Whose.
    pub username: &'a Username,
    /// `prekey.created`, Unix ms.
    pub created_ms: i64,
    /// `prekey.expires`, Unix ms.
    pub expires_ms: i64,
    /// The request body, verbatim: what `GET /users/<name>/prekey` answers.
    pub body: &'a [u8],
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// What [`Store::put_prekey`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrekeyOutcome {
    /// Stored: there was none, the stored one had expired, or it was older.
    Stored,
    /// The same bytes were already stored (a retried upload): nothing changed.
    Unchanged,
    /// The stored prekey is newer (`created` later), or as new with other bytes.
    Outdated {
        /// The stored prekey's `created`, Unix ms.
        stored_created_ms: i64,
    },
    /// No active user of that name (unknown, pending, or deleted meanwhile).
    NoUser,
}

/// Runs `$body` with `$pool` bound to whichever pool `$store` holds; the body is
/// type-checked once per backend.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

/// The statements of a registration, on a transaction `$tx` of either backend.
macro_rules! register_in {
    ($tx:ident, $user:expr, $max_pending:expr) => {{
        let user = $user;
        // A dead pending registration of this name must not block it.
        sqlx::query(
            "DELETE FROM users WHERE username = $1 AND active = FALSE AND expires_ms <= $2",
        )
        .bind(user.username.as_str())
        .bind(user.created_ms)
        .execute(&mut *$tx)
        .await?;
        let taken: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE username = $1")
            .bind(user.username.as_str())
            .fetch_one(&mut *$tx)
            .await?;
        if taken > 0 {
            return Ok(RegisterOutcome::NameTaken);
        }
        if $max_pending > 0 {
            let (pending, first): (i64, Option<i64>) = sqlx::query_as(
                "SELECT COUNT(*), MIN(expires_ms) FROM users \
                 WHERE email_key = $1 AND active = FALSE AND expires_ms > $2",
            )
            .bind(user.email_key)
            .bind(user.created_ms)
            .fetch_one(&mut *$tx)
            .await?;
            if pending >= i64::from($max_pending) {
                return Ok(RegisterOutcome::TooManyPending {
                    first_expiry_ms: first.unwrap_or(user.expires_ms),
                });
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO users (username, email, email_key, public_key_message, public_key_sign, \
             activation_hash, delete_hash, created_ms, expires_ms, active) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, FALSE) ON CONFLICT (username) DO NOTHING",
        )
        .bind(user.username.as_str())
        .bind(user.email)
        .bind(user.email_key)
        .bind(user.public_key_message)
        .bind(user.public_key_sign)
        .bind(user.activation_hash.as_bytes())
        .bind(user.delete_hash.as_bytes())
        .bind(user.created_ms)
        .bind(user.expires_ms)
        .execute(&mut *$tx)
        .await?
        .rows_affected();
        $tx.commit().await?;
        Ok(if inserted == 1 {
            RegisterOutcome::Created
        } else {
            RegisterOutcome::NameTaken
        })
    }};
}

impl Store {
    /// Opens (SQLite: creates) the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                // sqlx's default too; said here because prekeys rely on ON DELETE CASCADE.
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10));
            let parent = options
                .get_filename()
                .parent()
                .map(std::path::Path::to_path_buf);
            if let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(&dir).map_err(|source| StoreError::Dir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(15))
                .connect_with(options)
                .await?;
            sqlx::migrate!("migrations/sqlite").run(&pool).await?;
            Ok(Self::Sqlite(pool))
        } else {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(15))
                .connect_with(options)
                .await?;
            // sqlx takes an advisory lock: several servers may start at once.
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Ok(Self::Postgres(pool))
        }
    }

    /// Which backend, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Inserts a pending registration unless the name is taken or the address has
    /// `max_pending` live pending registrations (0 = no cap). One transaction.
    pub async fn register(
        &self,
        user: &NewUser<'_>,
        max_pending: u32,
    ) -> Result<RegisterOutcome, StoreError> {
        match self {
            // Take the write lock now: a deferred transaction that reads and then
            // writes can fail with SQLITE_BUSY instead of waiting.
            Self::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                register_in!(tx, user, max_pending)
            }
            Self::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                register_in!(tx, user, max_pending)
            }
        }
    }

    /// Removes a pending registration again (its mail could not be sent).
    pub async fn unregister(
        &self,
        username: &Username,
        activation_hash: &TokenHash,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query("DELETE FROM users WHERE username = $1 AND active = FALSE AND activation_hash = $2")
                .bind(username.as_str())
                .bind(activation_hash.as_bytes())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The user's state, pending or active; `None` when there is no row.
    pub async fn user(&self, username: &Username) -> Result<Option<UserState>, StoreError> {
        type Row = (bool, Option<Vec<u8>>, Vec<u8>, i64, String, String);
        let row: Option<Row> = with_pool!(self, pool => sqlx::query_as(
            "SELECT active, activation_hash, delete_hash, expires_ms, public_key_message, public_key_sign \
             FROM users WHERE username = $1",
        )
        .bind(username.as_str())
        .fetch_optional(pool)
        .await?);
        Ok(row.map(
            |(
                active,
                activation_hash,
                delete_hash,
                expires_ms,
                public_key_message,
                public_key_sign,
            )| {
                if active {
                    UserState::Active { delete_hash }
                } else {
                    UserState::Pending {
                        activation_hash: activation_hash.unwrap_or_default(),
                        expires_ms,
                        public_key_message,
                        public_key_sign,
                    }
                }
            },
        ))
    }

    /// Activates a pending user whose activation hash is `activation_hash` and which has
    /// not expired at `now_ms`, storing its signed `answer`. False when no such row (it
    /// was activated, removed or expired meanwhile).
    pub async fn activate(
        &self,
        username: &Username,
        activation_hash: &[u8],
        answer: &[u8],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = with_pool!(self, pool => sqlx::query(
            "UPDATE users SET active = TRUE, activation_hash = NULL, activated_ms = $1, answer = $2 \
             WHERE username = $3 AND active = FALSE AND activation_hash = $4 AND expires_ms > $1",
        )
        .bind(now_ms)
        .bind(answer)
        .bind(username.as_str())
        .bind(activation_hash)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(done == 1)
    }

    /// Deletes an active user whose delete hash is `delete_hash`. False when no such row.
    pub async fn delete(
        &self,
        username: &Username,
        delete_hash: &[u8],
    ) -> Result<bool, StoreError> {
        let done = with_pool!(self, pool => sqlx::query(
            "DELETE FROM users WHERE username = $1 AND active = TRUE AND delete_hash = $2",
        )
        .bind(username.as_str())
        .bind(delete_hash)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(done == 1)
    }

    /// The stored signed answer of an active user.
    pub async fn answer(&self, username: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let answer: Option<Option<Vec<u8>>> = with_pool!(self, pool => sqlx::query_scalar(
            "SELECT answer FROM users WHERE username = $1 AND active = TRUE",
        )
        .bind(username)
        .fetch_optional(pool)
        .await?);
        Ok(answer.flatten())
    }

    /// The registered sign key (PEM, verbatim) of an active user; `None` when there is
    /// no active user of that name.
    pub async fn active_sign_key(&self, username: &Username) -> Result<Option<String>, StoreError> {
        Ok(with_pool!(self, pool => sqlx::query_scalar(
            "SELECT public_key_sign FROM users WHERE username = $1 AND active = TRUE",
        )
        .bind(username.as_str())
        .fetch_optional(pool)
        .await?))
    }

    /// Stores `prekey` as the user's newest unless the stored one is newer. One
    /// conditional upsert, so concurrent uploads keep the newest whatever their order;
    /// an expired stored prekey counts as none. The user must be active at that moment.
    pub async fn put_prekey(&self, prekey: &NewPrekey<'_>) -> Result<PrekeyOutcome, StoreError> {
        let written = with_pool!(self, pool => sqlx::query(
            "INSERT INTO prekeys (username, created_ms, expires_ms, body, stored_ms) \
             SELECT username, $2, $3, $4, $5 FROM users WHERE username = $1 AND active = TRUE \
             ON CONFLICT (username) DO UPDATE SET created_ms = excluded.created_ms, \
             expires_ms = excluded.expires_ms, body = excluded.body, stored_ms = excluded.stored_ms \
             WHERE prekeys.created_ms < excluded.created_ms OR prekeys.expires_ms <= excluded.stored_ms",
        )
        .bind(prekey.username.as_str())
        .bind(prekey.created_ms)
        .bind(prekey.expires_ms)
        .bind(prekey.body)
        .bind(prekey.now_ms)
        .execute(pool)
        .await?
        .rows_affected());
        if written == 1 {
            return Ok(PrekeyOutcome::Stored);
        }
        // Nothing written: say why (a race can only change which refusal it is).
        let stored: Option<(i64, Vec<u8>)> = with_pool!(self, pool => sqlx::query_as(
            "SELECT p.created_ms, p.body FROM prekeys p JOIN users u ON u.username = p.username \
             WHERE p.username = $1 AND u.active = TRUE",
        )
        .bind(prekey.username.as_str())
        .fetch_optional(pool)
        .await?);
        Ok(match stored {
            None => PrekeyOutcome::NoUser,
            Some((_, body)) if body == prekey.body => PrekeyOutcome::Unchanged,
            Some((stored_created_ms, _)) => PrekeyOutcome::Outdated { stored_created_ms },
        })
    }

    /// The stored signed prekey of an active user, verbatim, unless it has expired at
    /// `now_ms`.
    pub async fn prekey(
        &self,
        username: &Username,
        now_ms: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(with_pool!(self, pool => sqlx::query_scalar(
            "SELECT p.body FROM prekeys p JOIN users u ON u.username = p.username \
             WHERE p.username = $1 AND u.active = TRUE AND p.expires_ms > $2",
        )
        .bind(username.as_str())
        .bind(now_ms)
        .fetch_optional(pool)
        .await?))
    }

    /// Deletes pending registrations that expired at or before `now_ms`; returns how many.
    pub async fn remove_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        Ok(with_pool!(self, pool => sqlx::query(
            "DELETE FROM users WHERE active = FALSE AND expires_ms <= $1",
        )
        .bind(now_ms)
        .execute(pool)
        .await?
        .rows_affected()))
    }

    /// Closes the pool, waiting for connections in use.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await);
    }
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password fails only for URLs that cannot have one, and this one has.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::Token;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }

    /// The store's rules, on an in-memory SQLite (the integration tests run the same
    /// paths against both backends through the HTTP API).
    #[tokio::test]
    async fn registration_activation_and_deletion_rules() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let alice = Username::parse("alice").unwrap();
        let (act, del) = (
            Token::generate().unwrap().hash(),
            Token::generate().unwrap().hash(),
        );
        let user = |name: &'static Username, email: &'static str, now: i64| NewUser {
            username: name,
            email,
            email_key: email,
            public_key_message: "m",
            public_key_sign: "s",
            activation_hash: Box::leak(Box::new(act.clone())),
            delete_hash: Box::leak(Box::new(del.clone())),
            created_ms: now,
            expires_ms: now + 1000,
        };
        let alice: &'static Username = Box::leak(Box::new(alice));
        assert_eq!(
            store.register(&user(alice, "a@x.org", 0), 3).await.unwrap(),
            RegisterOutcome::Created
        );
        assert_eq!(
            store
                .register(&user(alice, "b@x.org", 10), 3)
                .await
                .unwrap(),
            RegisterOutcome::NameTaken
        );
        // Expired: the name is free again.
        assert_eq!(
            store
                .register(&user(alice, "b@x.org", 1000), 3)
                .await
                .unwrap(),
            RegisterOutcome::Created
        );
        assert!(store.answer("alice").await.unwrap().is_none());
        let Some(UserState::Pending {
            activation_hash,
            expires_ms,
            ..
        }) = store.user(alice).await.unwrap()
        else {
            panic!("not pending")
        };
        assert_eq!(expires_ms, 2000);
        assert!(
            !store
                .activate(alice, &activation_hash, b"answer", 2000)
                .await
                .unwrap(),
            "expired"
        );
        assert!(store
            .activate(alice, &activation_hash, b"answer", 1999)
            .await
            .unwrap());
        assert!(
            !store
                .activate(alice, &activation_hash, b"answer", 1999)
                .await
                .unwrap(),
            "twice"
        );
        assert_eq!(
            store.answer("alice").await.unwrap().as_deref(),
            Some(&b"answer"[..])
        );
        assert_eq!(
            store
                .register(&user(alice, "b@x.org", 5000), 3)
                .await
                .unwrap(),
            RegisterOutcome::NameTaken
        );
        assert!(
            !store.delete(alice, act.as_bytes()).await.unwrap(),
            "wrong token"
        );
        assert!(store.delete(alice, del.as_bytes()).await.unwrap());
        assert!(store.user(alice).await.unwrap().is_none());

        // Per-address cap, and cleanup.
        let names: Vec<&'static Username> = ["u01", "u02", "u03"]
            .iter()
            .map(|n| &*Box::leak(Box::new(Username::parse(n).unwrap())))
            .collect();
        assert_eq!(
            store
                .register(&user(names[0], "c@x.org", 100), 2)
                .await
                .unwrap(),
            RegisterOutcome::Created
        );
        assert_eq!(
            store
                .register(&user(names[1], "c@x.org", 200), 2)
                .await
                .unwrap(),
            RegisterOutcome::Created
        );
        assert_eq!(
            store
                .register(&user(names[2], "c@x.org", 300), 2)
                .await
                .unwrap(),
            RegisterOutcome::TooManyPending {
                first_expiry_ms: 1100
            }
        );
        assert_eq!(store.remove_expired(1100).await.unwrap(), 1);
        assert_eq!(
            store
                .register(&user(names[2], "c@x.org", 1100), 2)
                .await
                .unwrap(),
            RegisterOutcome::Created
        );
        store.unregister(names[2], &act).await.unwrap();
        assert!(store.user(names[2]).await.unwrap().is_none());
        store.ping().await.unwrap();
    }

    /// Prekeys: active users only, newest kept, same bytes idempotent, expired hidden
    /// and replaceable, deleted with the user.
    #[tokio::test]
    async fn prekeys_follow_their_user() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let bob = Username::parse("bob").unwrap();
        let (act, del) = (
            Token::generate().unwrap().hash(),
            Token::generate().unwrap().hash(),
        );
        let user = NewUser {
            username: &bob,
            email: "b@x.org",
            email_key: "b@x.org",
            public_key_message: "m",
            public_key_sign: "s",
            activation_hash: &act,
            delete_hash: &del,
            created_ms: 0,
            expires_ms: 1000,
        };
        let put = |created_ms: i64, expires_ms: i64, body: &'static [u8], now_ms: i64| {
            let store = store.clone();
            let bob = bob.clone();
            async move {
                store
                    .put_prekey(&NewPrekey {
                        username: &bob,
                        created_ms,
                        expires_ms,
                        body,
                        now_ms,
                    })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(put(10, 100, b"a", 10).await, PrekeyOutcome::NoUser);
        assert_eq!(
            store.register(&user, 0).await.unwrap(),
            RegisterOutcome::Created
        );
        assert_eq!(store.active_sign_key(&bob).await.unwrap(), None);
        assert_eq!(
            put(10, 100, b"a", 10).await,
            PrekeyOutcome::NoUser,
            "pending"
        );
        assert!(store
            .activate(&bob, act.as_bytes(), b"answer", 5)
            .await
            .unwrap());
        assert_eq!(
            store.active_sign_key(&bob).await.unwrap().as_deref(),
            Some("s")
        );
        assert_eq!(put(10, 100, b"a", 10).await, PrekeyOutcome::Stored);
        assert_eq!(put(10, 100, b"a", 11).await, PrekeyOutcome::Unchanged);
        assert_eq!(
            put(10, 100, b"other", 11).await,
            PrekeyOutcome::Outdated {
                stored_created_ms: 10
            }
        );
        assert_eq!(
            put(9, 100, b"older", 11).await,
            PrekeyOutcome::Outdated {
                stored_created_ms: 10
            }
        );
        assert_eq!(
            store.prekey(&bob, 50).await.unwrap().as_deref(),
            Some(&b"a"[..])
        );
        assert_eq!(put(20, 200, b"b", 20).await, PrekeyOutcome::Stored);
        assert_eq!(
            store.prekey(&bob, 50).await.unwrap().as_deref(),
            Some(&b"b"[..])
        );
        // Expired: not served, and an older one may take its place.
        assert_eq!(store.prekey(&bob, 200).await.unwrap(), None);
        assert_eq!(put(15, 400, b"c", 200).await, PrekeyOutcome::Stored);
        assert_eq!(
            store.prekey(&bob, 200).await.unwrap().as_deref(),
            Some(&b"c"[..])
        );
        assert!(store.delete(&bob, del.as_bytes()).await.unwrap());
        assert_eq!(store.prekey(&bob, 200).await.unwrap(), None);
        let rows: i64 = with_pool!(&store, pool => sqlx::query_scalar("SELECT COUNT(*) FROM prekeys")
            .fetch_one(pool)
            .await
            .unwrap());
        assert_eq!(rows, 0, "the prekey went with its user");
    }
}
