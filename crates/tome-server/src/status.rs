//! What a status says beyond its code, in metadata that one tome server writes and another (or a
//! client) reads: the code alone cannot tell these apart.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// The metadata key a refusal-for-now carries (seconds to wait), so callers can tell it from a
/// refusal for good.
pub const RETRY_AFTER: &str = "retry-after";

/// RESOURCE_EXHAUSTED for now, not for good: the same call may succeed later (a second from now).
pub fn busy(message: impl Into<String>) -> Status {
    let mut s = Status::resource_exhausted(message);
    s.metadata_mut().insert(RETRY_AFTER, MetadataValue::from_static("1"));
    s
}

/// The status is a refusal for now ([`busy`]): worth retrying later, elsewhere or here.
pub fn is_busy(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted && s.metadata().get(RETRY_AFTER).is_some()
}

/// The metadata key of a failure that is a consequence of another rank's: its value is the rank
/// of the job that failed or left first. UNAVAILABLE alone cannot say it: a worker shutting down or
/// one that died is UNAVAILABLE too, and is the cause.
pub const PEER_FAILED: &str = "tome-peer-failed";

/// UNAVAILABLE because rank `peer` of the job failed or left: a consequence, not the cause.
pub fn peer_failed(message: impl Into<String>, peer: usize) -> Status {
    let mut s = Status::unavailable(message);
    if let Ok(v) = MetadataValue::try_from(peer.to_string()) {
        s.metadata_mut().insert(PEER_FAILED, v);
    }
    s
}

/// The rank whose failure this status is a consequence of ([`peer_failed`]), if it is one.
pub fn failed_peer(s: &Status) -> Option<usize> {
    if s.code() != Code::Unavailable {
        return None;
    }
    s.metadata().get(PEER_FAILED)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_failure_names_the_rank_and_plain_unavailable_does_not() {
        let s = peer_failed("rank 2 left the group before rank 0 could receive", 2);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(failed_peer(&s), Some(2));
        assert_eq!(failed_peer(&Status::unavailable("worker w1 is shutting down")), None, "a cause, not a consequence");
        let mut garbled = Status::unavailable("x");
        garbled.metadata_mut().insert(PEER_FAILED, MetadataValue::from_static("two"));
        assert_eq!(failed_peer(&garbled), None);
        let mut other = Status::internal("x");
        other.metadata_mut().insert(PEER_FAILED, MetadataValue::from_static("2"));
        assert_eq!(failed_peer(&other), None, "only UNAVAILABLE");
    }

    #[test]
    fn only_a_refusal_marked_for_now_is_busy() {
        let s = busy("worker w1 already runs 4 shards");
        assert_eq!((s.code(), s.message()), (Code::ResourceExhausted, "worker w1 already runs 4 shards"));
        assert!(is_busy(&s));
        assert!(!is_busy(&Status::resource_exhausted("larger than this worker could ever take")), "a refusal for good");
        let mut other = Status::unavailable("x");
        other.metadata_mut().insert(RETRY_AFTER, MetadataValue::from_static("1"));
        assert!(!is_busy(&other), "only RESOURCE_EXHAUSTED");
    }
}
