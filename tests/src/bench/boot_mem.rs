//! `vnode-bench boot-mem` (issue 3).
//!
//! (a) Fill bandwidth: the guest's `test=mem pattern=seq writes=100` fill phase (first touch:
//! every page of fresh guest RAM written once) and its passes (with writes=100 and one vCPU each
//! pass rewrites every page in ascending order: a warm fill), against the very same loop
//! (`testguest::fill_pages`, page by page) run natively on a fresh and then a warm mapping.
//! (b) Start time: spawn `vnode` -> first JSON line on stdout, against spawn+exit of `/bin/true`.
//! All three are interleaved run by run so that load drifts hit them alike.

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use super::guestrun::{spawn_floor, GuestSpec};
use super::host::native_fill;
use super::stats::Summary;
use super::table::{num, ratio, Table};
use super::{fmt_size, parse_size, write_out, Common, Env};

#[derive(Args)]
pub struct BootMemArgs {
    #[command(flatten)]
    pub common: Common,
    /// Bytes filled (the guest's `bytes=`; 64M with --quick).
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    bytes: u64,
    /// Warm fills per run (the guest's `passes=`).
    #[arg(long, default_value_t = 3)]
    passes: u32,
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    mem: String,
}

/// Per-run samples.
#[derive(Default)]
struct Samples {
    floor_ms: Vec<f64>,
    first_line_ms: Vec<f64>,
    wall_ms: Vec<f64>,
    guest_first: Vec<f64>,
    guest_warm: Vec<f64>,
    native_first: Vec<f64>,
    native_warm: Vec<f64>,
}

pub fn run(env: &Env, a: &BootMemArgs) -> Result<()> {
    let bytes = if env.quick { 64 << 20 } else { a.bytes };
    let passes = a.passes.max(1);
    let cmdline = format!(
        "test=mem bytes={} pattern=seq writes=100 passes={passes} seed={}",
        fmt_size(bytes),
        env.seed
    );
    let spec = GuestSpec {
        vnode: &env.vnode,
        kernel: &env.kernel,
        mem: a.mem.clone(),
        cmdline,
        extra: Vec::new(),
        env: Vec::new(),
    };
    println!("  guest: {}", spec.shell_line());
    println!(
        "  native: testguest::fill_pages page by page over a fresh mmap of {}, then {passes} warm fills",
        fmt_size(bytes)
    );
    let mut s = Samples::default();
    for r in 0..env.runs {
        s.floor_ms
            .push(spawn_floor("/bin/true")?.as_secs_f64() * 1e3);
        let g = spec.run()?;
        let pages = g.field("pages")?;
        if g.field("writes")? != pages * passes as u64 || g.field("reads")? != 0 {
            bail!(
                "the passes phase was not {passes} full rewrites: {}",
                g.summary
            );
        }
        s.first_line_ms.push(g.first_line.as_secs_f64() * 1e3);
        s.wall_ms.push(g.wall.as_secs_f64() * 1e3);
        s.guest_first.push(g.field("fill_cycles")? as f64);
        s.guest_warm
            .push(g.field("pass_cycles")? as f64 / passes as f64);
        let n = native_fill(bytes as usize, passes, env.seed)?;
        s.native_first.push(n.first_touch_cycles as f64);
        let mut w: Vec<f64> = n.warm_cycles.iter().map(|&c| c as f64).collect();
        w.sort_by(f64::total_cmp);
        s.native_warm.push(w[w.len() / 2]);
        eprint!("\r  run {}/{}", r + 1, env.runs);
    }
    eprintln!();
    println!();
    print!("{}", fill_table(env, bytes, &s));
    println!();
    print!("{}", start_table(&s));
    let raw = json!({
        "bytes": bytes, "passes": passes, "tsc_hz": env.tsc_hz,
        "floor_ms": s.floor_ms, "first_line_ms": s.first_line_ms, "wall_ms": s.wall_ms,
        "guest_first_touch_cycles": s.guest_first, "guest_warm_cycles": s.guest_warm,
        "native_first_touch_cycles": s.native_first, "native_warm_cycles": s.native_warm,
    });
    let p = write_out(&env.out, "boot-mem.json", &format!("{raw:#}\n"))?;
    println!("\n  raw samples: {}", p.display());
    Ok(())
}

fn fill_table(env: &Env, bytes: u64, s: &Samples) -> String {
    let b = bytes as f64;
    let ms = |c: f64| c / env.tsc_hz * 1e3;
    let mut t = Table::new(&[
        "fill (seq, 4 KiB pages)",
        "median ms",
        "p90 ms",
        "GB/s",
        "bytes/cycle",
        "bandwidth vs native",
    ]);
    let rows = [
        ("native, first touch", &s.native_first, &s.native_first),
        ("vnode guest, first touch", &s.guest_first, &s.native_first),
        ("native, warm", &s.native_warm, &s.native_warm),
        ("vnode guest, warm", &s.guest_warm, &s.native_warm),
    ];
    for (name, v, base) in rows {
        let (Some(m), Some(bm)) = (Summary::of(v), Summary::of(base)) else {
            continue;
        };
        t.row(vec![
            name.to_string(),
            num(Some(ms(m.median)), 1),
            num(Some(ms(m.p90)), 1),
            num(Some(b / m.median * env.tsc_hz / 1e9), 2),
            num(Some(b / m.median), 3),
            // Bandwidth relative to native: < 1 is slower.
            ratio(Some(bm.median / m.median)),
        ]);
    }
    let pages = b / 4096.0;
    let per_page = |first: &[f64], warm: &[f64]| {
        let f = Summary::of(first)?.median;
        let w = Summary::of(warm)?.median;
        Some((f - w) / pages / env.tsc_hz * 1e6)
    };
    format!(
        "(a) fill bandwidth, {} per fill, medians of {} runs (GB/s = bytes/cycle x host TSC)\n{}\
         first-touch cost per page (first touch - warm): native {} us, vnode guest {} us\n",
        fmt_size(bytes),
        s.native_first.len(),
        t.render(),
        num(per_page(&s.native_first, &s.native_warm), 2),
        num(per_page(&s.guest_first, &s.guest_warm), 2),
    )
}

fn start_table(s: &Samples) -> String {
    let mut t = Table::new(&["start", "median ms", "p90 ms", "min ms", "vs /bin/true"]);
    let floor = Summary::of(&s.floor_ms).map(|f| f.median);
    for (name, v) in [
        ("/bin/true spawn+exit", &s.floor_ms),
        ("vnode spawn -> first guest line", &s.first_line_ms),
        ("vnode spawn -> exit (whole run)", &s.wall_ms),
    ] {
        let Some(m) = Summary::of(v) else { continue };
        t.row(vec![
            name.to_string(),
            num(Some(m.median), 2),
            num(Some(m.p90), 2),
            num(Some(m.min), 2),
            ratio(floor.map(|f| m.median / f)),
        ]);
    }
    format!(
        "(b) start time, medians of {} runs\n{}",
        s.floor_ms.len(),
        t.render()
    )
}
