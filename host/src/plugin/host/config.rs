//! `roost:persona/config`: the persona's own `[personas.NAME.settings]` strings and
//! the bot's network name. Settings hold no secrets: secrets live elsewhere in the
//! config and are never copied into a persona's context.

use crate::plugin::bindings::config::Host;
use crate::plugin::state::HostState;

impl Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.ctx.settings.get(&key).cloned()
    }

    async fn keys(&mut self) -> Vec<String> {
        self.ctx.settings.keys().cloned().collect()
    }

    async fn bot_name(&mut self) -> String {
        self.ctx.bot_name()
    }
}
