//! `roost:persona/kv`: the persona's own namespace in the state store, if granted.

use std::sync::Arc;

use crate::plugin::bindings::kv::{Error, Host};
use crate::plugin::context::KvBackend;
use crate::plugin::state::HostState;

impl HostState {
    fn kv(&self) -> Result<Arc<dyn KvBackend>, Error> {
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
        self.host_wait(kv.get(key)).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), Error> {
        let kv = self.kv()?;
        self.host_wait(kv.set(key, value)).await
    }

    async fn delete(&mut self, key: String) -> Result<bool, Error> {
        let kv = self.kv()?;
        self.host_wait(kv.delete(key)).await
    }

    async fn list(&mut self, prefix: String) -> Result<Vec<String>, Error> {
        let kv = self.kv()?;
        self.host_wait(kv.list(prefix)).await
    }
}
