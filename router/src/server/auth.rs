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

    /// Drops the subscriptions the policy now denies (after a reload) from what the session
    /// holds, tells the session which and why (a notice: a refusal of request 0), and
    /// returns them for the shards to forget.
    pub(super) fn drop_denied_subscriptions(&self) -> Vec<swarmbus_schema::Subscription> {
        let mut held = self
            .subscriptions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut dropped = Vec::new();
        held.retain(|(swarm, class, agent_filter)| {
            let action = crate::auth::Action::Subscribe;
            let Some(why) = self.denied(action, swarm, Some(class.name())) else {
                return true;
            };
            let notice = format!(
                "the subscription to {} messages of swarm {swarm:?} was dropped: {why}",
                class.name()
            );
            self.refuse(ErrorCode::Forbidden, 0, notice);
            dropped.push(swarmbus_schema::Subscription {
                request_id: 0,
                swarm: swarm.clone(),
                class: *class,
                agent_filter: agent_filter.clone(),
            });
            false
        });
        dropped
    }

    /// Whether the policy allows this session `action` on `swarm` beyond its role's
    /// defaults (`allow` rules; nothing without credentials). `swarm` empty: an action no
    /// swarm bounds. A denial still wins (see [`Session::denied`]).
    pub(super) fn allowed(&self, action: crate::auth::Action, swarm: &str) -> bool {
        if !self.context.policy_active.load(Ordering::Relaxed) {
            return false;
        }
        self.context
            .authenticator()
            .is_some_and(|auth| auth.policy.allows(self.role, &self.agent, action, swarm))
    }

    /// Whether the session is a controller, or the policy allows it `action` on `swarm` as
    /// if it were one.
    pub(super) fn controls(&self, action: crate::auth::Action, swarm: &str) -> bool {
        self.role == Role::Controller || self.allowed(action, swarm)
    }

    /// Whether the session showed a credential.
    pub(super) fn credentialed(&self) -> bool {
        self.credential
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Keeps `identity` and its `proof`, verified with `used`. A reload may have swapped
    /// the authenticator meanwhile, after it re-checked the live sessions: then the proof
    /// is checked again with the current one, and the session closed when it fails.
    pub(super) fn keep_credential(
        &self,
        identity: crate::auth::Identity,
        proof: crate::auth::Proof,
        used: &Arc<crate::auth::Authenticator>,
    ) {
        self.credential_expires_s
            .store(identity.expires_at_s, Ordering::Relaxed);
        *self.credential.lock().unwrap_or_else(|p| p.into_inner()) = Some(SessionCredential {
            identity,
            proof: proof.clone(),
        });
        if let Some(current) = self.context.authenticator() {
            if !Arc::ptr_eq(&current, used) {
                if let Err(refusal) = self.still_allowed(&current, &proof) {
                    self.outbox.request_close(refusal.code);
                }
            }
        }
    }

    /// Whether `auth` (a reloaded authenticator) still accepts this session: its proof,
    /// and what that proof now grants for the session's agent id, role and swarms. Keeps
    /// the identity it finds (what a certificate grants comes from the policy).
    pub(super) fn still_allowed(
        &self,
        auth: &crate::auth::Authenticator,
        proof: &crate::auth::Proof,
    ) -> Result<(), crate::auth::AuthRefusal> {
        let swarms: Vec<String> = self.swarms.iter().cloned().collect();
        let identity = auth.recheck(proof)?;
        admit(&identity, &self.agent, self.role, &swarms)?;
        let mut credential = self.credential.lock().unwrap_or_else(|p| p.into_inner());
        // Unless a refresh replaced the proof meanwhile (its identity is the newer one).
        if let Some(credential) = credential.as_mut().filter(|c| c.proof.same(proof)) {
            credential.identity = identity;
        }
        Ok(())
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
                self.keep_credential(identity, crate::auth::Proof::Token(credential), &auth);
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
            }
            Err(refusal) => self.refuse(refusal.code, request_id, refusal.reason),
        }
        Ok(())
    }
}
