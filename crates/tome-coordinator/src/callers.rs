//! Admission by caller: how many jobs each caller (the API key's name) runs now, so that one
//! caller cannot take every job place of a shared server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tome_server::auth::Caller;

use crate::error::CoordError;

/// Jobs in flight per caller, with the most one caller may run at once (0: no limit of its
/// own beyond the server's).
#[derive(Clone, Default)]
pub(crate) struct CallerJobs {
    running: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    limit: usize,
}

/// One job's place among its caller's; given back when dropped.
pub(crate) struct CallerPlace {
    running: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    caller: Arc<str>,
}

impl CallerJobs {
    pub(crate) fn new(limit: usize) -> Self {
        CallerJobs { running: Arc::default(), limit }
    }

    /// A place for one more job of `caller`, or RESOURCE_EXHAUSTED (for now) when it already
    /// runs as many as one caller may.
    pub(crate) fn enter(&self, caller: &Caller) -> Result<CallerPlace, CoordError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let n = running.entry(caller.0.clone()).or_default();
        if self.limit > 0 && *n >= self.limit {
            return Err(CoordError::Busy(format!("caller {} already runs {n} jobs, the most one caller may run at once here; retry later", caller.name())));
        }
        *n += 1;
        Ok(CallerPlace { running: self.running.clone(), caller: caller.0.clone() })
    }
}

impl Drop for CallerPlace {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_runs_at_most_its_share_and_others_are_not_held_back() {
        let jobs = CallerJobs::new(2);
        let (a, b) = (Caller("team-a".into()), Caller("team-b".into()));
        let first = jobs.enter(&a).unwrap();
        let _second = jobs.enter(&a).unwrap();
        let refused = tonic::Status::from(jobs.enter(&a).err().unwrap());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("caller team-a already runs 2 jobs"), "{refused:?}");
        assert!(jobs.enter(&b).is_ok(), "another caller is not held back");
        drop(first);
        assert!(jobs.enter(&a).is_ok(), "a place comes back when its job ends");
        let unlimited = CallerJobs::new(0);
        let places: Vec<_> = (0..10).map(|_| unlimited.enter(&a).unwrap()).collect();
        assert_eq!(places.len(), 10);
        drop(places);
        assert!(unlimited.running.lock().unwrap().is_empty(), "no entry is kept for a caller without jobs");
    }
}
