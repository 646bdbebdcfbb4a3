//! API keys: callers of the public API prove who they are with `authorization: Bearer KEY`,
//! checked against the keys the server was given. A key file holds one key a line (blank lines
//! and `#` comments aside); only the keys' SHA-256 digests are kept, and a caller's key is
//! compared with every one of them in constant time.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The shortest key accepted: a key is a secret, not a password.
pub const MIN_KEY_CHARS: usize = 16;
/// The header a key travels in.
pub const AUTHORIZATION: &str = "authorization";

/// The keys a server accepts (their digests; `Debug` shows only how many).
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// The keys in `path`; an error names the file and the line.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("API keys {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("API keys {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut digests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            if key.chars().count() < MIN_KEY_CHARS || !key.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!("line {}: a key is at least {MIN_KEY_CHARS} printable ASCII characters without spaces", i + 1));
            }
            digests.push(digest(key));
        }
        if digests.is_empty() {
            return Err("no key in the file".into());
        }
        Ok(ApiKeys { digests })
    }

    /// UNAUTHENTICATED unless the call carries one of the keys.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let header = metadata.get(AUTHORIZATION).ok_or_else(|| Status::unauthenticated("this server needs an API key: send `authorization: Bearer KEY`"))?;
        let key = header.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer KEY`"))?;
        let offered = digest(key.trim());
        // Every digest is compared, whichever matches: the time does not tell which key is close.
        let matched = self.digests.iter().fold(false, |found, d| found | (d.iter().zip(&offered).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0));
        if matched {
            Ok(())
        } else {
            Err(Status::unauthenticated("the API key is not one this server accepts"))
        }
    }
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A server-side interceptor that lets through only calls with one of the keys (every call when
/// the server was given none).
#[derive(Clone)]
pub struct RequireApiKey(pub Option<Arc<ApiKeys>>);

impl Interceptor for RequireApiKey {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(keys) = &self.0 {
            keys.check(request.metadata())?;
        }
        Ok(request)
    }
}

/// A client-side interceptor that sends an API key with every call (none: calls go as they are).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(key: Option<&str>) -> Result<Self, String> {
        match key {
            None => Ok(BearerToken(None)),
            Some(k) => MetadataValue::try_from(format!("Bearer {}", k.trim())).map(|v| BearerToken(Some(v))).map_err(|_| "an API key is printable ASCII".into()),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_with(header: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(h) = header {
            m.insert(AUTHORIZATION, h.parse().unwrap());
        }
        m
    }

    #[test]
    fn only_the_keys_in_the_file_get_in() {
        let keys = ApiKeys::parse("# team a\nkey-aaaaaaaaaaaaaaaa\n\n  key-bbbbbbbbbbbbbbbb  \n").unwrap();
        assert!(keys.check(&call_with(Some("Bearer key-aaaaaaaaaaaaaaaa"))).is_ok());
        assert!(keys.check(&call_with(Some("Bearer key-bbbbbbbbbbbbbbbb"))).is_ok());
        for refused in [None, Some("Bearer key-cccccccccccccccc"), Some("Basic key-aaaaaaaaaaaaaaaa"), Some("key-aaaaaaaaaaaaaaaa")] {
            let err = keys.check(&call_with(refused)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{refused:?}");
            assert!(!err.message().contains("key-"), "a refusal never repeats a key: {}", err.message());
        }
    }

    #[test]
    fn weak_or_missing_keys_are_refused_when_the_file_is_read() {
        assert!(ApiKeys::parse("short\n").unwrap_err().contains("line 1"));
        assert!(ApiKeys::parse("# only a comment\n").unwrap_err().contains("no key"));
        assert!(ApiKeys::parse("a key with spaces in it\n").is_err());
    }

    #[test]
    fn a_client_sends_its_key_with_every_call() {
        let mut token = BearerToken::new(Some("key-aaaaaaaaaaaaaaaa")).unwrap();
        let req = token.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get(AUTHORIZATION).unwrap(), "Bearer key-aaaaaaaaaaaaaaaa");
        let mut none = BearerToken::default();
        assert!(none.call(Request::new(())).unwrap().metadata().get(AUTHORIZATION).is_none());
    }
}
