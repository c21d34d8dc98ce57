//! `roost:persona/types` has no functions; its generated `Host` trait is empty.

use crate::plugin::bindings::roost::persona::types::Host;
use crate::plugin::state::HostState;

impl Host for HostState {}
