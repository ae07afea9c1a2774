//! Building the `vnode run` command line for a benchmark: the job's words go onto the guest's
//! kernel command line (`--cmdline`), `--stats` is added, and the arguments that would take the
//! console away from vnodectl are refused with a clear error.

use std::path::{Path, PathBuf};

/// The kernel command line used when the caller gives none: our images' defaults (console on
/// the serial port, quiet, root on the first disk is the initramfs's default).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error("no vnode arguments: give them after `--`, e.g. -- --kernel vmlinux --initrd initrd.img --disk rootfs.ext4")]
    NoArgs,
    #[error("the vnode arguments have no --kernel")]
    NoKernel,
    #[error("kernel {0} does not exist")]
    KernelMissing(String),
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("--serial takes the console away from vnodectl, which reads it on vnode's stdout: drop it (use vnodectl --console-log FILE)")]
    Serial,
    #[error("give the vnode arguments without the `run` subcommand (vnodectl adds it)")]
    RunGiven,
}

/// `--name value` or `--name=value` at `args[i]`: (value, how many words it took).
fn value_at<'a>(
    args: &'a [String],
    i: usize,
    name: &str,
) -> Option<Result<(&'a str, usize), LaunchError>> {
    let a = &args[i];
    if a == name {
        return Some(
            args.get(i + 1)
                .map(|v| (v.as_str(), 2))
                .ok_or_else(|| LaunchError::MissingValue(name.to_owned())),
        );
    }
    a.strip_prefix(name)?.strip_prefix('=').map(|v| Ok((v, 1)))
}

/// The `vnode run` arguments for a job: `user` with `words` appended to the kernel command line
/// (or a `--cmdline` with [`DEFAULT_CMDLINE`] and `words` when there was none) and `--stats`.
/// Checks that the kernel exists, so that a typo gives a clear error before anything starts.
pub fn vnode_args(user: &[String], words: &[String]) -> Result<Vec<String>, LaunchError> {
    if user.is_empty() {
        return Err(LaunchError::NoArgs);
    }
    if user[0] == "run" {
        return Err(LaunchError::RunGiven);
    }
    let mut out = vec!["run".to_owned()];
    let (mut cmdline, mut kernel, mut stats) = (None, None, false);
    let mut i = 0;
    while i < user.len() {
        if let Some(r) = value_at(user, i, "--cmdline") {
            let (v, n) = r?;
            cmdline = Some(v.to_owned());
            i += n;
            continue;
        }
        if let Some(r) = value_at(user, i, "--kernel") {
            kernel = Some(r?.0.to_owned());
        }
        if value_at(user, i, "--serial").is_some() {
            return Err(LaunchError::Serial);
        }
        stats |= user[i] == "--stats";
        out.push(user[i].clone());
        i += 1;
    }
    let kernel = kernel.ok_or(LaunchError::NoKernel)?;
    if !Path::new(&kernel).exists() {
        return Err(LaunchError::KernelMissing(kernel));
    }
    let mut line = cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
    for w in words {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    out.push("--cmdline".to_owned());
    out.push(line);
    if !stats {
        out.push("--stats".to_owned());
    }
    Ok(out)
}

/// The TAP device named by `--net tap=NAME[,...]` in the vnode arguments, if any.
pub fn tap_name(user: &[String]) -> Option<String> {
    (0..user.len())
        .filter_map(|i| value_at(user, i, "--net")?.ok())
        .find_map(|(v, _)| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("tap="))
                .map(str::to_owned)
        })
}

/// The vnode binary: `explicit`, else `vnode` next to this program, else `vnode` on PATH.
pub fn vnode_binary(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("vnode")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vnode"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn kernel() -> String {
        // any file that exists
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn the_job_goes_onto_the_given_cmdline() {
        let k = kernel();
        for form in [
            s(&[
                "--kernel",
                &k,
                "--cmdline",
                "console=ttyS0 quiet",
                "--mem",
                "1G",
            ]),
            s(&[
                "--kernel",
                &k,
                "--cmdline=console=ttyS0 quiet",
                "--mem",
                "1G",
            ]),
        ] {
            let a = vnode_args(
                &form,
                &s(&["vnode.job=fio-randread", "vnode.fio_runtime=5"]),
            )
            .unwrap();
            assert_eq!(
                a,
                s(&[
                    "run",
                    "--kernel",
                    &k,
                    "--mem",
                    "1G",
                    "--cmdline",
                    "console=ttyS0 quiet vnode.job=fio-randread vnode.fio_runtime=5",
                    "--stats"
                ])
            );
        }
    }

    #[test]
    fn without_a_cmdline_the_default_is_used_and_stats_is_not_doubled() {
        let k = kernel();
        let a = vnode_args(&s(&["--kernel", &k, "--stats"]), &s(&["vnode.job=boot"])).unwrap();
        assert_eq!(
            a,
            s(&[
                "run",
                "--kernel",
                &k,
                "--stats",
                "--cmdline",
                "console=ttyS0 quiet panic=-1 vnode.job=boot"
            ])
        );
    }

    #[test]
    fn bad_arguments_are_clear_errors() {
        let k = kernel();
        assert_eq!(vnode_args(&[], &[]), Err(LaunchError::NoArgs));
        assert_eq!(
            vnode_args(&s(&["run", "--kernel", &k]), &[]),
            Err(LaunchError::RunGiven)
        );
        assert_eq!(
            vnode_args(&s(&["--mem", "1G"]), &[]),
            Err(LaunchError::NoKernel)
        );
        assert_eq!(
            vnode_args(&s(&["--kernel", "/no/such/vmlinux"]), &[]),
            Err(LaunchError::KernelMissing("/no/such/vmlinux".into()))
        );
        assert_eq!(
            vnode_args(&s(&["--kernel", &k, "--cmdline"]), &[]),
            Err(LaunchError::MissingValue("--cmdline".into()))
        );
        assert_eq!(
            vnode_args(&s(&["--kernel", &k, "--serial", "/tmp/x"]), &[]),
            Err(LaunchError::Serial)
        );
        let e = vnode_args(&s(&["--kernel", "/no/such/vmlinux"]), &[]).unwrap_err();
        assert_eq!(e.to_string(), "kernel /no/such/vmlinux does not exist");
    }

    #[test]
    fn the_tap_is_found_in_net_arguments() {
        assert_eq!(
            tap_name(&s(&["--net", "tap=vn0,mac=52:54:00:00:00:01"])),
            Some("vn0".into())
        );
        assert_eq!(
            tap_name(&s(&["--net=mac=52:54:00:00:00:01,tap=vn1"])),
            Some("vn1".into())
        );
        assert_eq!(tap_name(&s(&["--disk", "tap=x"])), None);
    }
}
