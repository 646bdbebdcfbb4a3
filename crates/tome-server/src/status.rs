//! What a status says beyond its code, in metadata that one tome server writes and another (or a
//! client) reads: the code alone cannot tell these apart.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Most characters of a caller's own input repeated in an error message.
pub const MAX_ECHO_CHARS: usize = 64;

/// `input` fit to be repeated to its sender: at most [`MAX_ECHO_CHARS`] characters, the rest
/// counted rather than sent back (a status's message travels in a header of bounded size).
pub fn echo(input: &str) -> String {
    match input.char_indices().nth(MAX_ECHO_CHARS) {
        None => input.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &input[..cut], input.len()),
    }
}

/// INTERNAL for a server's own fault: the caller learns that it happened and where to look,
/// never the details (paths, backtraces, internal state), which go to this server's log.
pub fn internal(detail: &str) -> Status {
    tracing::error!(error = %detail, "internal error");
    Status::internal("internal error; this server's log has the cause")
}

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
    fn echoes_are_bounded_and_internal_details_stay_home() {
        assert_eq!(echo("bert-tiny"), "bert-tiny");
        let long = "m".repeat(1 << 20);
        let e = echo(&long);
        assert!(e.len() < 100 && e.ends_with("(1048576 bytes)"), "{e}");
        assert_eq!(echo(&"é".repeat(70)).chars().filter(|&c| c == 'é').count(), MAX_ECHO_CHARS, "cut on a character boundary");
        let s = internal("/home/build/src/kernel.rs:12: stack backtrace: ...");
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("/home") && !s.message().contains("backtrace"), "{}", s.message());
    }

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
