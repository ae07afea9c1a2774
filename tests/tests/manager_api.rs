//! The manager's REST API against bad input, each case its own test: a real `vnode-manager`
//! (SQLite store) and raw HTTP. Every refusal is a 4xx with a JSON message, never a 5xx; a vNode
//! that fits nowhere is refused with the resource and the hosts named.

mod manager_support;

use manager_support::*;
use vnode_manager_client::types::HostKind;

fn setup(tag: &str) -> (Proc, String, Scratch) {
    let dir = tempdir(tag);
    let (p, url) = manager(
        &dir,
        "m",
        &format!("sqlite:{}", dir.join("m.db").display()),
        0,
    );
    (p, url, dir)
}

fn error_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
    v["error"].as_str().expect("an error message").to_owned()
}

const OK: &str = r#"{"vcpus":1,"mem":"64M","local_mem":"16M","kernel":"/k"}"#;

#[test]
fn invalid_json_is_a_400_with_a_message() {
    let (_m, url, _d) = setup("mgr-json");
    for body in [&b"{bad"[..], b"", b"[1,2]", b"\xff\xfe", b"null"] {
        let (st, b) = raw(&url, "POST", "/vnodes", body);
        assert_eq!(st, 400, "{body:?}: {b}");
        assert!(error_of(&b).starts_with("invalid JSON body"), "{b}");
    }
    let (st, b) = raw(&url, "PUT", "/hosts/x", b"{\"kind\":\"gpu\"}");
    assert_eq!(st, 400, "{b}");
    assert!(error_of(&b).contains("gpu"), "{b}");
    let (st, b) = raw(
        &url,
        "POST",
        "/vnodes",
        br#"{"vcpus":1,"mem":"64M","local_mem":"16M","kernel":"/k","typo":1}"#,
    );
    assert_eq!(st, 400);
    assert!(error_of(&b).contains("typo"), "{b}");
}

#[test]
fn negative_and_absurd_sizes_are_4xx() {
    let (_m, url, _d) = setup("mgr-sizes");
    for (body, want) in [
        (
            r#"{"vcpus":-1,"mem":"64M","local_mem":"16M","kernel":"/k"}"#,
            "-1",
        ),
        (
            r#"{"vcpus":1,"mem":-4096,"local_mem":"16M","kernel":"/k"}"#,
            "invalid size",
        ),
        (
            r#"{"vcpus":1,"mem":"64Q","local_mem":"16M","kernel":"/k"}"#,
            "64Q",
        ),
        (
            r#"{"vcpus":1,"mem":1e30,"local_mem":"16M","kernel":"/k"}"#,
            "invalid size",
        ),
        (
            r#"{"vcpus":1,"mem":"64M","local_mem":"16M","disk_size":"-1G","kernel":"/k"}"#,
            "-1G",
        ),
    ] {
        let (st, b) = raw(&url, "POST", "/vnodes", body.as_bytes());
        assert_eq!(st, 400, "{body}: {b}");
        assert!(error_of(&b).contains(want), "{body}: {b}");
    }
    for (body, field) in [
        (
            r#"{"vcpus":0,"mem":"64M","local_mem":"16M","kernel":"/k"}"#,
            "vcpus",
        ),
        (
            r#"{"vcpus":100000,"mem":"64M","local_mem":"16M","kernel":"/k"}"#,
            "vcpus",
        ),
        (
            r#"{"vcpus":1,"mem":"64M","local_mem":"1G","kernel":"/k"}"#,
            "local_mem",
        ),
        (
            r#"{"vcpus":1,"mem":12345,"local_mem":"16M","kernel":"/k"}"#,
            "mem",
        ),
        (
            r#"{"vcpus":1,"mem":"64M","local_mem":"16M","kernel":""}"#,
            "kernel",
        ),
    ] {
        let (st, b) = raw(&url, "POST", "/vnodes", body.as_bytes());
        assert_eq!(st, 422, "{body}: {b}");
        assert!(error_of(&b).contains(field), "{body}: {b}");
    }
    // Absurd but well-formed: 16 EiB of guest RAM fits nowhere (409 naming the servers).
    keep_alive(&url, "c", compute(4, "1G"));
    keep_alive(&url, "m1", server(HostKind::Memory, "1G"));
    keep_alive(&url, "m2", server(HostKind::Memory, "1G"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (st, b) = raw(
        &url,
        "POST",
        "/vnodes",
        br#"{"vcpus":1,"mem":"15E","local_mem":"16M","kernel":"/k"}"#,
    );
    assert_eq!(st, 409, "{b}");
    assert!(
        error_of(&b).contains("m1 (1 GiB free), m2 (1 GiB free)"),
        "{b}"
    );
}

#[test]
fn unknown_ids_and_paths_are_404() {
    let (_m, url, _d) = setup("mgr-ids");
    for (method, path) in [
        ("GET", "/vnodes/12345"),
        ("DELETE", "/vnodes/12345"),
        ("GET", "/vnodes/no-such-name"),
        ("GET", "/hosts/nobody"),
        ("POST", "/hosts/nobody/heartbeat"),
        ("GET", "/nothing/here"),
    ] {
        let body: &[u8] = if method == "POST" { b"{}" } else { b"" };
        let (st, b) = raw(&url, method, path, body);
        assert_eq!(st, 404, "{method} {path}: {b}");
        assert!(!error_of(&b).is_empty());
    }
    let (st, b) = raw(&url, "PATCH", "/vnodes", b"");
    assert_eq!(st, 405, "{b}");
    assert!(!error_of(&b).is_empty());
}

#[test]
fn a_vnode_that_fits_nowhere_names_the_resource_and_hosts() {
    let (_m, url, _d) = setup("mgr-nofit");
    keep_alive(&url, "a", compute(2, "1G"));
    keep_alive(&url, "b", compute(1, "1G"));
    keep_alive(&url, "m1", server(HostKind::Memory, "1G"));
    keep_alive(&url, "m2", server(HostKind::Memory, "1G"));
    keep_alive(&url, "s1", server(HostKind::Storage, "1G"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (st, b) = raw(
        &url,
        "POST",
        "/vnodes",
        br#"{"vcpus":4,"mem":"64M","local_mem":"16M","kernel":"/k"}"#,
    );
    assert_eq!(st, 409, "{b}");
    assert_eq!(
        error_of(&b),
        "no compute host has 4 free vCPUs: a (2 free), b (1 free)"
    );
    let (st, b) = raw(
        &url,
        "POST",
        "/vnodes",
        br#"{"vcpus":1,"mem":"64M","local_mem":"16M","disk_size":"2G","kernel":"/k"}"#,
    );
    assert_eq!(st, 409, "{b}");
    assert_eq!(
        error_of(&b),
        "no storage server has 2 GiB free disk: s1 (1 GiB free)"
    );
    // One that fits is placed, with primary and backup on distinct memory servers.
    let (st, b) = raw(&url, "POST", "/vnodes", OK.as_bytes());
    assert_eq!(st, 201, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let r = &v["placement"]["regions"][0];
    assert_ne!(r["primary"], r["backup"], "{b}");
    let (st, b) = raw(
        &url,
        "POST",
        "/vnodes",
        br#"{"name":"x","vcpus":1,"mem":"64M","local_mem":"16M","kernel":"/k"}"#,
    );
    assert_eq!(st, 201, "{b}");
    let (st, b) = raw(
        &url,
        "POST",
        "/vnodes",
        br#"{"name":"x","vcpus":1,"mem":"64M","local_mem":"16M","kernel":"/k"}"#,
    );
    assert_eq!(st, 409, "{b}");
    assert!(error_of(&b).contains("exists"), "{b}");
}
