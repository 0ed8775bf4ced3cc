//! The contract other teams rely on (`docs/contract.md`, machine-readable
//! in `docs/asyncapi.yaml` and `docs/schemas/`): the refund command and
//! its checks, the outcome event, money in integer minor units, and the
//! reconciliation report's row.

pub mod command;
pub mod event;
pub mod money;
pub mod report;
