//! `roost:persona/history`: recent messages of the bot's rooms, if granted.

use crate::plugin::bindings::Message;
use crate::plugin::bindings::history::{Error, Host};
use crate::plugin::state::HostState;

impl Host for HostState {
    async fn recent(&mut self, room: String, limit: u32) -> Result<Vec<Message>, Error> {
        let Some(backend) = self.ctx.grants.history.clone() else {
            return Err(Error::Denied(self.ctx.denied("history")));
        };
        self.host_work(backend.recent(room, limit)).await
    }
}
