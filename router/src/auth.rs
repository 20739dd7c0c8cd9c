//! Who a session is: credentials (JWTs signed with Ed25519, `alg: EdDSA`) checked at Hello
//! and on `Authenticate`, against the public keys the router trusts (`[auth]`).
//!
//! A credential's claims: `sub` (the agent id, which the Hello must carry), `grants` (swarm
//! name or pattern -> role), `exp`, `iat`, `jti`, and optionally `nbf` (and `iss`, `aud`,
//! accepted and not checked yet). Nothing else:
//! a credential with a claim the router does not know is refused, so a typo in a grant's
//! key never widens or narrows what it allows unnoticed. Signature, algorithm and times
//! are checked by `jsonwebtoken` (ring's Ed25519); this module only decides what the
//! verified claims allow.
//!
//! Patterns: a swarm name matches itself; `prefix.*` matches every swarm whose name starts
//! with `prefix.`; `*` matches every swarm. Names starting with `$` (the router's own
//! swarms) are never matched: no credential can join them.
//!
//! Roles: a grant's role is `agent`, `controller`, `worker` or `admin`; a session may join
//! a swarm in the role its Hello names when a grant matching that swarm gives that role, or
//! `admin` (which gives every role).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use serde::{Deserialize, Serialize};
use swarmbus_schema::{ErrorCode, Role};

use crate::error::RouterError;

/// `[auth]` in the router's configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `none`: no credential is asked for (loopback only); `required`: every session shows
    /// one, and the router may listen on any address.
    pub mode: AuthMode,
    /// Ed25519 public keys (SPKI PEM files) whose credentials the router accepts. Empty with
    /// `mode = "required"`: the router makes a development signing key under
    /// `DATA_DIR/auth/` on first start and trusts it.
    pub trusted_keys: Vec<PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
    /// A TOML file of revoked credentials (see [`Revocations`]), read at start and on
    /// every reload (SIGHUP).
    pub revocations: Option<PathBuf>,
    /// A TOML file of permissions taken away per role and per identity (see [`Policy`]),
    /// read at start and on every reload.
    pub policy: Option<PathBuf>,
    /// PEM CA certificates of client certificates (mTLS): a client may present a
    /// certificate signed by one of them instead of a credential; its agent id is taken from
    /// the certificate and its grants from the policy. Read at start and on every reload.
    pub client_ca: Option<PathBuf>,
    /// PEM CRLs of revoked client certificates, read with `client_ca`.
    pub client_crls: Vec<PathBuf>,
    /// A client certificate names its agent id in a URI SAN starting with this prefix (the
    /// rest is the id); without one, its subject's common name is the id.
    pub cert_uri_prefix: String,
}

/// What a session may be denied (see [`Policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
    Lease,
    Safety,
    Config,
    Worker,
    Affinity,
    JobsSubmit,
    JobsTake,
    JobsCancel,
    JobsRedrive,
    Presence,
}

impl Action {
    const ALL: [(&'static str, Action); 12] = [
        ("publish", Action::Publish),
        ("subscribe", Action::Subscribe),
        ("lease", Action::Lease),
        ("safety", Action::Safety),
        ("config", Action::Config),
        ("worker", Action::Worker),
        ("affinity", Action::Affinity),
        ("jobs.submit", Action::JobsSubmit),
        ("jobs.take", Action::JobsTake),
        ("jobs.cancel", Action::JobsCancel),
        ("jobs.redrive", Action::JobsRedrive),
        ("presence", Action::Presence),
    ];

    /// The actions only some roles have by default, which the policy may allow others:
    /// the controller's (safety actions, the configuration, dead letters, cancelling
    /// others' jobs). The worker's need the worker role (grant it instead).
    const ALLOWABLE: [Action; 4] = [
        Action::Safety,
        Action::Config,
        Action::JobsRedrive,
        Action::JobsCancel,
    ];

    fn parse(text: &str) -> Option<Action> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, action)| *action)
    }
}

/// One denied permission: `action:swarm-pattern[:detail]`, e.g. `publish:fleet.*:control`
/// (the detail is a class for publish and subscribe, a lease name for lease; absent or
/// `*`: any). Actions no swarm bounds (worker, affinity, jobs.take, and safety on an agent
/// or a node) are matched with the swarm pattern `*` only.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    text: String,
    action: Action,
    pattern: String,
    detail: Option<String>,
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, String> {
        let mut parts = text.splitn(3, ':');
        let action = parts.next().unwrap_or_default();
        let action = Action::parse(action).ok_or_else(|| {
            let known: Vec<&str> = Action::ALL.iter().map(|(name, _)| *name).collect();
            format!("{text:?}: the action is one of {}", known.join(", "))
        })?;
        let pattern = parts.next().unwrap_or("*").to_owned();
        if !valid_pattern(&pattern) {
            return Err(format!(
                "{text:?}: {pattern:?} is not a swarm name, prefix.* or *"
            ));
        }
        let detail = parts.next().filter(|d| *d != "*").map(str::to_owned);
        // A rule that could never match would deny nothing, silently: refused instead.
        let classes = swarmbus_schema::Class::ALL.map(swarmbus_schema::Class::name);
        match (action, detail.as_deref()) {
            (Action::Publish | Action::Subscribe, Some(class)) if !classes.contains(&class) => {
                return Err(format!(
                    "{text:?}: the detail of {} is a class: {}",
                    text.split(':').next().unwrap_or_default(),
                    classes.join(", ")
                ))
            }
            (Action::Lease, Some(name)) if !swarmbus_schema::valid_name(name) => {
                return Err(format!("{text:?}: {name:?} is not a lease name"))
            }
            (Action::Publish | Action::Subscribe | Action::Lease, _) | (_, None) => {}
            (_, Some(_)) => return Err(format!("{text:?}: this action takes no detail")),
        }
        if matches!(action, Action::Worker | Action::Affinity | Action::JobsTake) && pattern != "*"
        {
            return Err(format!(
                "{text:?}: no swarm bounds this action: its pattern is * (or none)"
            ));
        }
        Ok(Rule {
            text: text.to_owned(),
            action,
            pattern,
            detail,
        })
    }

    fn matches(&self, action: Action, swarm: &str, detail: Option<&str>) -> bool {
        let swarm_matches = match swarm {
            "" => self.pattern == "*",
            swarm => pattern_matches(&self.pattern, swarm),
        };
        self.action == action
            && swarm_matches
            && self
                .detail
                .as_deref()
                .is_none_or(|wanted| detail == Some(wanted))
    }
}

/// `auth.policy`: permissions taken away and given, per role and per identity; a denial
/// always wins over what a role, an allow or a credential's grants allow. An allow gives a
/// role (or an identity) a controller's action it does not have by default, within the
/// swarms it joined. With credentials or client certificates only (`auth.mode =
/// "required"`):
///
/// ```toml
/// [roles.agent]
/// deny = ["publish:*:control"]           # agents publish no control message anywhere
/// allow = ["safety:fleet.*"]             # and may pause and resume their fleet swarms
/// [identities."agent-7"]
/// deny = ["jobs.submit:*", "lease:fleet.*:leader"]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    roles: BTreeMap<String, Rules>,
    identities: BTreeMap<String, Rules>,
    /// What client certificates grant (mTLS, which carries no grants of its own): per
    /// agent id (`[identities."ID"] grants`), and to every other certificate identity
    /// (`[certificates] grants`).
    grants: BTreeMap<String, Grants>,
    certificate_grants: Grants,
}

/// The rules of one role or identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rules {
    deny: Vec<Rule>,
    allow: Vec<Rule>,
}

impl Rules {
    fn parse(deny: &[String], allow: &[String]) -> Result<Rules, String> {
        let parse = |rules: &[String]| -> Result<Vec<Rule>, String> {
            rules.iter().map(|r| Rule::parse(r)).collect()
        };
        let allow = parse(allow)?;
        if let Some(rule) = allow
            .iter()
            .find(|r| !Action::ALLOWABLE.contains(&r.action))
        {
            return Err(format!(
                "allow {:?}: only safety, config, jobs.redrive and jobs.cancel can be allowed \
                 (every role has the others, and the worker's need the worker role)",
                rule.text
            ));
        }
        Ok(Rules {
            deny: parse(deny)?,
            allow,
        })
    }
}

/// Swarm pattern -> role, as in a credential's `grants` claim.
pub type Grants = BTreeMap<String, GrantRole>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: BTreeMap<String, RulesFile>,
    #[serde(default)]
    identities: BTreeMap<String, IdentityFile>,
    #[serde(default)]
    certificates: CertificatesFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    grants: Grants,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificatesFile {
    #[serde(default)]
    grants: Grants,
}

fn check_grants(section: &str, grants: &Grants) -> Result<(), String> {
    match grants.keys().find(|pattern| !valid_pattern(pattern)) {
        Some(pattern) => Err(format!(
            "{section} grants: {pattern:?} is not a swarm name, prefix.* or *"
        )),
        None => Ok(()),
    }
}

impl Policy {
    /// Parses a policy file's text.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut policy = Policy::default();
        for (role, entry) in file.roles {
            if !matches!(role.as_str(), "agent" | "controller" | "worker") {
                return Err(format!(
                    "[roles.{role}]: the roles are agent, controller and worker"
                ));
            }
            policy
                .roles
                .insert(role, Rules::parse(&entry.deny, &entry.allow)?);
        }
        for (agent, entry) in file.identities {
            check_grants(&format!("[identities.{agent:?}]"), &entry.grants)?;
            if !entry.grants.is_empty() {
                policy.grants.insert(agent.clone(), entry.grants);
            }
            policy
                .identities
                .insert(agent, Rules::parse(&entry.deny, &entry.allow)?);
        }
        check_grants("[certificates]", &file.certificates.grants)?;
        policy.certificate_grants = file.certificates.grants;
        Ok(policy)
    }

    /// What the policy grants the client certificate of `agent`: its own grants, or
    /// those of every certificate identity; `None` when it grants it nothing.
    pub fn certificate_grants(&self, agent: &str) -> Option<&Grants> {
        self.grants
            .get(agent)
            .or((!self.certificate_grants.is_empty()).then_some(&self.certificate_grants))
    }

    fn load(path: &Path) -> Result<Policy, RouterError> {
        crate::config::read_config_file(path, Policy::parse)
    }

    /// Whether the policy denies or allows anything at all (its grants are checked at
    /// admission, not here).
    pub fn is_empty(&self) -> bool {
        self.roles
            .values()
            .chain(self.identities.values())
            .all(|rules| rules.deny.is_empty() && rules.allow.is_empty())
    }

    /// The rules that apply to `agent` in `role`: its role's, then its own.
    fn rules_of<'a>(&'a self, role: Role, agent: &str) -> impl Iterator<Item = &'a Rules> {
        self.roles
            .get(role.name())
            .into_iter()
            .chain(self.identities.get(agent))
    }

    /// The rule that denies `action` on `swarm` (with `detail`) to `agent` in `role`, if
    /// one does. `swarm` empty: an action no swarm bounds.
    pub fn denies(
        &self,
        role: Role,
        agent: &str,
        action: Action,
        swarm: &str,
        detail: Option<&str>,
    ) -> Option<&str> {
        self.rules_of(role, agent)
            .flat_map(|rules| &rules.deny)
            .find(|rule| rule.matches(action, swarm, detail))
            .map(|rule| rule.text.as_str())
    }

    /// Whether a rule allows `action` on `swarm` to `agent` in `role` beyond what the role
    /// has (a denial still wins: ask [`Policy::denies`] too).
    pub fn allows(&self, role: Role, agent: &str, action: Action, swarm: &str) -> bool {
        self.rules_of(role, agent)
            .flat_map(|rules| &rules.allow)
            .any(|rule| rule.matches(action, swarm, None))
    }
}

/// Credentials refused before they expire: by `jti`, and every credential of a subject
/// issued before a time (`[issued_before]`, agent id = Unix seconds):
///
/// ```toml
/// jti = ["3f2a..."]
/// [issued_before]
/// "agent-7" = 1796170000
/// ```
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Revocations {
    pub jti: std::collections::BTreeSet<String>,
    pub issued_before: BTreeMap<String, u64>,
}

impl Revocations {
    fn load(path: &Path) -> Result<Revocations, RouterError> {
        crate::config::read_config_file(path, |text| {
            toml::from_str(text).map_err(|e| e.to_string())
        })
    }

    /// Why `claims` are revoked, if they are.
    fn revoked(&self, claims: &Claims) -> Option<String> {
        if self.jti.contains(&claims.jti) {
            return Some(format!("the credential {:?} was revoked", claims.jti));
        }
        match self.issued_before.get(&claims.sub) {
            Some(&before) if claims.iat < before => Some(format!(
                "the credentials of {:?} issued before {before} were revoked",
                claims.sub
            )),
            _ => None,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            trusted_keys: Vec::new(),
            leeway_s: 30,
            revocations: None,
            policy: None,
            client_ca: None,
            client_crls: Vec::new(),
            cert_uri_prefix: DEFAULT_CERT_URI_PREFIX.to_owned(),
        }
    }
}

/// `auth.cert_uri_prefix` unless set: a certificate for agent `agent-7` carries the URI SAN
/// `swarmbus://agent/agent-7`.
pub const DEFAULT_CERT_URI_PREFIX: &str = "swarmbus://agent/";

/// Whether sessions must show a credential.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    None,
    Required,
}

impl AuthConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.leeway_s > 3_600 {
            return Err("auth.leeway_s must be at most 3600".into());
        }
        if self.mode == AuthMode::None
            && (!self.trusted_keys.is_empty()
                || self.revocations.is_some()
                || self.policy.is_some()
                || self.client_ca.is_some())
        {
            return Err(
                "auth.trusted_keys, auth.revocations, auth.policy or auth.client_ca is set but auth.mode is \"none\": set mode = \"required\""
                    .into(),
            );
        }
        if !self.client_crls.is_empty() && self.client_ca.is_none() {
            return Err("auth.client_crls is set without auth.client_ca".into());
        }
        if self.cert_uri_prefix.is_empty() {
            return Err("auth.cert_uri_prefix must not be empty".into());
        }
        Ok(())
    }
}

/// A grant's role.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum GrantRole {
    Agent,
    Controller,
    Worker,
    Admin,
}

impl GrantRole {
    /// Whether a session of `role` may act under this grant.
    fn gives(self, role: Role) -> bool {
        matches!(
            (self, role),
            (GrantRole::Admin, _)
                | (GrantRole::Agent, Role::Agent)
                | (GrantRole::Controller, Role::Controller)
                | (GrantRole::Worker, Role::Worker)
        )
    }

    pub fn parse(text: &str) -> Option<GrantRole> {
        match text {
            "agent" => Some(GrantRole::Agent),
            "controller" => Some(GrantRole::Controller),
            "worker" => Some(GrantRole::Worker),
            "admin" => Some(GrantRole::Admin),
            _ => None,
        }
    }
}

/// A credential's claims, exactly (unknown claims are refused).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub sub: String,
    pub grants: BTreeMap<String, GrantRole>,
    pub exp: u64,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub jti: String,
    /// Accepted as identity providers set them; not checked yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// A verified credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub agent: String,
    pub grants: BTreeMap<String, GrantRole>,
    /// `exp`, Unix seconds.
    pub expires_at_s: u64,
    pub jti: String,
}

/// Whether `pattern` can match a swarm: a swarm name, `prefix.*` or `*`, not naming the
/// router's own swarms.
pub fn valid_pattern(pattern: &str) -> bool {
    let name = pattern.strip_suffix(".*").unwrap_or(pattern);
    pattern == "*"
        || (!name.is_empty()
            && !name.starts_with('$')
            && !name.contains('*')
            && swarmbus_schema::valid_name(pattern))
}

/// Whether swarm `name` matches grant pattern `pattern` (see the module doc).
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if name.starts_with('$') {
        return false;
    }
    match pattern.strip_suffix('*') {
        Some("") => true,
        Some(prefix) if prefix.ends_with('.') => name.starts_with(prefix),
        _ => pattern == name,
    }
}

impl Identity {
    /// Whether this identity may join `swarm` in `role`.
    pub fn admits(&self, role: Role, swarm: &str) -> bool {
        self.grants
            .iter()
            .any(|(pattern, grant)| pattern_matches(pattern, swarm) && grant.gives(role))
    }

    /// Whether some grant gives `role`, whatever its swarms.
    pub fn has_role(&self, role: Role) -> bool {
        self.grants.values().any(|grant| grant.gives(role))
    }

    /// Whether `role` is granted in every swarm (a grant of `*`): what a safety action on
    /// an agent or a node, which no swarm bounds, needs.
    pub fn everywhere(&self, role: Role) -> bool {
        self.grants
            .iter()
            .any(|(pattern, grant)| pattern == "*" && grant.gives(role))
    }

    /// The first of `swarms` this identity may not join in `role`, if any.
    pub fn refused_swarm<'a>(&self, role: Role, swarms: &'a [String]) -> Option<&'a str> {
        swarms
            .iter()
            .find(|swarm| !self.admits(role, swarm))
            .map(String::as_str)
    }
}

/// Why a credential was refused: the wire code and what to tell the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRefusal {
    pub code: ErrorCode,
    pub reason: String,
}

impl AuthRefusal {
    fn unauthenticated(reason: impl Into<String>) -> Self {
        AuthRefusal {
            code: ErrorCode::Unauthenticated,
            reason: reason.into(),
        }
    }

    pub fn forbidden(reason: impl Into<String>) -> Self {
        AuthRefusal {
            code: ErrorCode::Forbidden,
            reason: reason.into(),
        }
    }
}

/// Checks credentials against the trusted keys.
pub struct Authenticator {
    keys: Vec<(PathBuf, DecodingKey)>,
    validation: Validation,
    revocations: Revocations,
    /// Permissions taken away (`auth.policy`), and what client certificates grant.
    pub policy: Policy,
    /// Client certificates' verifier (`auth.client_ca`, `auth.client_crls`).
    clients: Option<Arc<dyn ClientCertVerifier>>,
    cert_uri_prefix: String,
}

/// What a session proved its identity with, kept to check it again on a reload.
#[derive(Clone)]
pub enum Proof {
    /// A credential (Hello's, or the last refresh).
    Token(swarmbus_schema::Token),
    /// A client certificate chain, the session's own first, verified in the handshake.
    Certificate(Arc<[CertificateDer<'static>]>),
}

impl Proof {
    /// Whether `other` is this very proof (the same token, the same verified chain).
    pub fn same(&self, other: &Proof) -> bool {
        match (self, other) {
            (Proof::Token(a), Proof::Token(b)) => a.as_str() == b.as_str(),
            (Proof::Certificate(a), Proof::Certificate(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proof::Token(token) => f.debug_tuple("Token").field(token).finish(),
            Proof::Certificate(chain) => write!(f, "Certificate({} certificates)", chain.len()),
        }
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "keys",
                &self.keys.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Where the development signing key lives: `DATA_DIR/auth/dev-signing.pem` (PKCS#8,
/// readable by the owner only) and its public half beside it.
pub fn dev_key_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("auth");
    (dir.join("dev-signing.pem"), dir.join("dev-signing.pub.pem"))
}

impl Authenticator {
    /// The authenticator for `config`: `None` with `mode = "none"`. With `required` and no
    /// trusted key, the development key under `data_dir` is trusted; `at_start`, it is made
    /// when missing (a reload only reads it: it never makes a new key).
    pub fn start(
        config: &AuthConfig,
        data_dir: &Path,
        at_start: bool,
    ) -> Result<Option<Self>, RouterError> {
        if config.mode == AuthMode::None {
            return Ok(None);
        }
        let paths = if config.trusted_keys.is_empty() {
            let public = match at_start {
                true => ensure_dev_key(data_dir)?.1,
                false => dev_key_paths(data_dir).1,
            };
            vec![public]
        } else {
            config.trusted_keys.clone()
        };
        let mut keys = Vec::with_capacity(paths.len());
        for path in paths {
            let pem = std::fs::read(&path).map_err(|source| RouterError::DataDir {
                path: path.clone(),
                context: "reading a trusted key",
                source,
            })?;
            let key = DecodingKey::from_ed_pem(&pem).map_err(|e| RouterError::Config {
                detail: format!(
                    "auth.trusted_keys: {} is not an Ed25519 public key in PEM: {e}",
                    path.display()
                ),
            })?;
            keys.push((path, key));
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = config.leeway_s;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // `aud` and `iss` are accepted, not checked (see Claims).
        validation.validate_aud = false;
        let revocations = match &config.revocations {
            Some(path) => Revocations::load(path)?,
            None => Revocations::default(),
        };
        let policy = match &config.policy {
            Some(path) => Policy::load(path)?,
            None => Policy::default(),
        };
        let clients = match &config.client_ca {
            Some(ca) => Some(crate::tls::client_verifier(ca, &config.client_crls)?),
            None => None,
        };
        Ok(Some(Authenticator {
            keys,
            validation,
            revocations,
            policy,
            clients,
            cert_uri_prefix: config.cert_uri_prefix.clone(),
        }))
    }

    /// Reads every file `config` names (trusted keys, revocations, policy, client CA and
    /// CRLs) as a start would, and never makes a development key (`--check-config`; one
    /// not made yet is made at the first start).
    pub fn check_files(config: &AuthConfig, data_dir: &Path) -> Result<(), RouterError> {
        if config.mode == AuthMode::None {
            return Ok(());
        }
        if !config.trusted_keys.is_empty() || dev_key_paths(data_dir).1.exists() {
            return Authenticator::start(config, data_dir, false).map(drop);
        }
        if let Some(path) = &config.revocations {
            Revocations::load(path)?;
        }
        if let Some(path) = &config.policy {
            Policy::load(path)?;
        }
        if let Some(ca) = &config.client_ca {
            crate::tls::client_verifier(ca, &config.client_crls)?;
        }
        Ok(())
    }

    /// The verifier of client certificates for the TLS handshake, when `auth.client_ca` is
    /// set.
    pub fn client_verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.clients.clone()
    }

    /// The identity a client certificate chain proves: its agent id (the URI SAN that
    /// starts with `auth.cert_uri_prefix`; the subject's common name when it has no URI SAN
    /// at all), the grants the policy gives that id, and the certificate's expiry. The
    /// chain is checked against the client CA and CRLs of this authenticator: the
    /// handshake may have been verified against those of a reload before.
    pub fn identify_certificate(
        &self,
        chain: &[CertificateDer<'static>],
    ) -> Result<Identity, AuthRefusal> {
        let Some(verifier) = &self.clients else {
            return Err(AuthRefusal::unauthenticated(
                "this router trusts no client certificates (auth.client_ca)",
            ));
        };
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Err(AuthRefusal::unauthenticated("no client certificate"));
        };
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|e| {
                AuthRefusal::unauthenticated(format!("the client certificate is not accepted: {e}"))
            })?;
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref()).map_err(|e| {
            AuthRefusal::unauthenticated(format!("the client certificate cannot be read: {e}"))
        })?;
        let agent = certificate_agent(&cert, &self.cert_uri_prefix).ok_or_else(|| {
            AuthRefusal::unauthenticated(format!(
                "the client certificate names no agent id (a URI SAN {}ID, or a common name \
                 and no URI SAN)",
                self.cert_uri_prefix
            ))
        })?;
        if !swarmbus_schema::valid_name(&agent) {
            return Err(AuthRefusal::unauthenticated(format!(
                "the client certificate's agent id {agent:?} is not a valid name"
            )));
        }
        let grants = self.policy.certificate_grants(&agent).ok_or_else(|| {
            AuthRefusal::forbidden(format!(
                "the policy grants the certificate identity {agent:?} nothing \
                 ([identities.{agent:?}] grants or [certificates] grants in auth.policy)"
            ))
        })?;
        Ok(Identity {
            grants: grants.clone(),
            // Before 1970 (never accepted by the verifier): expired at once, never "no expiry".
            expires_at_s: u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(1),
            jti: format!("certificate serial {}", cert.raw_serial_as_string()),
            agent,
        })
    }

    /// Checks `proof` again (after a reload): the credential, or the certificate chain
    /// against the client CA and CRLs now trusted, and what the policy now grants it.
    pub fn recheck(&self, proof: &Proof) -> Result<Identity, AuthRefusal> {
        match proof {
            Proof::Token(token) => self.verify(token.as_str()),
            Proof::Certificate(chain) => self.identify_certificate(chain),
        }
    }

    /// Verifies `token`: signed by a trusted key with EdDSA, within its times, with exactly
    /// the known claims. No input makes it panic (a system clock before 1970 would:
    /// jsonwebtoken reads the time).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthRefusal> {
        if token.len() > swarmbus_schema::MAX_CREDENTIAL_BYTES {
            return Err(AuthRefusal::unauthenticated("the credential is too long"));
        }
        let mut last = None;
        for (_, key) in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if claims.sub.is_empty() || claims.jti.is_empty() {
                        return Err(AuthRefusal::unauthenticated(
                            "the credential's sub and jti must not be empty",
                        ));
                    }
                    if let Some(why) = self.revocations.revoked(&claims) {
                        return Err(AuthRefusal::unauthenticated(why));
                    }
                    return Ok(Identity {
                        agent: claims.sub,
                        grants: claims.grants,
                        expires_at_s: claims.exp,
                        jti: claims.jti,
                    });
                }
                Err(error) => {
                    use jsonwebtoken::errors::ErrorKind;
                    match error.kind() {
                        // Another trusted key may have signed it.
                        ErrorKind::InvalidSignature => last = Some(error),
                        _ => return Err(refusal_of(&error)),
                    }
                }
            }
        }
        Err(last.map_or_else(
            || AuthRefusal::unauthenticated("no trusted key"),
            |error| refusal_of(&error),
        ))
    }
}

/// The agent id a certificate names: the rest of its first URI SAN that starts with
/// `prefix`; for a certificate with no URI SAN at all, its subject's first common name. A
/// certificate whose URIs all name something else (another workload's SPIFFE ID) names no
/// agent: its common name is not trusted to name one then.
fn certificate_agent(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    prefix: &str,
) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        // An extension that does not parse names nobody.
        Err(_) => return None,
    };
    if !uris.is_empty() {
        return uris
            .iter()
            .find_map(|uri| uri.strip_prefix(prefix))
            .map(str::to_owned);
    }
    let common_name = cert.subject().iter_common_name().next()?;
    common_name.as_str().ok().map(str::to_owned)
}

fn refusal_of(error: &jsonwebtoken::errors::Error) -> AuthRefusal {
    use jsonwebtoken::errors::ErrorKind;
    let why = match error.kind() {
        ErrorKind::InvalidSignature => "not signed by a key this router trusts".to_owned(),
        ErrorKind::ExpiredSignature => "the credential expired".to_owned(),
        ErrorKind::ImmatureSignature => "the credential is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidAlgorithm => "the credential is not signed with EdDSA".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the credential has no {claim} claim"),
        ErrorKind::Json(e) => format!(
            "the credential's header or claims are not the expected ones (alg EdDSA; claims \
             sub, grants, exp, iat, jti and nbf only): {e}"
        ),
        _ => format!("the credential is malformed: {error}"),
    };
    AuthRefusal::unauthenticated(why)
}

/// Makes the development signing key under `data_dir` unless it is there; returns its
/// paths (private, public).
pub fn ensure_dev_key(data_dir: &Path) -> Result<(PathBuf, PathBuf), RouterError> {
    let (private, public) = dev_key_paths(data_dir);
    if private.exists() && public.exists() {
        return Ok((private, public));
    }
    let dir = private.parent().expect("the key lies in a directory");
    std::fs::create_dir_all(dir).map_err(|source| RouterError::DataDir {
        path: dir.to_owned(),
        context: "creating the auth directory",
        source,
    })?;
    let key_error = |e: rcgen::Error| RouterError::Config {
        detail: format!("the development signing key {}: {e}", private.display()),
    };
    // A private key without its public half keeps its credentials good: the public half
    // is made again from it, never a new pair.
    let existing = match std::fs::read_to_string(&private) {
        Ok(pem) => Some(rcgen::KeyPair::from_pem(&pem).map_err(key_error)?),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(RouterError::DataDir {
                path: private.clone(),
                context: "reading the development signing key",
                source,
            })
        }
    };
    let made = existing.is_none();
    let key = match existing {
        Some(key) => key,
        None => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(key_error)?,
    };
    let written = |path: &Path| {
        let path = path.to_owned();
        move |source| RouterError::DataDir {
            path,
            context: "writing the development signing key",
            source,
        }
    };
    if made {
        crate::tls::write_private_file(&private, &key.serialize_pem())
            .map_err(written(&private))?;
        tracing::info!(key = %private.display(), "made a development signing key for credentials");
    }
    std::fs::write(&public, key.public_key_pem()).map_err(written(&public))?;
    Ok((private, public))
}

/// What `swarmbus-router creds issue` signs.
#[derive(Clone, Debug)]
pub struct Issue {
    pub agent: String,
    pub grants: BTreeMap<String, GrantRole>,
    pub ttl_s: u64,
    pub now_s: u64,
    pub jti: String,
}

/// A credential for `issue`, signed with the PKCS#8 Ed25519 key in `key_pem`.
pub fn issue(key_pem: &[u8], issue: &Issue) -> Result<String, String> {
    let claims = Claims {
        sub: issue.agent.clone(),
        grants: issue.grants.clone(),
        exp: issue
            .now_s
            .checked_add(issue.ttl_s)
            .ok_or("the credential's ttl is too long")?,
        iat: issue.now_s,
        nbf: None,
        jti: issue.jti.clone(),
        iss: None,
        aud: None,
    };
    sign(key_pem, &claims)
}

/// Any claims, signed with EdDSA and the PKCS#8 Ed25519 key in `key_pem` (tools and tests;
/// the router accepts only [`Claims`]).
pub fn sign(key_pem: &[u8], claims: &impl Serialize) -> Result<String, String> {
    let key = EncodingKey::from_ed_pem(key_pem)
        .map_err(|e| format!("the signing key is not an Ed25519 key in PEM: {e}"))?;
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key)
        .map_err(|e| format!("signing the credential: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_prefixes_and_never_the_routers_swarms() {
        assert!(pattern_matches("fleet-a", "fleet-a"));
        assert!(!pattern_matches("fleet-a", "fleet-ab"));
        assert!(pattern_matches("fleet-a.*", "fleet-a.gpu-1"));
        assert!(!pattern_matches("fleet-a.*", "fleet-a"));
        assert!(!pattern_matches("fleet-a.*", "fleet-ab.x"));
        assert!(pattern_matches("*", "anything"));
        assert!(!pattern_matches("*", "$control"));
        assert!(!pattern_matches("$control", "$control"));
        // A `*` inside a name is not a wildcard.
        assert!(!pattern_matches("fleet*", "fleet-a"));
    }

    #[test]
    fn patterns_that_could_never_match_are_not_valid() {
        for good in ["fleet", "fleet.*", "*", "a.b.*"] {
            assert!(valid_pattern(good), "{good}");
        }
        for bad in ["", "$control", "$x.*", "fleet*", ".*", "a*b"] {
            assert!(!valid_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn a_lost_public_key_is_made_again_from_the_private_one() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = ensure_dev_key(dir.path()).unwrap();
        let (key, first_public) = (
            std::fs::read(&private).unwrap(),
            std::fs::read(&public).unwrap(),
        );
        std::fs::remove_file(&public).unwrap();
        ensure_dev_key(dir.path()).unwrap();
        assert_eq!(
            std::fs::read(&private).unwrap(),
            key,
            "the private key was kept"
        );
        assert_eq!(std::fs::read(&public).unwrap(), first_public);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&private).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_ttl_past_the_end_of_time_is_refused_when_issuing() {
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = ensure_dev_key(dir.path()).unwrap();
        let issue = Issue {
            agent: "a".into(),
            grants: BTreeMap::new(),
            ttl_s: u64::MAX,
            now_s: 10,
            jti: "j".into(),
        };
        assert!(super::issue(&std::fs::read(private).unwrap(), &issue).is_err());
    }

    #[test]
    fn a_policy_denies_by_role_and_identity_and_refuses_unknown_rules() {
        let policy = Policy::parse(
            "[roles.agent]\ndeny = [\"publish:*:control\"]\n\
             [identities.a7]\ndeny = [\"lease:fleet.*:leader\", \"worker\"]\n",
        )
        .unwrap();
        let denies = |role, agent, action, swarm, detail| {
            policy.denies(role, agent, action, swarm, detail).is_some()
        };
        assert!(denies(
            Role::Agent,
            "x",
            Action::Publish,
            "s",
            Some("control")
        ));
        assert!(!denies(
            Role::Agent,
            "x",
            Action::Publish,
            "s",
            Some("command")
        ));
        assert!(!denies(
            Role::Controller,
            "x",
            Action::Publish,
            "s",
            Some("control")
        ));
        assert!(denies(
            Role::Controller,
            "a7",
            Action::Lease,
            "fleet.x",
            Some("leader")
        ));
        assert!(!denies(
            Role::Controller,
            "a7",
            Action::Lease,
            "fleet.x",
            Some("other")
        ));
        assert!(!denies(
            Role::Controller,
            "a7",
            Action::Lease,
            "ops",
            Some("leader")
        ));
        // `worker` without a pattern: every swarm, and the actions no swarm bounds.
        assert!(denies(Role::Worker, "a7", Action::Worker, "", None));
        for bad in [
            "[roles.admin]\ndeny = []",
            "[roles.agent]\ndeny = [\"fly:*\"]",
            "[roles.agent]\ndeny = [\"publish:$control\"]",
            "[roles.agent]\nallow = [\"publish:*\"]",
            "[roles.agent]\ndeny = [\"publish:*:Control\"]",
            "[roles.agent]\ndeny = [\"publish:*:\"]",
            "[roles.agent]\ndeny = [\"safety:ops:x\"]",
            "[roles.worker]\ndeny = [\"worker:ops\"]",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grants_give_their_role_and_admin_gives_every_role() {
        let identity = Identity {
            agent: "a".into(),
            grants: [
                ("ops".to_string(), GrantRole::Controller),
                ("fleet.*".to_string(), GrantRole::Agent),
                ("lab".to_string(), GrantRole::Admin),
            ]
            .into(),
            expires_at_s: 0,
            jti: "j".into(),
        };
        assert!(identity.admits(Role::Controller, "ops"));
        assert!(!identity.admits(Role::Agent, "ops"));
        assert!(identity.admits(Role::Agent, "fleet.x"));
        assert!(!identity.admits(Role::Worker, "fleet.x"));
        for role in [Role::Agent, Role::Controller, Role::Worker] {
            assert!(identity.admits(role, "lab"));
        }
        let swarms = ["fleet.x".to_string(), "other".to_string()];
        assert_eq!(identity.refused_swarm(Role::Agent, &swarms), Some("other"));
    }
}
