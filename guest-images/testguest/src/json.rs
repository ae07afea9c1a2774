//! One-line JSON objects formatted into a fixed buffer (the guest has no allocator).
//!
//! Output that does not fit is cut short and the line still ends with `}` and a newline, with a
//! `"truncated":true` member, so a reader never sees a half-written line.

pub struct JsonLine<const N: usize> {
    buf: [u8; N],
    len: usize,
    fields: usize,
    truncated: bool,
}

/// Room kept for `,"truncated":true}\n`.
const TAIL: usize = 20;

impl<const N: usize> Default for JsonLine<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> JsonLine<N> {
    pub fn new() -> Self {
        assert!(N > TAIL + 2);
        let mut j = JsonLine {
            buf: [0; N],
            len: 0,
            fields: 0,
            truncated: false,
        };
        j.raw(b"{");
        j
    }

    fn raw(&mut self, s: &[u8]) {
        if self.truncated || self.len + s.len() > N - TAIL {
            self.truncated = true;
            return;
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
    }

    fn key(&mut self, k: &str) {
        if self.fields > 0 {
            self.raw(b",");
        }
        self.fields += 1;
        self.raw(b"\"");
        self.escaped(k.as_bytes());
        self.raw(b"\":");
    }

    fn escaped(&mut self, s: &[u8]) {
        for &c in s {
            match c {
                b'"' => self.raw(b"\\\""),
                b'\\' => self.raw(b"\\\\"),
                b'\n' => self.raw(b"\\n"),
                b'\r' => self.raw(b"\\r"),
                b'\t' => self.raw(b"\\t"),
                0..=0x1f | 0x7f..=0xff => {
                    // Control characters, and bytes that are not ASCII (the input is not known to
                    // be UTF-8): \u00XX keeps the line valid JSON.
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.raw(&[
                        b'\\',
                        b'u',
                        b'0',
                        b'0',
                        HEX[(c >> 4) as usize],
                        HEX[(c & 15) as usize],
                    ]);
                }
                _ => self.raw(&[c]),
            }
        }
    }

    pub fn u64(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = v;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.raw(&digits[i..]);
        self
    }

    pub fn opt_u64(self, k: &str, v: Option<u64>) -> Self {
        match v {
            Some(v) => self.u64(k, v),
            None => self.null(k),
        }
    }

    pub fn null(mut self, k: &str) -> Self {
        self.key(k);
        self.raw(b"null");
        self
    }

    pub fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.raw(if v { b"true" } else { b"false" });
        self
    }

    pub fn str(self, k: &str, v: &str) -> Self {
        self.bytes_str(k, v.as_bytes())
    }

    /// A string member from raw bytes (escaped as needed).
    pub fn bytes_str(mut self, k: &str, v: &[u8]) -> Self {
        self.key(k);
        self.raw(b"\"");
        self.escaped(v);
        self.raw(b"\"");
        self
    }

    /// The finished line, `{...}\n`.
    pub fn finish(&mut self) -> &[u8] {
        let tail: &[u8] = if self.truncated {
            // Drop a partial member: cut back to the last complete one.
            while self.len > 1 && self.buf[self.len - 1] != b',' {
                self.len -= 1;
            }
            if self.buf[self.len - 1] == b',' {
                self.len -= 1;
            }
            if self.len > 1 {
                b",\"truncated\":true}\n"
            } else {
                b"\"truncated\":true}\n"
            }
        } else {
            b"}\n"
        };
        self.buf[self.len..self.len + tail.len()].copy_from_slice(tail);
        &self.buf[..self.len + tail.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s<const N: usize>(mut j: JsonLine<N>) -> String {
        String::from_utf8(j.finish().to_vec()).unwrap()
    }

    #[test]
    fn formats_members() {
        let j = JsonLine::<256>::new()
            .str("guest", "testguest")
            .u64("vcpus", 2)
            .u64("big", u64::MAX)
            .u64("zero", 0)
            .bool("ok", true)
            .opt_u64("first_error_gpa", None)
            .opt_u64("x", Some(7));
        assert_eq!(
            s(j),
            "{\"guest\":\"testguest\",\"vcpus\":2,\"big\":18446744073709551615,\"zero\":0,\"ok\":true,\"first_error_gpa\":null,\"x\":7}\n"
        );
        assert_eq!(s(JsonLine::<32>::new()), "{}\n");
    }

    #[test]
    fn escapes_strings() {
        let j = JsonLine::<128>::new().bytes_str("cmdline", b"a=\"b\" c\\d\te\x01\xff");
        assert_eq!(
            s(j),
            "{\"cmdline\":\"a=\\\"b\\\" c\\\\d\\te\\u0001\\u00ff\"}\n"
        );
    }

    #[test]
    fn truncation_keeps_valid_json() {
        let long = "x".repeat(200);
        let j = JsonLine::<64>::new().u64("a", 1).str("s", &long);
        let out = s(j);
        assert_eq!(out, "{\"a\":1,\"truncated\":true}\n");
        let j = JsonLine::<40>::new().str("s", &long);
        assert_eq!(s(j), "{\"truncated\":true}\n");
    }
}
