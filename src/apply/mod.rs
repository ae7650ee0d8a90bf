//! Writer pool.
