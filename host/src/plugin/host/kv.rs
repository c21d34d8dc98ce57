//! `roost:persona/kv`: the persona's own namespace in the state store, if granted.

use std::sync::Arc;

use crate::plugin::bindings::kv::{Error, Host};
use crate::plugin::context::KvBackend;
use crate::plugin::state::HostState;

impl HostState {
    /// The persona's kv backend, unless it is not granted or this call has spent its
    /// host budget (the guest is then stopped at its next epoch tick).
    fn kv(&self) -> Result<Arc<dyn KvBackend>, Error> {
        if self.host_budget_spent() {
            return Err(Error::Storage(format!(
                "the host time limit of {} ms for this call is spent",
                self.limits.host_per_call.as_millis()
            )));
        }
        self.ctx
            .grants
            .kv
            .clone()
            .ok_or_else(|| Error::Denied(self.ctx.denied("kv")))
    }
}

impl Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, Error> {
        let kv = self.kv()?;
        self.host_work(kv.get(key)).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), Error> {
        let kv = self.kv()?;
        self.host_work(kv.set(key, value)).await
    }

    async fn delete(&mut self, key: String) -> Result<bool, Error> {
        let kv = self.kv()?;
        self.host_work(kv.delete(key)).await
    }

    async fn list(&mut self, prefix: String) -> Result<Vec<String>, Error> {
        let kv = self.kv()?;
        self.host_work(kv.list(prefix)).await
    }
}
