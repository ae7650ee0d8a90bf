//! Which source the current thread works for, so every log line about a source can
//! name it in fields of its own (`logs.format = "json"`), not only in its text.

use std::cell::RefCell;

thread_local! {
    static SOURCE: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// From now on, this thread's log lines are about source `database` with `sid`.
pub fn set_source(database: &str, sid: &str) {
    SOURCE.with(|s| *s.borrow_mut() = Some((database.to_string(), sid.to_string())));
}

/// Runs `f` with this thread's log lines about source `database`/`sid` (a line the
/// supervisor or a writer logs about one source), then restores what was set.
pub fn with_source<T>(database: &str, sid: &str, f: impl FnOnce() -> T) -> T {
    let before = source();
    set_source(database, sid);
    let r = f();
    SOURCE.with(|s| *s.borrow_mut() = before);
    r
}

/// The source of this thread's log lines: `(database, sid)`.
pub fn source() -> Option<(String, String)> {
    SOURCE.with(|s| s.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_has_its_own_source() {
        set_source("shop", "eu1");
        let other = std::thread::spawn(source).join().ok().flatten();
        assert_eq!(other, None);
        assert_eq!(source(), Some(("shop".to_string(), "eu1".to_string())));
        let inner = with_source("crm", "1", source);
        assert_eq!(inner, Some(("crm".to_string(), "1".to_string())));
        assert_eq!(source(), Some(("shop".to_string(), "eu1".to_string())));
    }
}
