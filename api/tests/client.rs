//! The client against a real HTTP server on a Unix socket (axum, as vnode serves it): answers
//! decode, error statuses carry the server's message and the socket's name.

use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use vnode_api::client::{Client, ClientError};
use vnode_api::{Counters, ErrorBody, ExCacheResize};

fn serve(socket: &std::path::Path) {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let app = Router::new()
                .route("/vm/counters", get(|| async { Json(Counters::default()) }))
                .route(
                    "/vm/resume",
                    put(|| async {
                        let e = ErrorBody {
                            error: "the VM is running".into(),
                        };
                        (StatusCode::CONFLICT, Json(e))
                    }),
                )
                .route(
                    "/vm/excache",
                    put(|Json(r): Json<ExCacheResize>| async move {
                        let e = ErrorBody {
                            error: format!("got {}", r.local_mem.bytes().unwrap()),
                        };
                        (StatusCode::BAD_REQUEST, Json(e))
                    }),
                );
            let l = tokio::net::UnixListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
}

#[test]
fn answers_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    serve(&sock);
    let c = Client::new(&sock)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    assert_eq!(c.counters().unwrap(), Counters::default());

    let e = c.resume().unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT));
    let msg = e.to_string();
    assert!(msg.contains("api.sock") && msg.contains("409") && msg.contains("the VM is running"));

    let e = c.resize_excache(64 << 20).unwrap_err();
    assert!(e.to_string().contains(&format!("got {}", 64 << 20)), "{e}");

    // An unknown route: the server's 404, still a Status error.
    assert_eq!(c.info().unwrap_err().status(), Some(StatusCode::NOT_FOUND));
}

#[test]
fn no_server_names_the_socket() {
    let c = Client::new("/nonexistent/vnode.sock").unwrap();
    let e = c.info().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }));
    assert!(e.to_string().contains("/nonexistent/vnode.sock"));
    assert!(c.wait_gone(Duration::from_millis(10)));
}
