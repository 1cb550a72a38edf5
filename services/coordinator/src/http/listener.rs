//! The HTTP API's port: plain TCP, or TLS with the gRPC port's certificate, as a listener
//! `axum::serve` takes. TLS handshakes run on tasks of their own, bounded in time, so a
//! slow or silent client holds up no other connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The HTTP API's port: plain TCP, or TLS with the gRPC port's certificate.
pub enum Listener {
    /// Plain HTTP.
    Plain(TcpListener),
    /// HTTPS: connections whose handshakes completed, each on a task of its own so that
    /// a slow handshake holds up no other.
    Tls(
        mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        SocketAddr,
    ),
}

/// Longest TLS handshake before the connection is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

impl Listener {
    /// `listener`, with TLS through `tls` when given.
    pub fn new(listener: TcpListener, tls: Option<TlsAcceptor>) -> Self {
        let Some(tls) = tls else {
            return Self::Plain(listener);
        };
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    // Out of descriptors or the like: pause rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (tls, connections) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = connections.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "a TLS handshake failed"),
                        Err(_) => tracing::debug!("a TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Self::Tls(rx, local)
    }
}

/// A connection of [`Listener`].
pub enum Connection {
    /// Plain.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

impl axum::serve::Listener for Listener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self {
            Self::Plain(listener) => {
                let (io, addr) = axum::serve::Listener::accept(listener).await;
                (Connection::Plain(io), addr)
            }
            Self::Tls(rx, _) => match rx.recv().await {
                Some((io, addr)) => (Connection::Tls(Box::new(io)), addr),
                // The acceptor stopped: no connection comes any more.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match self {
            Self::Plain(listener) => listener.local_addr(),
            Self::Tls(_, addr) => Ok(*addr),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
