//! `--metrics-listen ADDR`: a small HTTP server for Prometheus on its own named thread (a
//! one-thread tokio runtime with axum), so thread-per-connection servers need no async code.
//! `GET /metrics` answers the registry's text; any other path is 404. `router` is the same
//! route for a binary that already runs an axum server (vnode's control API).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::{encode, Registry, CONTENT_TYPE};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} for metrics")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics listener")]
    Start(#[source] std::io::Error),
}

/// `GET /metrics` with the registry's OpenMetrics text; 404 elsewhere.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], encode(&registry)) }
            }),
        )
        .fallback(|| async {
            (StatusCode::NOT_FOUND, "not found: try GET /metrics\n").into_response()
        })
}

/// A running metrics listener (it lives as long as the process).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
}

impl MetricsServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds `addr` now (so a bad address fails before the server announces itself) and serves
/// `/metrics` on a thread named `metrics-http`.
pub fn serve(addr: &str, registry: Arc<Registry>) -> Result<MetricsServer, MetricsError> {
    let bind_err = |source| MetricsError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = TcpListener::bind(addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(MetricsError::Start)?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "metrics listener"),
                };
                if let Err(e) = axum::serve(listener, router(registry)).await {
                    tracing::error!(error = %e, "metrics listener stopped");
                }
            });
        })
        .map_err(MetricsError::Start)?;
    Ok(MetricsServer { addr: local })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;
    use crate::metrics::Sampled;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    #[test]
    fn serves_metrics_and_404_elsewhere() {
        let mut r = Registry::default();
        Sampled::gauge(&mut r, "demo_up", "Demo", || 1);
        let srv = serve("127.0.0.1:0", Arc::new(r)).expect("serve");
        let ok = get(srv.local_addr(), "/metrics");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(ok.contains("\ndemo_up 1\n"), "{ok}");
        let nf = get(srv.local_addr(), "/other");
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let e = serve("256.0.0.1:1", Arc::new(Registry::default())).unwrap_err();
        assert!(e.to_string().contains("256.0.0.1:1"));
    }
}
