//! Per-job credentials: the coordinator draws a [`JobSecret`] for every run of a job and hands
//! it to the job's ranks in their plan. A rank's peer streams open with it and the
//! coordinator's Cancel calls carry it, so only holders of the secret — the job's own ranks
//! and coordinator — can feed a rank frames or stop it, even among cluster members.

use subtle::ConstantTimeEq;

/// Bytes in a job's secret.
pub const SECRET_BYTES: usize = 32;

/// A job's secret. Compared in constant time only; `Debug` never shows it.
#[derive(Clone)]
pub struct JobSecret([u8; SECRET_BYTES]);

impl JobSecret {
    /// A fresh secret from the thread's CSPRNG (ChaCha, seeded by the operating system).
    pub fn random() -> Self {
        JobSecret(rand::random())
    }

    /// The secret a plan or request carries; `field` names it in the error.
    pub fn from_wire(bytes: &[u8], field: &str) -> Result<Self, String> {
        <[u8; SECRET_BYTES]>::try_from(bytes).map(JobSecret).map_err(|_| format!("{field}: a job secret has {SECRET_BYTES} bytes; this one has {}", bytes.len()))
    }

    pub fn to_wire(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// Whether `offered` is this secret, in time that does not depend on where they differ.
    pub fn matches(&self, offered: &[u8]) -> bool {
        offered.len() == SECRET_BYTES && bool::from(self.0.ct_eq(offered))
    }

    /// Whether two secrets are the same, in constant time.
    pub fn same(&self, other: &JobSecret) -> bool {
        self.matches(&other.0)
    }
}

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_matches_itself_only_and_never_shows() {
        let (a, b) = (JobSecret::random(), JobSecret::random());
        assert!(a.matches(&a.to_wire()) && a.same(&a.clone()));
        assert!(!a.matches(&b.to_wire()) && !a.same(&b));
        assert!(!a.matches(&a.to_wire()[..31]) && !a.matches(&[]));
        assert_eq!(format!("{a:?}"), "JobSecret(..)");
        assert!(JobSecret::from_wire(&a.to_wire(), "plan.secret").unwrap().same(&a));
        let e = JobSecret::from_wire(&[1, 2, 3], "plan.secret").unwrap_err();
        assert!(e.contains("plan.secret") && e.contains("32 bytes") && e.contains("has 3"), "{e}");
    }
}
