//! Source threads.
