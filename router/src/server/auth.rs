//! A session's credential: kept with what it grants, checked again when a reload swapped
//! the authenticator, and refreshed in-band before it expires (`Authenticate`).

use super::*;

impl Session {
    /// Why the policy denies this session `action` on `swarm` (with `detail`), if it does
    /// (`auth.policy`; nothing is denied without credentials). `swarm` empty: an action no
    /// swarm bounds.
    pub(super) fn denied(
        &self,
        action: crate::auth::Action,
        swarm: &str,
        detail: Option<&str>,
    ) -> Option<String> {
        // Every publish asks: without a policy, one relaxed load and nothing else.
        if !self.context.policy_active.load(Ordering::Relaxed) {
            return None;
        }
        let auth = self.context.authenticator()?;
        auth.policy
            .denies(self.role, &self.agent, action, swarm, detail)
            .map(|rule| format!("denied by the policy ({rule})"))
    }

    /// Whether the session showed a credential.
    pub(super) fn credentialed(&self) -> bool {
        self.credential
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Keeps `identity` and `token`, verified with `used`. A reload may have swapped the
    /// authenticator meanwhile, after it re-checked the live sessions: then the token is
    /// checked again with the current one, and the session closed when it fails.
    pub(super) fn keep_credential(
        &self,
        identity: crate::auth::Identity,
        token: swarmbus_schema::Token,
        used: &Arc<crate::auth::Authenticator>,
    ) {
        self.credential_expires_s
            .store(identity.expires_at_s, Ordering::Relaxed);
        *self.credential.lock().unwrap_or_else(|p| p.into_inner()) = Some(SessionCredential {
            identity,
            token: token.clone(),
        });
        if let Some(current) = self.context.authenticator() {
            if !Arc::ptr_eq(&current, used) && current.verify(token.as_str()).is_err() {
                self.outbox.request_close(ErrorCode::Unauthenticated);
            }
        }
    }

    /// A fresh credential for this session: the same agent id, still granting the session's
    /// role in every swarm it joined. Accepted, the session's expiry moves to the new one's;
    /// refused, the session keeps the credential it had until that expires.
    pub(super) async fn authenticate(
        &self,
        request_id: u64,
        credential: swarmbus_schema::Token,
    ) -> Result<(), Fault> {
        let Some(auth) = self.context.authenticator() else {
            self.refuse(
                ErrorCode::InvalidRequest,
                request_id,
                "this router does not use credentials (auth.mode = \"none\")".into(),
            );
            return Ok(());
        };
        let swarms: Vec<String> = self.swarms.iter().cloned().collect();
        let checked = auth.verify(credential.as_str()).and_then(|identity| {
            admit(&identity, &self.agent, self.role, &swarms).map(|()| identity)
        });
        match checked {
            Ok(identity) => {
                self.keep_credential(identity, credential, &auth);
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
            }
            Err(refusal) => self.refuse(refusal.code, request_id, refusal.reason),
        }
        Ok(())
    }
}
