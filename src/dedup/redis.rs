//! The shared dedup store: Redis, so that several gateway replicas behave as one and ids survive
//! restarts. The claim is one Lua script (`SET NX PX`, or the swap of an uncertain entry), atomic
//! across replicas.
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

/// The claim, atomic in Redis: 1 = claimed, 2 = claimed over an uncertain entry of the same
/// request (ARGV[3] is that entry, encoded exactly as the gateway writes it), else 0 and the entry.
const CLAIM_SCRIPT: &str = r"
local existing = redis.call('GET', KEYS[1])
if not existing then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, false}
end
if existing == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {2, false}
end
return {0, existing}
";

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

    /// Claims atomically in one script: `SET NX PX` the in-flight entry; if the key holds an
    /// uncertain entry of the same request, replace it with the claim (exactly one retry wins);
    /// otherwise return what is there.
    pub async fn claim(
        &self,
        id: RequestId,
        fingerprint: Fingerprint,
    ) -> Result<Claim, StoreError> {
        let key = Self::key(id);
        let value = Self::encode(&Entry::InFlight { fingerprint })?;
        let uncertain = Self::encode(&Entry::Uncertain { fingerprint })?;
        let (claimed, existing): (i64, Option<String>) = self
            .run(
                ::redis::cmd("EVAL")
                    .arg(CLAIM_SCRIPT)
                    .arg(1)
                    .arg(&key)
                    .arg(&value)
                    .arg(self.in_flight.as_millis() as u64)
                    .arg(&uncertain),
            )
            .await?;
        match (claimed, existing) {
            (1, _) => Ok(Claim::First),
            (2, _) => Ok(Claim::AfterUncertain),
            (_, Some(text)) => {
                let entry: Entry = serde_json::from_str(&text)
                    .map_err(|e| StoreError(format!("unreadable entry under {key}: {e}")))?;
                Ok(Claim::from_existing(Some(entry), fingerprint))
            }
            (_, None) => Err(StoreError(format!("{key}: unexpected claim reply"))),
        }
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
