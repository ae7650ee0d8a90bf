//! Destination sessions shared by every source thread, so that the daemon's destination
//! sessions are its writers plus a small fixed number, whatever the number of sources
//! (a thousand tenant databases against a destination at the default `max_connections`
//! of 100). Sessions are opened on first need, kept for reuse, and a thread that finds
//! them all taken waits for one.

use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use postgres::Client;

use super::connect::Endpoint;

/// How many source set-ups (slot and publication work, initial copies) run at once:
/// each holds one session for its whole set-up.
pub const SETUP_SESSIONS: usize = 4;
/// Sessions for the short catalog and bookkeeping queries of streaming sources.
pub const CATALOG_SESSIONS: usize = 2;

/// A bounded pool of destination sessions of one endpoint.
pub struct SessionPool {
    endpoint: Endpoint,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Client>,
    /// Sessions open or being opened, idle ones included.
    open: usize,
}

impl SessionPool {
    pub fn new(endpoint: Endpoint, max: usize) -> SessionPool {
        SessionPool {
            endpoint,
            max: max.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// Runs `f` on a session: an idle one, a new one while fewer than the maximum are
    /// open, or else the next one returned. A session whose work failed is closed rather
    /// than reused (it may be left inside a transaction the error aborted); `connect`
    /// makes the error of a session that could not be opened.
    pub fn with<T, E>(
        &self,
        connect: impl FnOnce(postgres::Error) -> E,
        f: impl FnOnce(&mut Client) -> Result<T, E>,
    ) -> Result<T, E> {
        let guard = Taken { pool: self };
        let mut client = self.take().map_err(connect)?;
        let result = f(&mut client);
        if result.is_ok() && !client.is_closed() {
            std::mem::forget(guard);
            self.state.lock().idle.push(client);
            self.freed.notify_one();
        }
        result
    }

    /// Sessions open now (idle or in use).
    pub fn open(&self) -> usize {
        self.state.lock().open
    }

    fn take(&self) -> Result<Client, postgres::Error> {
        let mut state = self.state.lock();
        loop {
            while let Some(client) = state.idle.pop() {
                if !client.is_closed() {
                    return Ok(client);
                }
                state.open -= 1;
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return self.endpoint.destination();
            }
            // Woken by a return; the timeout only bounds a missed wake-up.
            self.freed.wait_for(&mut state, Duration::from_secs(1));
        }
    }
}

/// A session slot in use: given up (the session closed or never opened) unless its
/// session is put back.
struct Taken<'a> {
    pool: &'a SessionPool,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.pool.state.lock().open -= 1;
        self.pool.freed.notify_one();
    }
}

/// The destination sessions of the source threads.
pub struct DestSessions {
    /// One per source set-up in progress (bounds set-ups and copies running at once).
    pub setup: SessionPool,
    /// Streaming sources' short queries.
    pub catalog: SessionPool,
}

impl DestSessions {
    pub fn new(endpoint: &Endpoint) -> DestSessions {
        DestSessions {
            setup: SessionPool::new(endpoint.clone(), SETUP_SESSIONS),
            catalog: SessionPool::new(endpoint.clone(), CATALOG_SESSIONS),
        }
    }

    pub fn open(&self) -> usize {
        self.setup.open() + self.catalog.open()
    }
}
