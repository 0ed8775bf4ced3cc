//! Handlers of the `refund-worker` subcommands. `main.rs` holds the command
//! line's definition and dispatches here; each file holds one group of
//! subcommands (their own arguments included) and calls into the library.

pub(crate) mod admin;
pub(crate) mod ops;
pub(crate) mod run;
