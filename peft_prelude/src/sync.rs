//! Locks that outlive a panicked holder.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the data over from a holder that panicked: the values kept behind
/// our mutexes (a run's status and commands, a widget's state, a file reader) stay valid
/// whatever step panicked, and a notebook should go on showing them.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
