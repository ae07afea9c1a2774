//! The guest's command line: `test=mem bytes=SIZE pattern=seq|random|zipf seed=N writes=PCT
//! passes=N`, `test=cpu iters=N`, `test=blk sectors=N pattern=seq|random seed=N
//! mode=rw|verify|hostile disk=I` or `test=net frames=N [mode=hostile]`. Unknown keys (e.g.
//! Linux's `console=...`) are ignored; a known key with a bad value is an error naming it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    Mem,
    Cpu,
    /// Touches an unmapped address: tests the exception report (exit status 3).
    Fault,
    /// Writes, flushes, reads back and verifies sectors of the first virtio-blk disk.
    Blk,
    /// Sends frames through the first virtio-net device and checks their echoes.
    Net,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Seq,
    Random,
    Zipf,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Random => "random",
            Pattern::Zipf => "zipf",
        }
    }
}

/// What `test=blk` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkMode {
    /// Write, flush, read back and verify.
    Rw,
    /// Only read back and verify what an earlier `rw` run wrote.
    Verify,
    /// Send the device hostile descriptor chains, reset it, then a short `rw` run.
    Hostile,
    /// Send a write and a read whose data descriptors alias one 32 MiB buffer 126 times
    /// (3.94 GiB each, the most a chain may hold), then a short `rw` run.
    Hostile4g,
}

impl BlkMode {
    pub fn name(self) -> &'static str {
        match self {
            BlkMode::Rw => "rw",
            BlkMode::Verify => "verify",
            BlkMode::Hostile => "hostile",
            BlkMode::Hostile4g => "hostile-4g",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub test: Test,
    /// `None`: all RAM above the guest's own image and metadata.
    pub bytes: Option<u64>,
    pub pattern: Pattern,
    pub seed: u64,
    /// Percent of pass accesses that rewrite the page (0..=100).
    pub writes: u32,
    /// Number of passes (0..=255: the last-written pass is kept in one byte per page).
    pub passes: u32,
    pub iters: u64,
    /// `test=blk`: sectors to test from sector 0 (`None`: the whole disk).
    pub sectors: Option<u64>,
    pub blk_mode: BlkMode,
    /// `test=blk`: which virtio-mmio slot (the `--disk` index) to test.
    pub disk: u64,
    /// `test=net`: frames to send (1..=MAX_FRAMES).
    pub frames: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            test: Test::Mem,
            bytes: None,
            pattern: Pattern::Seq,
            seed: 1,
            writes: 50,
            passes: 1,
            iters: 100_000_000,
            sectors: None,
            blk_mode: BlkMode::Rw,
            disk: 0,
            frames: 1000,
        }
    }
}

/// A known key with a value that does not parse or is out of range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadValue<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
}

pub const MAX_PASSES: u32 = 255;
/// vnode's virtio-mmio slots (docs/guest-abi.md).
pub const MAX_DISKS: u64 = 19;
/// `test=net`'s largest `frames=`.
pub const MAX_FRAMES: u64 = 100_000_000;

/// A number: decimal or `0x` hex.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// A size: a number with an optional K/M/G/T suffix (powers of 1024, either case, optional `B`
/// or `iB` after it: `900M`, `1GiB`, `4096`).
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let mut s = s;
    for suffix in [&b"iB"[..], b"ib", b"B", b"b"] {
        if s.len() > suffix.len() && s.ends_with(suffix) {
            let cut = &s[..s.len() - suffix.len()];
            // Only strip when a unit letter or a digit is left in front of it.
            if matches!(cut.last(), Some(c) if c.is_ascii_alphanumeric()) {
                s = cut;
                break;
            }
        }
    }
    let (num, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let v = parse_u64(num)?;
    v.checked_mul(1u64 << shift)
}

/// Parses the command line.
pub fn parse(cmdline: &[u8]) -> Result<Config, BadValue<'_>> {
    let mut cfg = Config::default();
    for tok in cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
    {
        let Some(eq) = tok.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (key, value) = (&tok[..eq], &tok[eq + 1..]);
        let bad = BadValue { key, value };
        match key {
            b"test" => {
                cfg.test = match value {
                    b"mem" => Test::Mem,
                    b"cpu" => Test::Cpu,
                    b"fault" => Test::Fault,
                    b"blk" => Test::Blk,
                    b"net" => Test::Net,
                    _ => return Err(bad),
                }
            }
            b"bytes" => cfg.bytes = Some(parse_size(value).filter(|&b| b >= 4096).ok_or(bad)?),
            b"pattern" => {
                cfg.pattern = match value {
                    b"seq" => Pattern::Seq,
                    b"random" => Pattern::Random,
                    b"zipf" => Pattern::Zipf,
                    _ => return Err(bad),
                }
            }
            b"seed" => cfg.seed = parse_u64(value).ok_or(bad)?,
            b"writes" => cfg.writes = parse_u64(value).filter(|&w| w <= 100).ok_or(bad)? as u32,
            b"passes" => {
                cfg.passes = parse_u64(value)
                    .filter(|&p| p <= MAX_PASSES as u64)
                    .ok_or(bad)? as u32
            }
            b"iters" => cfg.iters = parse_u64(value).ok_or(bad)?,
            b"sectors" => cfg.sectors = Some(parse_u64(value).filter(|&n| n > 0).ok_or(bad)?),
            b"frames" => {
                cfg.frames = parse_u64(value)
                    .filter(|&n| (1..=MAX_FRAMES).contains(&n))
                    .ok_or(bad)? as u32
            }
            b"disk" => cfg.disk = parse_u64(value).filter(|&d| d < MAX_DISKS).ok_or(bad)?,
            b"mode" => {
                cfg.blk_mode = match value {
                    b"rw" => BlkMode::Rw,
                    b"verify" => BlkMode::Verify,
                    b"hostile" => BlkMode::Hostile,
                    b"hostile-4g" => BlkMode::Hostile4g,
                    _ => return Err(bad),
                }
            }
            _ => {}
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let c = parse(b"console=ttyS0 quiet  root=/dev/vda").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(parse(b"").unwrap(), Config::default());
    }

    #[test]
    fn full_mem_line() {
        let c = parse(b"test=mem bytes=900M pattern=random seed=7 writes=30 passes=3").unwrap();
        assert_eq!(c.bytes, Some(900 << 20));
        assert_eq!(c.pattern, Pattern::Random);
        assert_eq!((c.seed, c.writes, c.passes), (7, 30, 3));
        let c = parse(b"test=cpu iters=0x10").unwrap();
        assert_eq!((c.test, c.iters), (Test::Cpu, 16));
        let c = parse(b"test=blk sectors=4096 pattern=random seed=3 mode=verify").unwrap();
        assert_eq!((c.test, c.sectors), (Test::Blk, Some(4096)));
        assert_eq!((c.blk_mode, c.disk), (BlkMode::Verify, 0));
        assert_eq!(parse(b"test=blk disk=2").unwrap().disk, 2);
        assert_eq!((c.pattern, c.seed), (Pattern::Random, 3));
        let c = parse(b"test=net frames=2000").unwrap();
        assert_eq!((c.test, c.frames), (Test::Net, 2000));
        assert_eq!(parse(b"test=net").unwrap().frames, 1000);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"64k"), Some(64 << 10));
        assert_eq!(parse_size(b"1G"), Some(1 << 30));
        assert_eq!(parse_size(b"1GiB"), Some(1 << 30));
        assert_eq!(parse_size(b"2MB"), Some(2 << 20));
        assert_eq!(parse_size(b"M"), None);
        assert_eq!(parse_size(b"12Q"), None);
        assert_eq!(parse_size(b"99999999999T"), None);
    }

    #[test]
    fn bad_values_name_the_key() {
        for line in [
            &b"bytes=lots"[..],
            b"bytes=100",
            b"pattern=zigzag",
            b"writes=101",
            b"passes=256",
            b"seed=",
            b"test=disk",
            b"sectors=0",
            b"mode=write",
            b"disk=19",
            b"frames=0",
            b"frames=100000001",
        ] {
            let e = parse(line).unwrap_err();
            let eq = line.iter().position(|&c| c == b'=').unwrap();
            assert_eq!(e.key, &line[..eq]);
            assert_eq!(e.value, &line[eq + 1..]);
        }
    }
}
