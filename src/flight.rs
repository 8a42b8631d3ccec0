//! Single flight: one shared call per key at a time, whoever else asks meanwhile awaits the
//! same outcome. Used by the registry cache (one control-plane call per id) and by wakes (one
//! wake per VM, SPEC §13).
//!
//! Cost: joining is one map read (plus one insert for the caller that starts the call); the
//! call leaves the map when it completes, so the map holds only calls in flight.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};

/// A call in flight; clones await the same outcome.
pub type Flight<T> = Shared<BoxFuture<'static, T>>;

pub struct Flights<T> {
    inflight: Arc<DashMap<String, Flight<T>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            inflight: Arc::default(),
        }
    }
}

impl<T> std::fmt::Debug for Flights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field("in_flight", &self.inflight.len())
            .finish()
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// The call in flight for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Flight<T>> {
        self.inflight.get(key).map(|f| f.clone())
    }

    /// The call in flight for `key`, or the one `start` makes now (then `true`). The call
    /// removes itself from the map as it completes, after whatever `start`'s future did last.
    pub fn join(
        &self,
        key: &str,
        start: impl FnOnce() -> BoxFuture<'static, T>,
    ) -> (Flight<T>, bool) {
        if let Some(f) = self.inflight.get(key) {
            return (f.clone(), false);
        }
        let slot = match self.inflight.entry(key.to_owned()) {
            Entry::Occupied(e) => return (e.get().clone(), false),
            Entry::Vacant(slot) => slot,
        };
        let call = start();
        let inflight = self.inflight.clone();
        let key = key.to_owned();
        let flight = async move {
            let outcome = call.await;
            inflight.remove(&key);
            outcome
        }
        .boxed()
        .shared();
        slot.insert(flight.clone());
        (flight, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_joins_share_one_call_and_the_next_starts_anew() {
        let flights: Flights<usize> = Flights::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let start = || {
            let calls = calls.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                calls.fetch_add(1, Ordering::SeqCst) + 1
            }
            .boxed()
        };
        let (a, started_a) = flights.join("k", start);
        let (b, started_b) = flights.join("k", start);
        assert!(started_a && !started_b);
        assert_eq!((a.await, b.await), (1, 1));
        assert!(flights.get("k").is_none());
        let (c, started) = flights.join("k", start);
        assert!(started);
        assert_eq!(c.await, 2);
    }
}
