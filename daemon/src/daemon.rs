//! The tokio shell: the agent loop with its timer, SIGHUP, control requests and shutdown.

use std::future::Future;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{interval, MissedTickBehavior};

use crate::agent::{now, Agent};
use crate::backend::{LinkBackend, WgBackend};
use crate::control::{accept_loop, Command};
use crate::error::{Error, Result};
use crate::protocol::handle_request;

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = interval(period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Run the agent until `shutdown` resolves: a pass at start, one every reconcile interval, a
/// reload and pass on SIGHUP or `meshctl reload`, and control requests in between. Returns the
/// agent so a caller (or test) can inspect it.
pub async fn run<W: WgBackend, L: LinkBackend>(
    mut agent: Agent<W, L>,
    listener: &UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<Agent<W, L>> {
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| Error::io("cannot install the SIGHUP handler", e))?;
    let (tx, mut rx) = mpsc::channel::<Command>(32);
    let accept = accept_loop(listener, tx);
    tokio::pin!(accept);
    tokio::pin!(shutdown);
    let mut period = agent.settings().reconcile_interval;
    let mut timer = ticker(period);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = &mut accept => {}
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading {}", agent.config_path().display());
                let _ = agent.handle_reload();
                agent.reconcile(now()).await;
            }
            Some(cmd) = rx.recv() => {
                let response = handle_request(&mut agent, cmd.request).await;
                let _ = cmd.reply.send(response);
            }
            _ = timer.tick() => {
                agent.reconcile(now()).await;
            }
        }
        if agent.settings().reconcile_interval != period {
            period = agent.settings().reconcile_interval;
            timer = ticker(period);
            timer.reset();
        }
    }
    tracing::info!("stopping; the interface and its engine stay up");
    Ok(agent)
}

/// Install the SIGTERM/SIGINT handlers now and return a future that resolves on either.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("cannot install the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("cannot install the SIGINT handler", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}
