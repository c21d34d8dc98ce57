//! `roost:persona/llm`: completions through the host's provider, if granted.

use crate::plugin::bindings::llm::{Completion, Error, Host, Request};
use crate::plugin::state::HostState;

impl Host for HostState {
    async fn complete(&mut self, req: Request) -> Result<Completion, Error> {
        let Some(backend) = self.ctx.grants.llm.clone() else {
            return Err(Error::Denied(self.ctx.denied("llm")));
        };
        self.io_wait(backend.complete(req)).await
    }
}
