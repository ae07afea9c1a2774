//! virtio-net end to end on a real TAP: the test creates a TAP (`ip tuntap`), an AF_PACKET
//! socket on it echoes every EtherType-0x88B5 frame back with the MAC addresses swapped, and the
//! test guest's `test=net` sends numbered frames of 60..1514 bytes and checks each comes back
//! once and intact. The peer counts what it saw (and from which MAC), so both ends are checked.
//! A peer that corrupts one byte of one echo makes the guest fail; bad `--net` values fail
//! with one line. Needs root (CAP_NET_ADMIN) and /dev/net/tun: without them the tests fail
//! with a message saying so.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vnode_tests::{bin, guest_image, run_with_deadline, vnode_testguest, Finished};

const DEADLINE: Duration = Duration::from_secs(300);
const ETHERTYPE: u16 = 0x88b5;

/// A TAP made with `ip tuntap`, up, deleted on drop (also when the test fails).
struct TapGuard {
    name: String,
}

impl TapGuard {
    fn new() -> TapGuard {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("vnt{}x{n}", std::process::id());
        assert!(name.len() <= 15, "{name} is too long for an interface name");
        assert!(
            std::path::Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing: these tests need the tun module (modprobe tun)"
        );
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = TapGuard { name };
        ip(&["link", "set", &tap.name, "up"]);
        tap
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed (these tests need root / CAP_NET_ADMIN): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the echo peer saw.
#[derive(Debug, Default)]
struct PeerLog {
    frames: u64,
    bytes: u64,
    /// Source MACs of the frames it echoed, distinct, in order of first appearance.
    sources: Vec<[u8; 6]>,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// An AF_PACKET socket on the TAP echoing EtherType-0x88B5 frames until dropped.
struct EchoPeer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<PeerLog>>,
}

impl EchoPeer {
    /// `corrupt`: flip a payload byte of the echo of the n-th frame seen (0-based).
    fn start(ifname: &str, corrupt: Option<u64>) -> EchoPeer {
        let sock = packet_socket(ifname).unwrap_or_else(|e| {
            panic!("cannot open an AF_PACKET socket on {ifname} (needs CAP_NET_RAW): {e}")
        });
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || echo_loop(&sock, &s, corrupt));
        EchoPeer {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> PeerLog {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .expect("finish once")
            .join()
            .expect("echo thread")
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let proto = ETHERTYPE.to_be();
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).expect("no NUL in the name");
    // SAFETY: `cname` is a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and the length says so.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval, which `tv` is, for the length given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn echo_loop(sock: &OwnedFd, stop: &AtomicBool, corrupt: Option<u64>) -> PeerLog {
    let mut log = PeerLog::default();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Acquire) {
        // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `buf` and `from` are valid for the lengths given and outlive the call.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            continue; // the receive timeout: look at `stop` again
        }
        let n = n as usize;
        if from.sll_pkttype == libc::PACKET_OUTGOING || n < 18 {
            continue; // our own echoes going out
        }
        let frame = &mut buf[..n];
        let src: [u8; 6] = frame[6..12].try_into().expect("six bytes");
        if !log.sources.contains(&src) {
            log.sources.push(src);
        }
        let now = Instant::now();
        log.first.get_or_insert(now);
        log.last = Some(now);
        let (dst, rest) = frame.split_at_mut(6);
        dst.swap_with_slice(&mut rest[..6]);
        if corrupt == Some(log.frames) {
            frame[n - 1] ^= 0x5a;
        }
        log.frames += 1;
        log.bytes += n as u64;
        // SAFETY: `frame` is valid for `n` bytes; the socket is bound to the TAP.
        let w = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), n, 0) };
        assert_eq!(w, n as isize, "echo send: {}", io::Error::last_os_error());
    }
    log
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect();
    v.try_into().expect("six bytes")
}

fn net_run(tap: &TapGuard, mac: Option<&str>, frames: u64) -> Finished {
    let mut spec = format!("tap={}", tap.name);
    if let Some(m) = mac {
        spec += &format!(",mac={m}");
    }
    run_with_deadline(
        &mut vnode_testguest(
            "256M",
            1,
            &format!("test=net frames={frames}"),
            &["--net", &spec, "--stats"],
        ),
        DEADLINE,
    )
}

/// vnode's `--stats` counters (the JSON line on stderr).
fn vmm_stats(f: &Finished) -> serde_json::Value {
    f.stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("vmm").cloned())
        .unwrap_or_else(|| panic!("no --stats line in {}", f.stderr))
}

/// Runs `test=net frames=FRAMES` against the echo peer and checks both ends saw every frame
/// exactly once, from the guest's MAC; prints the round-trip rate.
fn round_trip(frames: u64) {
    let tap = TapGuard::new();
    let peer = EchoPeer::start(&tap.name, None);
    let f = net_run(&tap, None, frames);
    let log = peer.finish();
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line; stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr));
    let report = f.last_with("test").expect("report line");
    assert_eq!(done["ok"], true, "{report}\n{}", f.stderr);
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    assert_eq!(report["test"], "net");
    assert_eq!(report["sent"], frames, "{report}");
    assert_eq!(report["received"], report["sent"], "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    let mac = parse_mac(report["mac"].as_str().expect("mac"));
    assert_eq!(mac[0] & 3, 2, "default MAC is locally administered unicast");
    assert_eq!(log.frames, frames, "the peer saw every frame once");
    assert_eq!(log.sources, vec![mac], "all from the guest's MAC");
    let secs = (log.last.unwrap() - log.first.unwrap()).as_secs_f64();
    let bytes = report["bytes"].as_u64().unwrap();
    assert_eq!(log.bytes, bytes, "the peer got the bytes the guest sent");
    let stats = vmm_stats(&f);
    assert_eq!(stats["net_tx_frames"], frames, "{stats}");
    assert_eq!(stats["net_tx_bytes"], bytes, "{stats}");
    // Echoes, plus whatever the host itself sent to the TAP.
    assert!(
        stats["net_rx_frames"].as_u64().unwrap() >= frames,
        "{stats}"
    );
    assert_eq!(stats["net_bad_chains"], 0, "{stats}");
    println!(
        "virtio-net TAP round trip: {frames} frames ({} KiB each way) in {secs:.3} s: \
         {:.0} frames/s, {:.1} Mbit/s each way",
        bytes >> 10,
        frames as f64 / secs,
        bytes as f64 * 8.0 / secs / 1e6
    );
}

#[test]
fn frames_round_trip_through_a_tap() {
    round_trip(2000);
}

/// The benchmark figure: long enough for a stable rate.
#[test]
fn round_trip_throughput() {
    round_trip(50_000);
}

#[test]
fn a_corrupted_echo_fails_the_guest() {
    let tap = TapGuard::new();
    let peer = EchoPeer::start(&tap.name, Some(100));
    let f = net_run(&tap, Some("52:54:00:12:34:56"), 300);
    let log = peer.finish();
    assert_eq!(f.status.code(), Some(1), "{}\n{}", f.stdout, f.stderr);
    let report = f.last_with("test").expect("report line");
    assert_eq!(report["mac"], "52:54:00:12:34:56");
    assert_eq!(report["mismatches"], 1, "{report}");
    assert_eq!(report["received"], 300, "{report}");
    assert_eq!(f.last_with("done").expect("done")["ok"], false);
    assert_eq!(log.frames, 300);
    assert_eq!(log.sources, vec![[0x52, 0x54, 0, 0x12, 0x34, 0x56]]);
}

#[test]
fn hostile_chains_are_dropped_and_the_vmm_lives() {
    let tap = TapGuard::new();
    let peer = EchoPeer::start(&tap.name, None);
    let f = run_with_deadline(
        &mut vnode_testguest(
            "256M",
            1,
            "test=net frames=500 mode=hostile",
            &["--net", &format!("tap={}", tap.name), "--stats"],
        ),
        DEADLINE,
    );
    let log = peer.finish();
    let report = f.last_with("test").expect("report line");
    assert_eq!(f.status.code(), Some(0), "{report}\n{}", f.stderr);
    assert_eq!(report["hostile"], true);
    for k in ["outside_ram_len", "writable_len", "zero_len"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    assert_eq!(report["loop_needs_reset"], true, "{report}");
    assert_eq!(report["received"], 500, "{report}");
    assert_eq!(log.frames, 500, "no hostile chain reached the TAP");
    assert!(
        f.stderr.contains("bad chain from the guest"),
        "{}",
        f.stderr
    );
    let stats = vmm_stats(&f);
    assert_eq!(
        stats["net_bad_chains"], 4,
        "three dropped, one loop: {stats}"
    );
    assert_eq!(stats["net_broken"], 1, "{stats}");
    assert_eq!(stats["net_tx_frames"], 500, "{stats}");
}

#[test]
fn no_echo_means_lost_frames() {
    let tap = TapGuard::new();
    let f = net_run(&tap, None, 10);
    assert_eq!(f.status.code(), Some(1), "{}\n{}", f.stdout, f.stderr);
    let report = f.last_with("test").expect("report line");
    assert_eq!(report["lost"], 10, "{report}");
    assert_eq!(report["received"], 0, "{report}");
}

/// Runs `vnode run` with one `--net` value and returns (exit code, stderr).
fn bad_net(spec: &str) -> (Option<i32>, String) {
    let f = run_with_deadline(
        Command::new(bin("vnode"))
            .args(["run", "--kernel"])
            .arg(guest_image("testguest.elf"))
            .args(["--cmdline", "test=cpu", "--net", spec]),
        Duration::from_secs(60),
    );
    (f.status.code(), f.stderr)
}

#[test]
fn bad_net_values_fail_with_one_line() {
    let tap = TapGuard::new();
    // Hold the TAP the way vnode would: a second opener gets EBUSY.
    let held = hold_tap(&tap.name);
    let cases = [
        // Malformed values are usage errors (250); a TAP that cannot be used, set-up errors (251).
        (
            "tap=lo".to_owned(),
            "lo exists and is not a TAP device",
            251,
        ),
        ("tap=".to_owned(), "must be 1 to 15 bytes", 250),
        (
            "tap=abcdefghijklmnop".to_owned(),
            "must be 1 to 15 bytes",
            250,
        ),
        ("tap=a/b".to_owned(), "must be 1 to 15 bytes", 250),
        (
            "tap=x,mac=01:00:5e:00:00:01".to_owned(),
            "mac must be six hex bytes",
            250,
        ),
        (
            "tap=x,mac=52:54:00:zz:00:01".to_owned(),
            "mac must be six hex bytes",
            250,
        ),
        ("tap0".to_owned(), "expected tap=NAME[,mac=MAC]", 250),
        (format!("tap={}", tap.name), "is busy", 251),
    ];
    for (spec, want, want_code) in cases {
        let (code, stderr) = bad_net(&spec);
        assert_eq!(code, Some(want_code), "{spec}: {stderr}");
        assert!(stderr.starts_with("vnode: error: "), "{spec}: {stderr}");
        assert!(stderr.contains(want), "{spec}: want {want:?} in {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{spec}: {stderr}");
    }
    drop(held);
}

/// Attaches to the TAP `name` (as vnode does) and keeps it attached while the fd lives.
fn hold_tap(name: &str) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq, which `req` is laid out as.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
    assert_eq!(r, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
    f
}
