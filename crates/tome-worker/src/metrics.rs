//! The worker's Prometheus metrics: named statics, described once at start-up
//! ([`describe`]); the exporter itself is installed by the binary.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

pub const SHARDS_RUNNING: &str = "tome_worker_shards_running";
pub const SHARDS_TOTAL: &str = "tome_worker_shards_total";
pub const SHARD_SECONDS: &str = "tome_worker_shard_seconds";
/// Labelled `kind="elements"` (the plan's count) and `kind="wire"` (framing included).
pub const PEER_BYTES: &str = "tome_peer_bytes_sent_total";
/// The coordinator counts under the same name.
pub const HEAP_RELEASES: &str = "tome_heap_releases_total";

pub fn describe() {
    describe_gauge!(SHARDS_RUNNING, "Shards running on this worker now.");
    describe_counter!(SHARDS_TOTAL, "Shards this worker has started.");
    describe_histogram!(SHARD_SECONDS, Unit::Seconds, "Wall time of a shard, from start to result.");
    describe_counter!(PEER_BYTES, Unit::Bytes, "Bytes this worker's ranks sent to other ranks.");
    describe_counter!(HEAP_RELEASES, "Times the heap's freed pages went back to the kernel (the last shard here had ended).");
}

/// Every series this worker exports, at zero: present from start, before the first shard.
pub fn start_at_zero() {
    gauge!(SHARDS_RUNNING).set(0.0);
    counter!(SHARDS_TOTAL).increment(0);
    let _ = histogram!(SHARD_SECONDS);
    for kind in ["elements", "wire"] {
        counter!(PEER_BYTES, "kind" => kind).increment(0);
    }
    counter!(HEAP_RELEASES).increment(0);
}

/// Hands the heap's freed pages back to the kernel (`tome_server::heap`) and counts it.
pub(crate) fn release_heap() {
    tome_server::heap::release_freed_memory();
    counter!(HEAP_RELEASES).increment(1);
}

pub(crate) fn shard_started() {
    gauge!(SHARDS_RUNNING).increment(1.0);
    counter!(SHARDS_TOTAL).increment(1);
}

pub(crate) fn shard_ended() {
    gauge!(SHARDS_RUNNING).decrement(1.0);
}

pub(crate) fn shard_seconds(d: Duration) {
    histogram!(SHARD_SECONDS).record(d.as_secs_f64());
}

pub(crate) fn peer_bytes(elements: u64, wire: u64) {
    counter!(PEER_BYTES, "kind" => "elements").increment(elements);
    counter!(PEER_BYTES, "kind" => "wire").increment(wire);
}
