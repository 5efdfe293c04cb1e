//! Locking the daemon's in-memory maps.
//!
//! Every `std::sync::Mutex` in nesd guards plain values (maps, counters, queues) that a
//! panic elsewhere cannot leave half-changed, so a poisoned lock is taken as it is rather
//! than turned into a second panic. One helper, used by every module.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning (see the module docs).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
