//! Credentials on gRPC calls: bearer tokens in the `authorization` metadata
//! (`Bearer <token>`), checked by servers against a set of accepted tokens and attached by
//! clients. The public API's keys and the workers' internal token are both such sets.
//!
//! Tokens are held and compared as SHA-256 digests, in constant time whatever the
//! offered token's length, and never logged; what identifies a caller in records and
//! logs is [`Tokens::check`]'s key id, another (domain-separated) SHA-256 of the token,
//! which a token of at least [`MIN_TOKEN_LEN`] characters keeps from being inverted.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use sha2::{Digest, Sha256};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Who made a call, put in the request's extensions by [`Tokens::interceptor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The id of the caller's key; `None` when the server accepts every call.
    pub key_id: Option<String>,
    /// Whether the key is marked `admin` in its file: it may act on what other keys own
    /// (their model names).
    pub admin: bool,
    /// Whether the key is marked `priority` in its file: its requests' `priority` orders
    /// them across keys, not only among its own.
    pub priority: bool,
}

/// Fewest characters of a token in a token file: 16 random printable characters are
/// beyond guessing, and beyond inverting a key id.
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer tokens a server accepts (as digests): none configured means every call is
/// accepted.
#[derive(Debug)]
pub struct Tokens {
    file: Option<PathBuf>,
    digests: RwLock<Vec<Accepted>>,
}

/// One accepted token: its digest and its roles.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    digest: [u8; 32],
    roles: Roles,
}

/// What a line of a token file marks a token as, beside a caller.
#[derive(Debug, Clone, Copy, Default)]
struct Roles {
    /// `admin`: acts on what other keys own.
    admin: bool,
    /// `priority`: its request priority counts across keys.
    priority: bool,
}

/// A token of a file and its roles.
struct Line {
    token: String,
    roles: Roles,
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
    /// A line is not a token a header can carry (and its optional roles).
    #[error(
        "the token file {path}, line {line}: a line is a token of printable ASCII without \
         spaces, then optionally the roles `admin` and `priority`"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
    },
    /// A token is shorter than [`MIN_TOKEN_LEN`].
    #[error("the token file {path}, line {line}: a token has at least {MIN_TOKEN_LEN} characters")]
    TooShort {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
    },
}

impl Tokens {
    /// Accepts every call.
    pub fn open() -> Self {
        Self::of(Vec::new())
    }

    /// Accepts `tokens` only, none an administrator's.
    pub fn of(tokens: Vec<String>) -> Self {
        let lines = tokens.into_iter().map(|token| Line {
            token,
            roles: Roles::default(),
        });
        Self::of_lines(lines.collect())
    }

    fn of_lines(lines: Vec<Line>) -> Self {
        Self {
            file: None,
            digests: RwLock::new(lines.iter().map(Accepted::of).collect()),
        }
    }

    /// Accepts the tokens of `path`: one per line; blank lines and lines starting with
    /// `#` are skipped.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        Ok(Self {
            file: Some(path.to_path_buf()),
            ..Self::of_lines(read(path)?)
        })
    }

    /// Reads the file again (on SIGHUP); the number of tokens now accepted. A file that
    /// fails to read leaves the tokens as they were.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let fresh: Vec<Accepted> = read(path)?.iter().map(Accepted::of).collect();
        let count = fresh.len();
        *self.digests.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(count)
    }

    /// Whether every call is accepted.
    pub fn is_open(&self) -> bool {
        self.digests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The caller of a call with `metadata`, or UNAUTHENTICATED.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let digests = self.digests.read().unwrap_or_else(|e| e.into_inner());
        if digests.is_empty() {
            return Ok(Caller {
                key_id: None,
                admin: false,
                priority: false,
            });
        }
        let offered = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization: expected `Bearer <key>` metadata")
            })?;
        // Digests of one length, every one compared: the time taken says neither which
        // token matched nor how long any is.
        let offered_digest = digest(offered);
        let (mut matched, mut roles) = (false, Roles::default());
        for accepted in digests.iter() {
            let this = constant_time_eq(&accepted.digest, &offered_digest);
            matched |= this;
            roles.admin |= this & accepted.roles.admin;
            roles.priority |= this & accepted.roles.priority;
        }
        if matched {
            Ok(Caller {
                key_id: Some(key_id(offered)),
                admin: roles.admin,
                priority: roles.priority,
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

/// The id of a key in records and logs: 16 hex digits of a SHA-256 of it (apart from
/// the digest it is checked by), not the key.
pub fn key_id(token: &str) -> String {
    let hash = Sha256::new()
        .chain_update(b"bd3lm key id\0")
        .chain_update(token.as_bytes())
        .finalize();
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a token is checked by.
fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Accepted {
    fn of(line: &Line) -> Self {
        Self {
            digest: digest(&line.token),
            roles: line.roles,
        }
    }
}

fn read(path: &Path) -> Result<Vec<Line>, TokenFileError> {
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
        let (path, line_no) = (path.to_path_buf(), i + 1);
        let mut words = line.split_ascii_whitespace();
        let token = words.next().unwrap_or_default();
        let mut roles = Roles::default();
        let mut valid = token.bytes().all(|b| b.is_ascii_graphic());
        for role in words {
            match role {
                "admin" => roles.admin = true,
                "priority" => roles.priority = true,
                _ => valid = false,
            }
        }
        if !valid {
            return Err(TokenFileError::Invalid {
                path,
                line: line_no,
            });
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenFileError::TooShort {
                path,
                line: line_no,
            });
        }
        tokens.push(Line {
            token: token.to_string(),
            roles,
        });
    }
    if tokens.is_empty() {
        return Err(TokenFileError::Empty(path.to_path_buf()));
    }
    Ok(tokens)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
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
        Self::new(Some(&first.token))
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
        let (beta, gamma) = ("beta-0123456789ab", "gamma-0123456789a");
        std::fs::write(&path, format!("# keys\nalpha-0123456789ab\n\n  {beta}  \n")).unwrap();
        let tokens = Tokens::from_file(&path).unwrap();
        let bearer = |t: &str| with(Some(&format!("Bearer {t}")));
        assert!(tokens.check(&bearer(beta)).is_ok());
        std::fs::write(&path, format!("{gamma}\n")).unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert!(tokens.check(&bearer(beta)).is_err());
        assert!(tokens.check(&bearer(gamma)).is_ok());
        std::fs::write(&path, format!("{gamma} admin\n{beta} priority\n")).unwrap();
        tokens.reload().unwrap();
        let (g, b) = (
            tokens.check(&bearer(gamma)).unwrap(),
            tokens.check(&bearer(beta)).unwrap(),
        );
        assert!(g.admin && !g.priority, "marked admin");
        assert!(!b.admin && b.priority, "marked priority");
        std::fs::write(&path, format!("{gamma}\n")).unwrap();
        tokens.reload().unwrap();
        std::fs::write(&path, "two words and more\n").unwrap();
        assert!(matches!(
            tokens.reload(),
            Err(TokenFileError::Invalid { line: 1, .. })
        ));
        std::fs::write(&path, format!("{gamma}\nshort-key\n")).unwrap();
        assert!(matches!(
            tokens.reload(),
            Err(TokenFileError::TooShort { line: 2, .. })
        ));
        assert!(tokens.check(&bearer(gamma)).is_ok(), "kept");
        std::fs::write(&path, "\n# none\n").unwrap();
        assert!(matches!(
            Tokens::from_file(&path),
            Err(TokenFileError::Empty(_))
        ));
        let missing = Bearer::from_file(&dir.join("missing"));
        assert!(matches!(missing, Err(TokenFileError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A key id is a domain-separated SHA-256 of the key (the value below is Python's
    /// `hashlib.sha256(b"bd3lm key id\\0" + key).hexdigest()[:16]`): fixed, since sessions
    /// in the store are owned by it.
    #[test]
    fn key_ids_are_sha256_of_the_key() {
        assert_eq!(key_id("key-alpha-0123456789"), "09e393b7a4ce2976");
        assert_ne!(
            key_id("key-alpha-0123456789"),
            key_id("key-beta-9876543210")
        );
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
