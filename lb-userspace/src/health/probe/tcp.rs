//! `type = "tcp"`: healthy when the backend accepts a TCP connection.

use std::net::SocketAddr;

use super::{ProbeFailure, connect};

/// Connects and closes at once (dropping the stream).
///
/// # Errors
/// [`ProbeFailure::Connect`], or [`ProbeFailure::Local`] when this host
/// could not make the socket.
pub async fn probe(address: SocketAddr) -> Result<(), ProbeFailure> {
    connect(address).await.map(drop)
}
