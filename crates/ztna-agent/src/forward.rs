//! Local TCP ports: each accepted connection becomes one flow stream through the best relay.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info_span, Instrument};
use ztna_node::flows::Kind;
use ztna_node::io::{prepare_tcp, splice_tcp, AbortCause, SpliceCtl};
use ztna_node::{warn_limited, CancellationToken};
use ztna_proto::Protocol;

use crate::open::{open_any, OpenError};
use crate::{FlowMeta, Shared};

/// Accepts local connections until `stop` (the drain): then the listener is closed, so new
/// connections are refused at once while running flows finish.
pub(crate) async fn tcp(
    shared: Arc<Shared>,
    service: String,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let service: Arc<str> = Arc::from(service);
    loop {
        let (tcp, client) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    ztna_node::warn_limited!(REFUSE_LOG_EVERY, %service, error = %e, "accept failed");
                    // Out of descriptors or memory: give flows a moment to end. A connection
                    // that failed on its own (reset before it was accepted) is no reason to wait.
                    if !matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        let span = info_span!("flow", %service, %client);
        shared
            .flows
            .spawn(tcp_flow(shared.clone(), service.clone(), tcp).instrument(span));
    }
}

/// Flows cut by the tunnel (a relay lost its connector mid-flow, a connector's backend reset):
/// the user's connection was reset, so this is logged, but at most once per period.
const CUT_LOG_EVERY: Duration = Duration::from_secs(5);
/// Accept failures and refused local connections: at most one line per kind this often (a
/// client retrying in a loop, or descriptors running out, must not flood the journal).
const REFUSE_LOG_EVERY: Duration = Duration::from_secs(5);

/// Refuses a local connection with RST, so the client fails at once instead of seeing an empty,
/// clean close.
fn refuse_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

async fn tcp_flow(shared: Arc<Shared>, service: Arc<str>, tcp: TcpStream) {
    // If this process dies, the local client sees a reset, never a clean end of a truncated
    // stream.
    prepare_tcp(&tcp);
    let flows = &shared.metrics.flows;
    let guard = shared.flows.register(
        FlowMeta {
            service: service.clone(),
        },
        Kind::Opening,
    );
    match open_any(&shared, &service, Protocol::Tcp, 0, &mut Vec::new(), true).await {
        Ok(opened) => {
            guard.set_kind(Kind::Tcp);
            flows
                .with_label_values(&[&service, "tcp", opened.via.label(), "ok"])
                .inc();
            debug!(via = %opened.via.name(), path = opened.via.label(), "flow open");
            let ctl = SpliceCtl::for_flow(&guard, None);
            let started = tokio::time::Instant::now();
            let (mut recv, prefix) = opened.recv.into_parts();
            let mut send = opened.send;
            let stats = splice_tcp(
                tcp,
                &mut send,
                &mut recv,
                prefix,
                None,
                None,
                &ctl,
                Default::default(),
            )
            .await;
            debug!(
                up = stats.forward,
                down = stats.backward,
                end = ?stats.end,
                "flow ended"
            );
            if let Some(AbortCause::Tunnel(why)) = &stats.cause {
                warn_limited!(
                    CUT_LOG_EVERY,
                    via = %opened.via.name(),
                    path = opened.via.label(),
                    up = stats.forward,
                    down = stats.backward,
                    secs = format_args!("{:.2}", started.elapsed().as_secs_f64()),
                    why = %why,
                    "a flow to {service} was cut by the tunnel; its local connection was reset"
                );
            }
        }
        Err(e) => {
            let (label, why) = e.describe();
            flows
                .with_label_values(&[&service, "tcp", "relay", label])
                .inc();
            match e {
                OpenError::Rejected(..) => {
                    ztna_node::warn_limited!(REFUSE_LOG_EVERY, why = %why, "refusing local connection to {service}");
                }
                OpenError::NoTunnel(_) => {
                    ztna_node::warn_limited!(REFUSE_LOG_EVERY, why = %why, "refusing local connection to {service}: no intermediate could carry it");
                }
            }
            drop(guard);
            refuse_tcp(tcp);
        }
    }
}
