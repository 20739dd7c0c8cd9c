//! Credentials for the loadgen's agents, for a router with `auth.mode = "required"`: each
//! agent gets its own (its agent id as `sub`, every swarm as `admin`), signed with a key
//! the router trusts (`--creds FILE`, or a spawned router's development key with `--auth`).
//!
//! The claims are the router's credential format (docs/security.md), written here with
//! jsonwebtoken rather than through the router's library, which the loadgen does not link;
//! the loadgen's tests run against a router that requires them, so a drift fails there.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// How long a credential the loadgen issues is valid: longer than any run.
const TTL_S: u64 = 24 * 3_600;

/// Signs a credential per agent id. Its `Debug` shows nothing of the key.
pub struct Signer {
    key: EncodingKey,
    issued: AtomicU64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// The signing key in `path` (PKCS#8 Ed25519, PEM).
    pub fn load(path: &Path) -> anyhow::Result<Arc<Signer>> {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let key = EncodingKey::from_ed_pem(&pem)
            .with_context(|| format!("{} is not an Ed25519 private key in PEM", path.display()))?;
        Ok(Arc::new(Signer {
            key,
            issued: AtomicU64::new(0),
        }))
    }

    /// A credential for `agent`, granting every swarm in every role.
    pub fn credential(&self, agent: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        let serial = self.issued.fetch_add(1, Ordering::Relaxed);
        let claims = serde_json::json!({
            "sub": agent,
            "grants": { "*": "admin" },
            "exp": now + TTL_S,
            "iat": now,
            "jti": format!("loadgen-{}-{serial}", std::process::id()),
        });
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .map_err(|e| format!("signing a credential: {e}"))
    }
}
