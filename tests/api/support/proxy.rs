//! TCP proxies for fault injection: one in front of PostgreSQL that a test
//! cuts and restores (`db_proxy.rs`), one in front of the server that drops
//! responses.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::TestDb;

pub(crate) use super::db_proxy::PgProxy;

impl PgProxy {
    /// A proxy in front of the test database's server.
    pub(crate) async fn start(db: &TestDb) -> Self {
        let (host, port) = db.server();
        Self::start_to(format!("{host}:{port}"))
            .await
            .expect("start a database proxy")
    }
}

/// A TCP proxy in front of the server that cuts its first `drops`
/// connections at the moment the server starts sending a response: the
/// server has done the work, the client never sees the answer. With no
/// drops it only relays, and counts the connections it sees.
pub(crate) struct DroppingProxy {
    pub(crate) addr: SocketAddr,
    /// Responses cut.
    pub(crate) dropped: Arc<AtomicUsize>,
    /// Connections from clients.
    pub(crate) opened: Arc<AtomicUsize>,
    /// Connections that have ended (either side closed, or a response was
    /// cut).
    pub(crate) closed: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl DroppingProxy {
    pub(crate) async fn start(upstream: SocketAddr, drops: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dropped = Arc::new(AtomicUsize::new(0));
        let opened = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let to_drop = Arc::new(AtomicUsize::new(drops));
        let accept = tokio::spawn({
            let (dropped, opened, closed) = (dropped.clone(), opened.clone(), closed.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    opened.fetch_add(1, Ordering::SeqCst);
                    let cut = to_drop
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    let (dropped, closed) = (dropped.clone(), closed.clone());
                    tokio::spawn(async move {
                        relay(client, upstream, cut, dropped).await;
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Self {
            addr,
            dropped,
            opened,
            closed,
            accept,
        }
    }
}

impl Drop for DroppingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays one connection. Server-to-client bytes are read as HTTP/2 frames;
/// when `cut`, the first HEADERS or DATA frame of a stream (a response) ends
/// the connection instead of being forwarded.
async fn relay(client: TcpStream, upstream: SocketAddr, cut: bool, dropped: Arc<AtomicUsize>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests =
        tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
    loop {
        let mut header = [0u8; 9];
        if server_read.read_exact(&mut header).await.is_err() {
            break;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let frame_type = header[3];
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; length];
        if server_read.read_exact(&mut payload).await.is_err() {
            break;
        }
        if cut && stream != 0 && (frame_type == 0 || frame_type == 1) {
            dropped.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if client_write.write_all(&header).await.is_err()
            || client_write.write_all(&payload).await.is_err()
        {
            break;
        }
    }
    requests.abort();
}
