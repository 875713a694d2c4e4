//! `LISTEN` on the tasks' channel (`notify::CHANNEL`): turns the notifications every instance's writes
//! send into this instance's wake-ups. A lost connection is reopened; while
//! it is down, waiters fall back on their once-a-second re-read, and on
//! reconnection every waiter is woken to re-read at once.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{
    super::TaskEvents,
    notify::{CHANNEL, FINISHED},
};

/// How long to wait before listening again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// The running listener; dropping it stops it.
#[derive(Debug)]
pub(super) struct Listening(JoinHandle<()>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts listening on a connection of `pool`'s database.
pub(super) fn start(pool: PgPool, events: TaskEvents) -> Listening {
    Listening(tokio::spawn(async move {
        // Warn once per outage: without notifications, waiters fall back on
        // re-reading every second, which works but costs latency.
        let mut warned = false;
        loop {
            match listen(&pool, &events, &mut warned).await {
                Err(error) if !warned => {
                    tracing::warn!(%error, "cannot listen for task notifications; waiters re-read every second until it works");
                    warned = true;
                }
                Err(error) => tracing::debug!(%error, "still cannot listen for task notifications"),
                Ok(()) => {}
            }
            tokio::time::sleep(RETRY).await;
        }
    }))
}

/// Listens until the connection fails for good.
async fn listen(pool: &PgPool, events: &TaskEvents, warned: &mut bool) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    if std::mem::take(warned) {
        tracing::info!("listening for task notifications again");
    }
    // Whatever happened while nobody listened, re-read it.
    events.anything();
    loop {
        match listener.try_recv().await? {
            Some(notification) => dispatch(notification.payload(), events),
            // The connection was lost and is reopened by the next call;
            // notifications in between are lost.
            None => events.anything(),
        }
    }
}

fn dispatch(payload: &str, events: &TaskEvents) {
    match payload.strip_prefix(FINISHED) {
        Some(id) => match Uuid::parse_str(id) {
            Ok(task_id) => events.task_finished(task_id),
            Err(_) => events.anything(),
        },
        None => events.task_ready(),
    }
}
