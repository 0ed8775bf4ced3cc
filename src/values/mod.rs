//! Values every layer shares, at the bottom of the crate: secrets that
//! never print, durations as settings and operators write them, and
//! numbers and booleans read from the text an environment variable
//! carries.

pub mod duration;
pub mod lenient;
pub mod secret;
