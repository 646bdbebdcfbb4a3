//! API keys: callers of the public API prove who they are with `authorization: Bearer KEY`,
//! checked against the keys the server was given. A key file holds one caller a line, `NAME KEY`
//! (or a bare `KEY`, named `line-N` after its line), blank lines and `#` comments aside; only
//! the keys' SHA-256 digests are kept, and a caller's key is compared with every one of them in
//! constant time. The key's [`Caller`] travels with the request (a request extension), so
//! metrics and logs tell callers apart without ever holding a key.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The shortest key accepted: a key is a secret, not a password.
pub const MIN_KEY_CHARS: usize = 16;
/// The header a key travels in.
pub const AUTHORIZATION: &str = "authorization";

/// The longest caller name.
pub const MAX_CALLER_CHARS: usize = 64;

/// Who made a call: the name its key has in the key file, or `anonymous` on a server without
/// keys. Names are short and plain (letters, digits, `.`, `_`, `-`), fit for a metric label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub Arc<str>);

impl Caller {
    pub fn anonymous() -> Self {
        Caller("anonymous".into())
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

/// The keys a server accepts (their digests and callers; `Debug` shows only how many).
pub struct ApiKeys {
    keys: Vec<([u8; 32], Caller)>,
}

fn plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_CALLER_CHARS && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl ApiKeys {
    /// The keys in `path`; an error names the file and the line.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("API keys {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("API keys {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<([u8; 32], Caller)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, key) = match line.split_whitespace().collect::<Vec<_>>()[..] {
                [key] => (format!("line-{}", i + 1), key),
                [name, key] => (name.to_string(), key),
                _ => return Err(format!("line {}: a line is `NAME KEY` or a bare `KEY`", i + 1)),
            };
            if !plain_name(&name) {
                return Err(format!("line {}: a caller's name has 1 to {MAX_CALLER_CHARS} letters, digits, `.`, `_` or `-`", i + 1));
            }
            if key.chars().count() < MIN_KEY_CHARS || !key.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!("line {}: a key is at least {MIN_KEY_CHARS} printable ASCII characters without spaces", i + 1));
            }
            if keys.iter().any(|(_, c)| c.name() == name) {
                return Err(format!("line {}: caller {name} is named twice", i + 1));
            }
            let d = digest(key);
            if keys.iter().any(|(k, _)| *k == d) {
                return Err(format!("line {}: the key of caller {name} is another caller's too", i + 1));
            }
            keys.push((d, Caller(name.into())));
        }
        if keys.is_empty() {
            return Err("no key in the file".into());
        }
        Ok(ApiKeys { keys })
    }

    /// The callers the keys name, in the file's order.
    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.keys.iter().map(|(_, c)| c)
    }

    /// The caller whose key the call carries; UNAUTHENTICATED when it carries none of them.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let header = metadata.get(AUTHORIZATION).ok_or_else(|| Status::unauthenticated("this server needs an API key: send `authorization: Bearer KEY`"))?;
        let key = header.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer KEY`"))?;
        let offered = digest(key.trim());
        // Every digest is compared, whichever matches: the time does not tell which key is close.
        let mut matched = None;
        for (d, caller) in &self.keys {
            if bool::from(d.ct_eq(&offered)) {
                matched = Some(caller);
            }
        }
        matched.cloned().ok_or_else(|| Status::unauthenticated("the API key is not one this server accepts"))
    }
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A server-side interceptor that lets through only calls with one of the keys (every call when
/// the server was given none), and tags each with its [`Caller`].
#[derive(Clone)]
pub struct RequireApiKey(pub Option<Arc<ApiKeys>>);

impl Interceptor for RequireApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.0 {
            Some(keys) => keys.check(request.metadata())?,
            None => Caller::anonymous(),
        };
        request.extensions_mut().insert(caller);
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
    fn only_the_keys_in_the_file_get_in_each_as_its_caller() {
        let keys = ApiKeys::parse("# team a\nteam-a key-aaaaaaaaaaaaaaaa\n\n  key-bbbbbbbbbbbbbbbb  \n").unwrap();
        assert_eq!(keys.check(&call_with(Some("Bearer key-aaaaaaaaaaaaaaaa"))).unwrap().name(), "team-a");
        assert_eq!(keys.check(&call_with(Some("Bearer key-bbbbbbbbbbbbbbbb"))).unwrap().name(), "line-4");
        for refused in [None, Some("Bearer key-cccccccccccccccc"), Some("Basic key-aaaaaaaaaaaaaaaa"), Some("key-aaaaaaaaaaaaaaaa")] {
            let err = keys.check(&call_with(refused)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{refused:?}");
            assert!(!err.message().contains("key-"), "a refusal never repeats a key: {}", err.message());
        }
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)", "Debug shows no key");
    }

    #[test]
    fn the_interceptor_tags_every_call_with_its_caller() {
        let keys = Arc::new(ApiKeys::parse("ops key-aaaaaaaaaaaaaaaa\n").unwrap());
        let mut request = Request::new(());
        request.metadata_mut().insert(AUTHORIZATION, "Bearer key-aaaaaaaaaaaaaaaa".parse().unwrap());
        let through = RequireApiKey(Some(keys)).call(request).unwrap();
        assert_eq!(through.extensions().get::<Caller>().map(Caller::name), Some("ops"));
        let open = RequireApiKey(None).call(Request::new(())).unwrap();
        assert_eq!(open.extensions().get::<Caller>().map(Caller::name), Some("anonymous"));
    }

    #[test]
    fn weak_missing_or_ambiguous_keys_are_refused_when_the_file_is_read() {
        assert!(ApiKeys::parse("short\n").unwrap_err().contains("line 1"));
        assert!(ApiKeys::parse("# only a comment\n").unwrap_err().contains("no key"));
        assert!(ApiKeys::parse("a key with spaces in it\n").unwrap_err().contains("NAME KEY"));
        assert!(ApiKeys::parse("bad/name key-aaaaaaaaaaaaaaaa\n").unwrap_err().contains("caller's name"));
        assert!(ApiKeys::parse("a key-aaaaaaaaaaaaaaaa\na key-bbbbbbbbbbbbbbbb\n").unwrap_err().contains("named twice"));
        assert!(ApiKeys::parse("a key-aaaaaaaaaaaaaaaa\nb key-aaaaaaaaaaaaaaaa\n").unwrap_err().contains("another caller's"));
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
