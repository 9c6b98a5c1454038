//! `[admin]`: where the admin API listens and how it is protected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, err, resolve};

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct AdminSection {
    pub(super) listen: Option<SocketAddr>,
    token_file: Option<PathBuf>,
    auth_reads: bool,
    allowed_hosts: Vec<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8060))),
            token_file: None,
            auth_reads: false,
            allowed_hosts: Vec::new(),
        }
    }
}

/// The admin API's bearer token (`admin.token_file`). Its `Debug` does not
/// show it, and [`AdminToken::matches`] compares in constant time.
#[derive(Clone)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Shortest token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;

impl AdminToken {
    /// A token from its text: at least [`MIN_TOKEN_LEN`] bytes of visible
    /// ASCII with no space (it travels in an `Authorization` header).
    ///
    /// # Errors
    /// What is wrong with it.
    pub fn new(text: &str) -> Result<AdminToken, String> {
        if text.len() < MIN_TOKEN_LEN {
            return Err(format!("at least {MIN_TOKEN_LEN} bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "one token of visible ASCII, no spaces or line breaks inside \
                 (it travels in an Authorization header)"
                    .into(),
            );
        }
        Ok(AdminToken(text.to_owned()))
    }

    /// Reads a token file: one token, whitespace around it ignored.
    ///
    /// # Errors
    /// The file cannot be read, or its token is unfit ([`AdminToken::new`]).
    pub fn from_file(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        AdminToken::new(text.trim_ascii()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The token, to send it (`siplb status`).
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that depends on neither
    /// (both are hashed, and the digests compared without an early exit).
    #[must_use]
    pub fn matches(&self, presented: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented);
        let diff = a.iter().zip(b.iter()).fold(0u8, |d, (x, y)| d | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

/// The admin API's settings (`[admin]`).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Bearer token required for every state-changing request (None: none).
    pub token: Option<AdminToken>,
    /// Whether reads (GET, HEAD) need the token too.
    pub auth_reads: bool,
    /// Further names accepted in `Host` (lower case, `host` or `host:port`).
    pub allowed_hosts: Vec<String>,
}

/// `[admin]` checked; `None` when the admin API is off.
pub(super) fn admin_config(
    a: AdminSection,
    base: &Path,
) -> Result<Option<AdminConfig>, ConfigError> {
    let token = match &a.token_file {
        Some(p) => {
            Some(AdminToken::from_file(&resolve(base, p)).or_else(|e| err("admin.token_file", e))?)
        }
        None => None,
    };
    if a.auth_reads && token.is_none() {
        return err(
            "admin.auth_reads",
            "true needs admin.token_file: there is no token to ask for",
        );
    }
    let mut allowed_hosts = Vec::with_capacity(a.allowed_hosts.len());
    for (i, h) in a.allowed_hosts.iter().enumerate() {
        if crate::admin::parse_authority(h).is_none() {
            return err(
                format!("admin.allowed_hosts[{i}]"),
                format!(
                    "'{h}' is not a host name or address with an optional :port (no scheme, path or wildcard)"
                ),
            );
        }
        allowed_hosts.push(h.to_ascii_lowercase());
    }
    Ok(a.listen.map(|listen| AdminConfig {
        listen,
        token,
        auth_reads: a.auth_reads,
        allowed_hosts,
    }))
}
