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

#[cfg(test)]
mod tests {
    use super::*;

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
