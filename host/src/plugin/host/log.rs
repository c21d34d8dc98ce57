//! `roost:persona/log`: rate-limited lines tagged with the persona's name.

use crate::plugin::bindings::log::{Host, Level};
use crate::plugin::state::HostState;

impl Host for HostState {
    async fn log(&mut self, level: Level, text: String) {
        if self.host_budget_spent() {
            return;
        }
        let start = std::time::Instant::now();
        self.ctx.log.line(level, &text);
        self.charge_host(start.elapsed());
    }
}
