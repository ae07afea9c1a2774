//! The handshake (option haggling) half of the server: see the state machine at the top of
//! `protocol.rs`.

use std::io::{self, Read, Write};

use std::sync::atomic::Ordering;

use vnode_common::cred;

use super::{Export, Server, ServerError, Session};
use crate::backend::DIRECT_BLOCK;
use crate::nbd::auth::{self, AuthStep};
use crate::nbd::protocol::*;

/// Handshake-phase state of one connection.
#[derive(Default)]
struct OptState {
    structured: bool,
    no_zeroes: bool,
    /// The export this connection proved the credential of.
    authed: Option<Vec<u8>>,
    /// Step 1 done: (client nonce, server nonce, export name).
    challenge: Option<([u8; AUTH_NONCE_LEN], [u8; AUTH_NONCE_LEN], Vec<u8>)>,
    failures: u32,
}

fn export_flags(e: &Export) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN;
    if e.read_only {
        f |= TF_READ_ONLY;
    }
    f
}

impl Server {
    pub(super) fn handshake<'a>(
        &'a self,
        rd: &mut impl Read,
        wr: &mut impl Write,
    ) -> Result<Option<Session<'a>>, ServerError> {
        let mut greet = Vec::with_capacity(18);
        greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
        greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&greet)?;
        let mut cf = [0u8; 4];
        rd.read_exact(&mut cf)?;
        let cflags = u32::from_be_bytes(cf);
        if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
            || cflags & CLIENT_FIXED_NEWSTYLE == 0
        {
            return Err(ServerError::ClientFlags(cflags));
        }
        let mut st = OptState {
            no_zeroes: cflags & CLIENT_NO_ZEROES != 0,
            ..Default::default()
        };
        loop {
            let mut hdr = [0u8; OPTION_HEADER_LEN];
            rd.read_exact(&mut hdr)?;
            let h = OptionHeader::decode(&hdr)?;
            if h.len > MAX_OPTION_LEN {
                if h.option == OPT_EXPORT_NAME || h.len > 16 * MAX_OPTION_LEN {
                    return Err(ServerError::OptionTooLarge(h.len));
                }
                io::copy(&mut rd.take(u64::from(h.len)), &mut io::sink())?;
                reply(wr, h.option, REP_ERR_TOO_BIG, b"option too large")?;
                continue;
            }
            let mut data = vec![0u8; h.len as usize];
            rd.read_exact(&mut data)?;
            match self.option(wr, &mut st, h.option, &data)? {
                OptOutcome::Continue => {}
                OptOutcome::Close => return Ok(None),
                OptOutcome::Transmit(export) => {
                    return Ok(Some(Session {
                        export,
                        structured: st.structured,
                    }))
                }
            }
        }
    }

    fn option<'a>(
        &'a self,
        wr: &mut impl Write,
        st: &mut OptState,
        opt: u32,
        data: &[u8],
    ) -> Result<OptOutcome<'a>, ServerError> {
        match opt {
            OPT_EXPORT_NAME => {
                let Some(e) = self.find(data).filter(|e| self.allowed(e, st)) else {
                    tracing::info!("EXPORT_NAME for unknown or protected export: closing");
                    return Ok(OptOutcome::Close);
                };
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&e.backend.size().to_be_bytes());
                b.extend_from_slice(&export_flags(e).to_be_bytes());
                if !st.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&b)?;
                Ok(OptOutcome::Transmit(e))
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK changes nothing.
                let _ = reply(wr, opt, REP_ACK, &[]);
                Ok(OptOutcome::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(wr, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    return Ok(OptOutcome::Continue);
                }
                // Protected exports are not listed to a client that has not proven their credential.
                for e in self.exports.iter().filter(|e| self.allowed(e, st)) {
                    reply(wr, opt, REP_SERVER, &encode_rep_server(e.name.as_bytes()))?;
                }
                reply(wr, opt, REP_ACK, &[])?;
                Ok(OptOutcome::Continue)
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    st.structured = true;
                    reply(wr, opt, REP_ACK, &[])?;
                } else {
                    reply(wr, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                }
                Ok(OptOutcome::Continue)
            }
            OPT_VNODE_AUTH => self.auth_option(wr, st, data),
            OPT_INFO | OPT_GO => self.info_or_go(wr, st, opt, data),
            _ => {
                reply(wr, opt, REP_ERR_UNSUP, b"option not supported")?;
                Ok(OptOutcome::Continue)
            }
        }
    }

    /// Whether the client may use `e`: an insecure server, a public export, or the export
    /// whose credential this connection proved.
    fn allowed(&self, e: &Export, st: &OptState) -> bool {
        self.cluster_key.is_none() || e.public || st.authed.as_deref() == Some(e.name.as_bytes())
    }

    /// `OPT_VNODE_AUTH`: step 1 gets the server's nonce and proof, step 2 checks the client's.
    fn auth_option<'a>(
        &'a self,
        wr: &mut impl Write,
        st: &mut OptState,
        data: &[u8],
    ) -> Result<OptOutcome<'a>, ServerError> {
        let opt = OPT_VNODE_AUTH;
        let Some(key) = &self.cluster_key else {
            reply(
                wr,
                opt,
                REP_ERR_UNSUP,
                b"this server has no cluster key (--insecure)",
            )?;
            return Ok(OptOutcome::Continue);
        };
        let step = match AuthStep::decode(data) {
            Ok(s) => s,
            Err(e) => return self.auth_failed(wr, st, &e.to_string()),
        };
        match step {
            AuthStep::Start {
                client_nonce,
                export,
            } => {
                let sn = cred::nonce().map_err(|e| ServerError::Io(io::Error::other(e)))?;
                // Unknown names are answered like known ones: the option reveals nothing.
                let c = cred::blk_credential(key, &String::from_utf8_lossy(&export));
                let proof = auth::server_proof(&c, &client_nonce, &sn, &export);
                reply(
                    wr,
                    opt,
                    REP_VNODE_CHALLENGE,
                    &auth::encode_challenge(&sn, &proof),
                )?;
                st.challenge = Some((client_nonce, sn, export));
                Ok(OptOutcome::Continue)
            }
            AuthStep::Prove { proof } => {
                let Some((cn, sn, export)) = st.challenge.take() else {
                    return self.auth_failed(wr, st, "proof without a challenge");
                };
                let c = cred::blk_credential(key, &String::from_utf8_lossy(&export));
                if !auth::check_client_proof(&c, &sn, &cn, &export, &proof) {
                    return self.auth_failed(wr, st, "wrong credential");
                }
                tracing::debug!(export = %String::from_utf8_lossy(&export), "client authenticated");
                st.authed = Some(export);
                reply(wr, opt, REP_ACK, &[])?;
                Ok(OptOutcome::Continue)
            }
        }
    }

    /// Refuses a proof; the last allowed failure closes the connection.
    fn auth_failed<'a>(
        &'a self,
        wr: &mut impl Write,
        st: &mut OptState,
        why: &str,
    ) -> Result<OptOutcome<'a>, ServerError> {
        st.failures += 1;
        let n = self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(100) {
            tracing::warn!(why, failures = n + 1, "vNode authentication failed");
        }
        if st.failures >= MAX_AUTH_FAILURES {
            let msg = format!("{why}; {MAX_AUTH_FAILURES} failed attempts: closing");
            let _ = reply(wr, OPT_VNODE_AUTH, REP_ERR_POLICY, msg.as_bytes());
            return Ok(OptOutcome::Close);
        }
        reply(wr, OPT_VNODE_AUTH, REP_ERR_POLICY, why.as_bytes())?;
        Ok(OptOutcome::Continue)
    }

    fn info_or_go<'a>(
        &'a self,
        wr: &mut impl Write,
        st: &OptState,
        opt: u32,
        data: &[u8],
    ) -> Result<OptOutcome<'a>, ServerError> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                reply(wr, opt, REP_ERR_INVALID, e.to_string().as_bytes())?;
                return Ok(OptOutcome::Continue);
            }
        };
        let Some(e) = self.find(&req.name) else {
            reply(wr, opt, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(OptOutcome::Continue);
        };
        if !self.allowed(e, st) {
            tracing::info!(export = %e.name, "client without the export's credential refused");
            reply(
                wr,
                opt,
                REP_ERR_POLICY,
                b"export requires vNode authentication",
            )?;
            return Ok(OptOutcome::Continue);
        }
        let size = e.backend.size();
        reply(
            wr,
            opt,
            REP_INFO,
            &encode_info_export(size, export_flags(e)),
        )?;
        for r in &req.requests {
            match *r {
                INFO_BLOCK_SIZE => {
                    let min = if e.backend.direct() {
                        DIRECT_BLOCK as u32
                    } else {
                        1
                    };
                    let b = encode_info_block_size(min, 4096, MAX_PAYLOAD);
                    reply(wr, opt, REP_INFO, &b)?;
                }
                INFO_NAME => {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(e.name.as_bytes());
                    reply(wr, opt, REP_INFO, &b)?;
                }
                _ => {}
            }
        }
        reply(wr, opt, REP_ACK, &[])?;
        if opt == OPT_GO {
            Ok(OptOutcome::Transmit(e))
        } else {
            Ok(OptOutcome::Continue)
        }
    }
}

enum OptOutcome<'a> {
    Continue,
    Close,
    Transmit(&'a Export),
}

fn reply(wr: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    wr.write_all(&OptionReply::encode_with(opt, kind, data))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::export;
    use super::super::ServerOptions;
    use super::*;
    use std::io::Cursor;

    /// Client bytes: flags, then the given options.
    fn client(opts: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        for (o, d) in opts {
            let h = OptionHeader {
                option: *o,
                len: d.len() as u32,
            };
            b.extend_from_slice(&h.encode());
            b.extend_from_slice(d);
        }
        b
    }

    /// Option reply kinds in the server's output, after the 18-byte greeting.
    fn reply_kinds(out: &[u8]) -> Vec<u32> {
        let mut kinds = Vec::new();
        let mut at = 18;
        while let Ok(r) = OptionReply::decode(&out[at..]) {
            kinds.push(r.kind);
            at += OPTION_REPLY_HEADER_LEN + r.len as usize;
        }
        kinds
    }

    fn go(name: &str) -> (u32, Vec<u8>) {
        let r = InfoRequest {
            name: name.as_bytes().to_vec(),
            requests: vec![],
        };
        (OPT_GO, r.encode())
    }

    fn keyed() -> ServerOptions {
        ServerOptions {
            cluster_key: Some(vnode_common::secret::Secret::from_bytes(b"k".to_vec()).unwrap()),
            ..ServerOptions::default()
        }
    }

    #[test]
    fn protected_export_is_hidden_and_refused_without_the_proof() {
        let s = Server::new(
            vec![export("locked", false, false), export("open", true, false)],
            keyed(),
        );
        let mut out = Vec::new();
        let input = client(&[(OPT_LIST, vec![]), go("locked"), (OPT_ABORT, vec![])]);
        let r = s.negotiate(&mut Cursor::new(input), &mut out).expect("ok");
        assert_eq!(r, None);
        assert_eq!(
            reply_kinds(&out),
            [REP_SERVER, REP_ACK, REP_ERR_POLICY, REP_ACK],
            "only the public export is listed"
        );
        assert!(
            !out.windows(6).any(|w| w == b"locked"),
            "not named anywhere"
        );
        let mut out = Vec::new();
        let r = s
            .negotiate(&mut Cursor::new(client(&[go("open")])), &mut out)
            .expect("ok");
        assert_eq!(r, Some("open"));
    }

    #[test]
    fn three_failed_proofs_close_the_connection() {
        let s = Server::new(vec![export("locked", false, false)], keyed());
        let bad = AuthStep::Prove { proof: [0; 32] }.encode();
        let start = AuthStep::Start {
            client_nonce: [1; 32],
            export: b"locked".to_vec(),
        }
        .encode();
        let opts: Vec<_> = [start.clone(), bad.clone(), start, bad.clone(), bad, vec![9]]
            .into_iter()
            .map(|d| (OPT_VNODE_AUTH, d))
            .chain([go("locked")])
            .collect();
        let mut out = Vec::new();
        let r = s
            .negotiate(&mut Cursor::new(client(&opts)), &mut out)
            .expect("closed, not failed");
        assert_eq!(r, None);
        assert_eq!(
            reply_kinds(&out),
            [
                REP_VNODE_CHALLENGE,
                REP_ERR_POLICY,
                REP_VNODE_CHALLENGE,
                REP_ERR_POLICY,
                REP_ERR_POLICY
            ],
            "the third failure closes; nothing after it is read"
        );
        assert_eq!(s.stats().auth_failures.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn export_name_without_no_zeroes_pads_the_reply() {
        let s = Server::new(vec![export("e", true, false)], ServerOptions::default());
        let mut input = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        let h = OptionHeader {
            option: OPT_EXPORT_NAME,
            len: 1,
        };
        input.extend_from_slice(&h.encode());
        input.push(b'e');
        let mut out = Vec::new();
        let r = s.negotiate(&mut Cursor::new(input), &mut out).expect("ok");
        assert_eq!(r, Some("e"));
        assert_eq!(out.len(), 18 + 8 + 2 + 124);
        assert_eq!(out[18..26], (1u64 << 20).to_be_bytes());
    }

    #[test]
    fn list_and_unknown_options() {
        let s = Server::new(
            vec![export("a", true, false), export("b", true, false)],
            ServerOptions::default(),
        );
        let mut out = Vec::new();
        let input = client(&[
            (OPT_LIST, vec![]),
            (OPT_STARTTLS, vec![]),
            (OPT_SET_META_CONTEXT, vec![0; 8]),
            go("nope"),
            go(""),
        ]);
        let r = s.negotiate(&mut Cursor::new(input), &mut out).expect("ok");
        assert_eq!(r, Some("a"), "the empty name is the first export");
        assert_eq!(
            reply_kinds(&out),
            [
                REP_SERVER,
                REP_SERVER,
                REP_ACK,
                REP_ERR_UNSUP,
                REP_ERR_UNSUP,
                REP_ERR_UNKNOWN,
                REP_INFO,
                REP_ACK
            ]
        );
    }
}
