//! `vnodectl`: runs benchmarks inside a vNode guest and reports them as one JSON document, and
//! controls one running vnode through its API (`vnodectl vm`, [`vmcmd`]).
//!
//! `vnodectl bench JOB -- <vnode run arguments>` starts `vnode run` with the job on the guest's
//! kernel command line (`vnode.job=...`), reads the guest console on vnode's stdout
//! ([`console`]: our Linux images print their results as JSON lines between markers), drives a
//! serving job from the host when it says it is ready (a memcached load client, [`memload`],
//! then "stop" on vnode's stdin, which vnode forwards to the guest's serial port), and combines
//! the guest's results with vnode's `--stats` ([`bench`]). A client of the `vnode` binary, not
//! part of the VMM library: the bin includes these modules itself.

pub mod bench;
pub mod console;
pub mod launch;
pub mod memload;
pub mod tap;
pub mod vmcmd;
