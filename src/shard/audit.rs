//! The records a shard writes of itself, not of a request: damage recovery found, and the
//! refusals that coalescing left out.

use std::net::SocketAddr;

use super::Shard;
use crate::audit::{Actor, ActorScope, AuditEvent};
use crate::auth::refusals::{LeftOut, Refused};

impl Shard {
    /// One `audit_integrity` record for each damaged segment recovery found: the first records of
    /// the segment the chain goes on in.
    pub(crate) fn record_integrity_failures(&self) {
        for found in self.audit.take_damage() {
            let Ok(ticket) = self.audit.ticket() else {
                self.metrics.audit_errors.inc();
                continue;
            };
            let event = AuditEvent {
                ts_unix_ms: AuditEvent::now_unix_ms(),
                request_id: self.next_request_id(),
                actor: Actor::System,
                action: crate::audit::record::INTEGRITY_ACTION,
                function_id: None,
                pipeline_id: None,
                tenant_id: None,
                // No request: no HTTP status.
                status_code: 0,
                error_kind: None,
                failed_step: None,
                latency_us: 0,
                peer_addr: SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0),
                client_cert_subject: None,
                repeated: 0,
                integrity: Some(found),
            };
            self.audit.record(ticket, &event);
        }
    }

    /// One audit record summing up refusals left out of the log.
    pub(crate) fn record_left_out(&self, left: LeftOut) {
        let Ok(ticket) = self.audit.ticket() else {
            // The log cannot be written (and refuses): counted as a lost record.
            self.metrics.audit_errors.inc();
            return;
        };
        let (token_id, ip) = match left.who {
            Refused::Source(ip) => (None, ip),
            Refused::Token(id) => (Some(id.to_string()), std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        let status = if left.kind == "unauthorized" { 401 } else { 429 };
        let event = AuditEvent {
            ts_unix_ms: AuditEvent::now_unix_ms(),
            request_id: self.next_request_id(),
            actor: Actor::Bearer { token_id, scope: ActorScope::None },
            // Not a refusal itself: `repeated` counts the ones it stands for.
            action: "refusals_left_out",
            function_id: None,
            pipeline_id: None,
            tenant_id: None,
            status_code: status,
            error_kind: Some(left.kind),
            failed_step: None,
            latency_us: 0,
            peer_addr: SocketAddr::new(ip, 0),
            client_cert_subject: None,
            repeated: left.count,
            integrity: None,
        };
        self.audit.record(ticket, &event);
    }
}
