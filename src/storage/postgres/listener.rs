//! `LISTEN oncely_tasks`: turns the notifications every instance's writes
//! send into this instance's wake-ups. A lost connection is reopened; while
//! it is down, waiters fall back on their once-a-second re-read, and on
//! reconnection every waiter is woken to re-read at once.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{super::TaskEvents, queries::CHANNEL};

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
        loop {
            if let Err(error) = listen(&pool, &events).await {
                tracing::debug!(%error, "task notifications interrupted; listening again shortly");
            }
            tokio::time::sleep(RETRY).await;
        }
    }))
}

/// Listens until the connection fails for good.
async fn listen(pool: &PgPool, events: &TaskEvents) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
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
    match payload.strip_prefix("finished:") {
        Some(id) => match Uuid::parse_str(id) {
            Ok(task_id) => events.task_finished(task_id),
            Err(_) => events.anything(),
        },
        None => events.task_ready(),
    }
}
