//! A call's deadline, as the caller's `grpc-timeout` header states it.

use std::time::Duration;

/// Reads a `grpc-timeout` header ("<digits><unit>", at most 8 digits as the gRPC spec says,
/// unit one of H M S m u n); anything else is no deadline.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let at = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(at("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(at("3M"), Some(Duration::from_secs(180)));
        assert_eq!(at("15S"), Some(Duration::from_secs(15)));
        assert_eq!(at("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(at("7u"), Some(Duration::from_micros(7)));
        assert_eq!(at("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(at("5x"), None);
        assert_eq!(at("S"), None);
        assert_eq!(at("123456789S"), None, "more than 8 digits");
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
