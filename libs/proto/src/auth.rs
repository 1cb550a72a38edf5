//! Credentials on gRPC calls: bearer tokens in the `authorization` metadata
//! (`Bearer <token>`), checked by servers against a set of accepted tokens and attached by
//! clients. The public API's keys and the workers' internal token are both such sets.
//!
//! Tokens are compared in constant time and never logged; what identifies a caller in
//! records and logs is [`Tokens::check`]'s key id, a hash of the token.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Who made a call, put in the request's extensions by [`Tokens::interceptor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The id of the caller's key; `None` when the server accepts every call.
    pub key_id: Option<String>,
}

/// The bearer tokens a server accepts: none configured means every call is accepted.
#[derive(Debug)]
pub struct Tokens {
    file: Option<PathBuf>,
    tokens: RwLock<Vec<String>>,
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It could not be read.
    #[error("reading the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It holds no token.
    #[error("the token file {0} holds no token")]
    Empty(PathBuf),
    /// A line is not a token a header can carry.
    #[error("the token file {path}, line {line}: a token is printable ASCII without spaces")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
    },
}

impl Tokens {
    /// Accepts every call.
    pub fn open() -> Self {
        Self {
            file: None,
            tokens: RwLock::new(Vec::new()),
        }
    }

    /// Accepts `tokens` only.
    pub fn of(tokens: Vec<String>) -> Self {
        Self {
            file: None,
            tokens: RwLock::new(tokens),
        }
    }

    /// Accepts the tokens of `path`: one per line; blank lines and lines starting with
    /// `#` are skipped.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let tokens = Self {
            file: Some(path.to_path_buf()),
            tokens: RwLock::new(read(path)?),
        };
        Ok(tokens)
    }

    /// Reads the file again (on SIGHUP); the number of tokens now accepted. A file that
    /// fails to read leaves the tokens as they were.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let fresh = read(path)?;
        let count = fresh.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(count)
    }

    /// Whether every call is accepted.
    pub fn is_open(&self) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The caller of a call with `metadata`, or UNAUTHENTICATED.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        if tokens.is_empty() {
            return Ok(Caller { key_id: None });
        }
        let offered = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization: expected `Bearer <key>` metadata")
            })?;
        // Every token is compared, so the time taken does not say which one matched.
        let mut matched = false;
        for token in tokens.iter() {
            matched |= constant_time_eq(token.as_bytes(), offered.as_bytes());
        }
        if matched {
            Ok(Caller {
                key_id: Some(key_id(offered)),
            })
        } else {
            Err(Status::unauthenticated(
                "authorization: the key is not valid",
            ))
        }
    }

    /// A server interceptor: calls without an accepted token are UNAUTHENTICATED (and
    /// counted in `bd3lm_unauthenticated_total`); the [`Caller`] of the others is in
    /// their extensions.
    pub fn interceptor(
        self: std::sync::Arc<Self>,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |mut request: Request<()>| {
            let caller = self.check(request.metadata()).inspect_err(|_| {
                metrics::counter!("bd3lm_unauthenticated_total").increment(1);
            })?;
            request.extensions_mut().insert(caller);
            Ok(request)
        }
    }
}

/// The id of a key in records and logs: 16 hex digits of its hash, not the key.
pub fn key_id(token: &str) -> String {
    format!("{:016x}", bd3lm_bytes::checksum(token.as_bytes()))
}

fn read(path: &Path) -> Result<Vec<String>, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenFileError::Invalid {
                path: path.to_path_buf(),
                line: i + 1,
            });
        }
        tokens.push(line.to_string());
    }
    if tokens.is_empty() {
        return Err(TokenFileError::Empty(path.to_path_buf()));
    }
    Ok(tokens)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A client interceptor that attaches a bearer token to every call (none: calls go out
/// as they are).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// Attaches `token`, when there is one.
    pub fn new(token: Option<&str>) -> Result<Self, TokenFileError> {
        let value = token
            .map(|t| AsciiMetadataValue::try_from(format!("Bearer {t}")))
            .transpose()
            .map_err(|_| TokenFileError::Invalid {
                path: PathBuf::from("<token>"),
                line: 1,
            })?;
        Ok(Self(value))
    }

    /// The first token of `path`.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let first = read(path)?.swap_remove(0);
        Self::new(Some(&first))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(header: Option<&str>) -> MetadataMap {
        let mut md = MetadataMap::new();
        if let Some(h) = header {
            md.insert("authorization", h.parse().unwrap());
        }
        md
    }

    #[test]
    fn only_listed_keys_pass_and_open_sets_pass_all() {
        let tokens = Tokens::of(vec!["k-one".into(), "k-two".into()]);
        let caller = tokens.check(&with(Some("Bearer k-two"))).unwrap();
        assert_eq!(caller.key_id, Some(key_id("k-two")));
        assert_ne!(key_id("k-one"), key_id("k-two"));
        for bad in [
            None,
            Some("Bearer k-three"),
            Some("k-one"),
            Some("Bearer k-on"),
        ] {
            let status = tokens.check(&with(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
            assert!(!status.message().contains("k-"), "{status}");
        }
        let open = Tokens::open();
        assert!(open.is_open());
        assert_eq!(open.check(&with(None)).unwrap().key_id, None);
    }

    #[test]
    fn token_files_are_read_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("bd3lm-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "# keys\nalpha\n\n  beta  \n").unwrap();
        let tokens = Tokens::from_file(&path).unwrap();
        assert!(tokens.check(&with(Some("Bearer beta"))).is_ok());
        std::fs::write(&path, "gamma\n").unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert!(tokens.check(&with(Some("Bearer beta"))).is_err());
        assert!(tokens.check(&with(Some("Bearer gamma"))).is_ok());
        std::fs::write(&path, "two words\n").unwrap();
        assert!(matches!(
            tokens.reload(),
            Err(TokenFileError::Invalid { line: 1, .. })
        ));
        assert!(tokens.check(&with(Some("Bearer gamma"))).is_ok(), "kept");
        std::fs::write(&path, "\n# none\n").unwrap();
        assert!(matches!(
            Tokens::from_file(&path),
            Err(TokenFileError::Empty(_))
        ));
        let missing = Bearer::from_file(&dir.join("missing"));
        assert!(matches!(missing, Err(TokenFileError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bearer_attaches_its_token() {
        let mut bearer = Bearer::new(Some("inner")).unwrap();
        let request = bearer.call(Request::new(())).unwrap();
        let tokens = Tokens::of(vec!["inner".into()]);
        assert!(tokens.check(request.metadata()).is_ok());
        let plain = Bearer::default().call(Request::new(())).unwrap();
        assert!(tokens.check(plain.metadata()).is_err());
    }
}
