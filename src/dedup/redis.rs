//! The shared dedup store: Redis, so that several gateway replicas behave as one and ids survive
//! restarts. The claim is `SET key value NX PX ttl`, atomic across replicas.
//!
//! The connection is made lazily and re-made after failures (redis' ConnectionManager), so Redis
//! being down at start does not stop the gateway: requests follow `dedup.on_store_error` and
//! `/readyz` reports the store unreachable.

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError};
use tokio::sync::Mutex;

use super::{Claim, Entry, Fingerprint, StoreError};
use crate::bars::ids::RequestId;

/// Every key the gateway writes starts with this.
pub const KEY_PREFIX: &str = "bars-gateway:dedup:";

/// Time allowed for one Redis command (including a reconnect).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis-backed store.
pub struct RedisStore {
    client: Client,
    connection: Mutex<Option<ConnectionManager>>,
    ttl: Duration,
    in_flight: Duration,
}

fn store_error(e: RedisError) -> StoreError {
    StoreError(e.to_string())
}

impl RedisStore {
    /// A store for `url`; does not connect yet.
    pub fn new(url: &str, ttl: Duration, in_flight: Duration) -> Result<RedisStore, StoreError> {
        Ok(RedisStore {
            client: Client::open(url).map_err(store_error)?,
            connection: Mutex::new(None),
            ttl,
            in_flight,
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1);
        let c = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(store_error)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn run<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, StoreError> {
        let attempt = async {
            let mut c = self.connection().await?;
            cmd.query_async::<T>(&mut c).await.map_err(store_error)
        };
        tokio::time::timeout(COMMAND_TIMEOUT * 2, attempt)
            .await
            .map_err(|_| StoreError("redis did not answer in time".into()))?
    }

    fn key(id: RequestId) -> String {
        format!("{KEY_PREFIX}{id}")
    }

    fn encode(entry: &Entry) -> Result<String, StoreError> {
        serde_json::to_string(entry).map_err(|e| StoreError(e.to_string()))
    }

    /// `SET NX PX` the in-flight entry; if the key exists, read what is there.
    pub async fn claim(
        &self,
        id: RequestId,
        fingerprint: Fingerprint,
    ) -> Result<Claim, StoreError> {
        let key = Self::key(id);
        let value = Self::encode(&Entry::InFlight { fingerprint })?;
        // The key can vanish between SET NX and GET (released or expired): then claim again.
        for _ in 0..3 {
            let set: Option<String> = self
                .run(
                    ::redis::cmd("SET")
                        .arg(&key)
                        .arg(&value)
                        .arg("NX")
                        .arg("PX")
                        .arg(self.in_flight.as_millis() as u64),
                )
                .await?;
            if set.is_some() {
                return Ok(Claim::First);
            }
            let existing: Option<String> = self.run(::redis::cmd("GET").arg(&key)).await?;
            if let Some(text) = existing {
                let entry: Entry = serde_json::from_str(&text)
                    .map_err(|e| StoreError(format!("unreadable entry under {key}: {e}")))?;
                return Ok(Claim::from_existing(Some(entry), fingerprint));
            }
        }
        Err(StoreError(format!(
            "{key} kept changing while being claimed"
        )))
    }

    /// Replaces the in-flight entry with the answer, for the full ttl.
    pub async fn complete(&self, id: RequestId, entry: Entry) -> Result<(), StoreError> {
        let _: () = self
            .run(
                ::redis::cmd("SET")
                    .arg(Self::key(id))
                    .arg(Self::encode(&entry)?)
                    .arg("PX")
                    .arg(self.ttl.as_millis() as u64),
            )
            .await?;
        Ok(())
    }

    /// Deletes the entry.
    pub async fn release(&self, id: RequestId) -> Result<(), StoreError> {
        let _: i64 = self.run(::redis::cmd("DEL").arg(Self::key(id))).await?;
        Ok(())
    }

    /// PING.
    pub async fn ping(&self) -> bool {
        self.run::<String>(&::redis::cmd("PING")).await.is_ok()
    }
}
