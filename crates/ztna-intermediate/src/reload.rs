//! SIGHUP: new certificate, CA and policy, applied to what is running.
//!
//! * New handshakes use the new certificate and CA at once.
//! * Established peers are re-verified against the new CA (chain, validity, role); those it no
//!   longer accepts are disconnected with the reason.
//! * Every connector offer is re-evaluated under the new policy, in both directions: removed
//!   registrations are told `RegisterRejected`, restored ones `Registered`, and agents get their
//!   service status pushed again.
//! * Flows the new policy no longer allows (agent → service, or the connector serving it) are
//!   ended with the REVOKED code.
//!
//! Each of these is logged and counted in `ztna_intermediate_revocations_total`.

use std::sync::Arc;

use tracing::{info, warn};
use ztna_node::Identity;
use ztna_proto::{codes, Role, ServerMsg};

use crate::config::Config;
use crate::policy::Policy;
use crate::session::close;
use crate::state::Shared;

pub(crate) fn apply(shared: &Shared, new: Config) -> Result<String, String> {
    new.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
    let (identity, _) =
        Identity::load_verified(&new.tls, Role::Intermediate).map_err(|e| e.to_string())?;
    let server = ztna_node::transport::server_config(
        &identity,
        &[Role::Agent, Role::Connector],
        &shared.config.transport(),
    )
    .map_err(|e| e.to_string())?;
    let old = &shared.config;
    ztna_node::warn_unapplied!(new, old;
        listen, ops_listen, drain_timeout, keepalive, idle_timeout, max_flows_per_agent,
        max_flows_per_connector, max_flows, handshake_retry_threshold, max_handshakes, max_handshakes_per_source,
        max_connections_per_identity, tcp_idle_timeout, udp_idle_timeout, reconnect_hint,
        log_format, stream_window, agent_connection_window, connector_connection_window,
        identity_window,
    );
    shared.endpoint.set_server_config(Some(server));
    let m = &shared.metrics;
    m.common.cert_expiry.set(identity.expiry_unix());
    let policy = Arc::new(Policy::new(new.policy));
    let rules = policy.rules().len();
    *shared.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
    let me = identity.id.to_string();
    let expiry = identity.expiry_unix();
    *shared.identity.write().unwrap_or_else(|p| p.into_inner()) = identity.clone();
    // Before the walk below: a session not yet in `peers` sees this and checks itself.
    shared
        .reloads
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);

    // Peers the new CA does not accept.
    let peers: Vec<_> = ztna_node::lock(&shared.peers).values().cloned().collect();
    let mut disconnected = 0;
    for p in &peers {
        if let Err(why) = identity.verify_client_chain(&p.chain(), &[p.role]) {
            warn!(peer = %p.id, %why, "certificate no longer accepted after reload, disconnecting");
            m.revocations.with_label_values(&["ca_changed"]).inc();
            close(
                &p.conn,
                codes::REVOKED,
                &format!("certificate no longer accepted: {why}"),
            );
            disconnected += 1;
        }
    }

    // Registrations, both ways.
    let changes = shared
        .registry
        .reevaluate(|service, peer| policy.may_serve(service, &peer.id_str));
    let (mut restored, mut removed) = (0, 0);
    for c in changes {
        let msg = if c.allowed {
            restored += 1;
            info!(service = %c.service, connector = %c.peer.id, "registration allowed by the new policy, in service again");
            ServerMsg::Registered {
                service: c.service.clone(),
            }
        } else {
            removed += 1;
            m.revocations
                .with_label_values(&["policy_registration"])
                .inc();
            warn!(service = %c.service, connector = %c.peer.id, "registration no longer allowed by policy, removed");
            ServerMsg::RegisterRejected {
                service: c.service.clone(),
                reason: format!(
                    "policy no longer allows {} to serve {}",
                    c.peer.id, c.service
                ),
            }
        };
        if !c.peer.say(msg) {
            warn!(connector = %c.peer.id, "connector is not reading its control stream");
        }
    }

    // Flows the new policy forbids.
    let cut = shared.flows.cancel_where(codes::REVOKED, |e| {
        !policy.may_reach(&e.meta.service, &e.meta.agent)
            || !policy.may_serve(&e.meta.service, &e.meta.connector)
    });
    if cut > 0 {
        warn!(
            flows = cut,
            "flows no longer allowed by the new policy, ended"
        );
        m.revocations
            .with_label_values(&["policy_flow"])
            .inc_by(cut as u64);
    }
    shared
        .registry
        .show_policy(policy.rules().iter().map(|r| r.service.clone()));
    // Agents get their service status recomputed under the new policy.
    shared.registry.bump();
    Ok(format!(
        "certificate {me} (expires at unix {expiry:.0}), {rules} policy rules; \
         {disconnected} peers disconnected (CA), {removed} registrations removed, \
         {restored} restored, {cut} flows ended"
    ))
}
