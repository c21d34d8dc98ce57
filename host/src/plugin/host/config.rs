//! `roost:persona/config`: the persona's own `[personas.NAME.settings]` strings and
//! the bot's network name. Settings hold no secrets: secrets live elsewhere in the
//! config and are never copied into a persona's context.

use crate::plugin::bindings::config::Host;
use crate::plugin::state::HostState;

impl Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        let start = std::time::Instant::now();
        let value = self.ctx.settings.get(&key).cloned();
        self.charge_host(start.elapsed());
        value
    }

    async fn keys(&mut self) -> Vec<String> {
        let start = std::time::Instant::now();
        let keys = self.ctx.settings.keys().cloned().collect();
        self.charge_host(start.elapsed());
        keys
    }

    async fn bot_name(&mut self) -> String {
        self.ctx.bot_name()
    }
}
