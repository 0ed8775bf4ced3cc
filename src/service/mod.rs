//! The running process: the app (store, providers, listeners and the
//! broker sessions that feed the pipeline), its periodic tasks, the
//! shutdown signal, and the HTTP listeners.

pub mod app;
pub mod background;
pub mod http;
pub mod shutdown;
