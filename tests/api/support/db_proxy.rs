//! A TCP proxy in front of PostgreSQL that a test cuts, stalls and
//! restores, to make the database go away and come back. Shared by the API
//! tests (`support::PgProxy`) and the chaos harness, which includes this
//! file by path.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// A TCP proxy between one instance and PostgreSQL: `cut` drops every
/// connection and refuses new ones until `restore`; `stall` holds every
/// byte in both directions until `unstall`.
pub(crate) struct PgProxy {
    /// The port it listens on, on 127.0.0.1.
    pub(crate) port: u16,
    up: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    /// A proxy to `upstream` (`host:port`), letting connections through.
    pub(crate) async fn start_to(upstream: String) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("bind a proxy: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let up = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, stalled, connections) = (up.clone(), stalled.clone(), connections.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue;
                    }
                    let (upstream, stalled) = (upstream.clone(), stalled.clone());
                    let handle = tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(&upstream).await {
                            relay(client, server, stalled).await;
                        }
                    });
                    let mut connections = connections.lock().expect("lock");
                    connections.retain(|c| !c.is_finished());
                    connections.push(handle);
                }
            }
        });
        Ok(Self {
            port,
            up,
            stalled,
            connections,
            accept,
        })
    }

    /// Cuts every open connection and refuses new ones.
    pub(crate) fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for handle in self.connections.lock().expect("lock").drain(..) {
            handle.abort();
        }
    }

    /// Lets connections through again.
    pub(crate) fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Holds (`true`) or releases every byte in both directions.
    #[allow(dead_code)] // the chaos harness stalls; the API tests only cut
    pub(crate) fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies bytes both ways, holding them while `stalled`.
async fn relay(client: TcpStream, server: TcpStream, stalled: Arc<AtomicBool>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, stalled.clone());
    let down = pump(server_read, client_write, stalled);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
