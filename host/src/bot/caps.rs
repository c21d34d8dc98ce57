//! Capability backends a bot provides to its persona from its own state: `history`
//! ([`HistoryCap`]) and `kv` ([`KvCap`]).

use std::sync::Arc;

use crate::plugin::bindings::{Message, history, kv};
use crate::plugin::context::{BoxFuture, HistoryBackend, KvBackend};
use crate::store::{KvQuota, KvSetError, Store};

use super::history::History;

/// `history.recent` over the bot's [`History`], limited to the rooms it is in.
pub struct HistoryCap {
    pub history: Arc<History>,
    /// The rooms the bot is in (owned by its session).
    pub rooms: crate::session::Membership,
    /// Most messages one call returns.
    pub limit: u32,
}

impl HistoryBackend for HistoryCap {
    fn recent(
        &self,
        room: String,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Message>, history::Error>> {
        Box::pin(async move {
            let joined = self.rooms.contains(&room);
            if !joined {
                return Err(history::Error::NotInRoom(room));
            }
            let n = limit.min(self.limit) as usize;
            Ok(self.history.recent(&room, n).unwrap_or_default())
        })
    }
}

/// Longest key `kv` accepts, in bytes.
pub const KV_MAX_KEY_BYTES: usize = 512;

/// `kv` over the state [`Store`], in the namespace of one persona: its label (the file
/// stem), chosen by the host, never by the persona. Every call runs on tokio's blocking
/// pool. Keys and values survive host restarts and persona reloads.
///
/// Errors: `invalid-key` (empty, or longer than [`KV_MAX_KEY_BYTES`]),
/// `value-too-large` and `quota-exceeded` (sizes count key plus value bytes), and
/// `storage` with a short reason (the detail, which names host paths, goes to the log).
pub struct KvCap {
    pub store: Store,
    /// The namespace: the persona's label.
    pub persona: String,
    /// Most bytes (keys + values) the persona may hold.
    pub quota_bytes: u64,
    /// Largest single value.
    pub value_bytes: u64,
}

impl KvCap {
    fn quota(&self) -> KvQuota {
        KvQuota {
            total_bytes: self.quota_bytes,
            value_bytes: self.value_bytes,
        }
    }

    /// Runs `f(store, persona)` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Store, &str) -> Result<T, kv::Error> + Send + 'static,
    ) -> Result<T, kv::Error> {
        let store = self.store.clone();
        let persona = self.persona.clone();
        match tokio::task::spawn_blocking(move || f(&store, &persona)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(persona = %self.persona, "kv {what} task failed: {e}");
                Err(kv::Error::Storage(format!("{what} failed")))
            }
        }
    }
}

pub(crate) fn check_key(key: &str) -> Result<(), kv::Error> {
    if key.is_empty() {
        return Err(kv::Error::InvalidKey("the key is empty".into()));
    }
    if key.len() > KV_MAX_KEY_BYTES {
        return Err(kv::Error::InvalidKey(format!(
            "the key is {} bytes long; at most {KV_MAX_KEY_BYTES} are allowed",
            key.len()
        )));
    }
    Ok(())
}

/// A store failure as the persona sees it: a short reason; the detail goes to the log.
fn storage(persona: &str, what: &str, e: &crate::store::StoreError) -> kv::Error {
    tracing::warn!(persona, "kv {what} failed: {e}");
    kv::Error::Storage(format!("the state store could not {what}"))
}

impl KvBackend for KvCap {
    fn max_value_bytes(&self) -> u64 {
        self.value_bytes
    }

    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, kv::Error>> {
        Box::pin(async move {
            check_key(&key)?;
            self.blocking("read", move |store, persona| {
                store
                    .kv_get(persona, &key)
                    .map_err(|e| storage(persona, "read", &e))
            })
            .await
        })
    }

    fn set(&self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<(), kv::Error>> {
        Box::pin(async move {
            check_key(&key)?;
            let quota = self.quota();
            self.blocking("write", move |store, persona| {
                store
                    .kv_set(persona, &key, &value, quota)
                    .map_err(|e| match e {
                        KvSetError::ValueTooLarge { limit, .. } => {
                            kv::Error::ValueTooLarge(format!(
                                "{} bytes; the limit is {limit} bytes per value",
                                value.len()
                            ))
                        }
                        KvSetError::QuotaExceeded {
                            used,
                            would_use,
                            quota,
                        } => kv::Error::QuotaExceeded(format!(
                            "{used} of {quota} bytes in use; this would make {would_use}"
                        )),
                        KvSetError::Store(e) => storage(persona, "write", &e),
                    })
            })
            .await
        })
    }

    fn delete(&self, key: String) -> BoxFuture<'_, Result<bool, kv::Error>> {
        Box::pin(async move {
            check_key(&key)?;
            self.blocking("delete", move |store, persona| {
                store
                    .kv_delete(persona, &key)
                    .map_err(|e| storage(persona, "delete", &e))
            })
            .await
        })
    }

    fn list(&self, prefix: String) -> BoxFuture<'_, Result<Vec<String>, kv::Error>> {
        Box::pin(async move {
            if prefix.len() > KV_MAX_KEY_BYTES {
                return Ok(Vec::new());
            }
            self.blocking("list", move |store, persona| {
                store
                    .kv_list(persona, &prefix)
                    .map_err(|e| storage(persona, "list", &e))
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(store: &Store, persona: &str) -> KvCap {
        KvCap {
            store: store.clone(),
            persona: persona.into(),
            quota_bytes: 64,
            value_bytes: 16,
        }
    }

    #[tokio::test]
    async fn typed_errors_and_namespaces() {
        let store = Store::open_in_memory().unwrap();
        let (a, b) = (cap(&store, "a"), cap(&store, "b"));
        assert!(matches!(
            a.set(String::new(), vec![]).await,
            Err(kv::Error::InvalidKey(_))
        ));
        assert!(matches!(
            a.get("k".repeat(513)).await,
            Err(kv::Error::InvalidKey(_))
        ));
        assert!(a.get("k".repeat(512)).await.unwrap().is_none());
        let Err(kv::Error::ValueTooLarge(why)) = a.set("k".into(), vec![0; 17]).await else {
            panic!("expected value-too-large")
        };
        assert!(why.contains("16 bytes per value"), "{why}");
        for i in 0..4 {
            a.set(format!("k{i}"), vec![0; 14]).await.unwrap();
        }
        let Err(kv::Error::QuotaExceeded(why)) = a.set("k4".into(), vec![0; 14]).await else {
            panic!("expected quota-exceeded")
        };
        assert!(why.contains("64 of 64 bytes"), "{why}");
        assert_eq!(b.list(String::new()).await.unwrap(), Vec::<String>::new());
        assert_eq!(b.get("k0".into()).await.unwrap(), None);
        assert!(!b.delete("k0".into()).await.unwrap());
        assert_eq!(a.list("k".into()).await.unwrap(), ["k0", "k1", "k2", "k3"]);
        assert!(a.delete("k0".into()).await.unwrap());
    }
}
