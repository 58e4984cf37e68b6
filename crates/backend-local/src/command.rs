//! The job's command line on the host: container paths mapped to host directories, and the
//! `/bin/sh` wrapper that starts it.
//!
//! The wrapper exists because starting a process inside a cgroup, as another user, and
//! recording its exit code in a file a restarted manager can read, all without `unsafe`
//! `pre_exec` code, takes a parent that stays around. The wrapper:
//!
//! 1. waits for one line on its stdin: the manager sends it once it has moved the wrapper
//!    into the job's cgroups, so not one instruction of the job runs outside them (if the
//!    manager dies first the line never comes, `read` sees end of file, and the job never
//!    starts);
//! 2. points stdin at `/dev/null`, as a container's would be;
//! 3. in a private mount namespace (root only: `unshare` starts the wrapper), bind-mounts
//!    the incoming directory read-only over itself;
//! 4. without cgroups, sets `ulimit -v` (the only memory limit left);
//! 5. runs the job (not `exec`: it stays the job's parent), through `setpriv` when it must
//!    drop to another user in the namespace, records its exit code in the job's `exit`
//!    file, and exits with the same code.
//!
//! Everything else it uses is a shell builtin or named by absolute path, so a job's own
//! `PATH` cannot break it.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use dispatch_manager::backend::{INCOMING_MOUNT, OUTGOING_MOUNT};

/// The shell that runs the wrapper.
pub(crate) const SHELL: &str = "/bin/sh";

/// The wrapper's exit code when it never ran the job (no start signal, or the memory
/// limit could not be set); 125 is what `docker run` uses for its own failures.
pub(crate) const WRAPPER_FAILED: i32 = 125;

/// Replaces container paths by host paths: an argument equal to [`INCOMING_MOUNT`] or
/// [`OUTGOING_MOUNT`], or starting with one followed by `/`, gets the host directory in its
/// place. Other arguments (including `--dir=/share/incoming` forms) are left alone, as
/// pfcon's command never builds them. Without an incoming directory, [`INCOMING_MOUNT`]
/// is left as is: the job then finds no inputs, as it would in a container.
pub(crate) fn map_container_paths(
    command: &[String],
    incoming: Option<&Path>,
    outgoing: &Path,
) -> Vec<OsString> {
    command
        .iter()
        .map(|arg| {
            map_one(arg, INCOMING_MOUNT, incoming)
                .or_else(|| map_one(arg, OUTGOING_MOUNT, Some(outgoing)))
                .unwrap_or_else(|| OsString::from(arg))
        })
        .collect()
}

fn map_one(arg: &str, mount: &str, host: Option<&Path>) -> Option<OsString> {
    let host = host?;
    let rest = arg.strip_prefix(mount)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let mut mapped = host.as_os_str().to_owned();
    mapped.push(rest);
    Some(mapped)
}

/// Quotes `value` for `sh`: inside single quotes nothing is special but the single quote,
/// which is written `'\''`.
pub(crate) fn shell_quote(value: &OsStr) -> OsString {
    let mut quoted = Vec::with_capacity(value.len() + 2);
    quoted.push(b'\'');
    for &byte in value.as_bytes() {
        if byte == b'\'' {
            quoted.extend_from_slice(b"'\\''");
        } else {
            quoted.push(byte);
        }
    }
    quoted.push(b'\'');
    OsString::from_vec(quoted)
}

/// Host tools that give a job a private mount namespace, in which its incoming directory
/// is bound read-only (as a container's `/share/incoming` is). Only root can use them; the
/// wrapper then stays root (so its exit file is always within reach) and drops to the
/// job's user with `setpriv` just for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamespaceTools {
    unshare: PathBuf,
    mount: PathBuf,
    setpriv: PathBuf,
}

impl NamespaceTools {
    /// Finds util-linux's `unshare`, `mount` and `setpriv` in the usual directories (not
    /// through `PATH`: the wrapper runs with the job's).
    pub fn find() -> Result<Self, String> {
        let find = |name: &str| {
            ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|path| path.is_file())
                .ok_or_else(|| format!("`{name}` (util-linux) not found"))
        };
        Ok(Self {
            unshare: find("unshare")?,
            mount: find("mount")?,
            setpriv: find("setpriv")?,
        })
    }

    /// Checks that a private mount namespace can be made here, with a read-only bind
    /// mount in it (blocking: a start-up step).
    pub fn probe(&self) -> Result<(), String> {
        let dir = std::env::temp_dir();
        let script = format!(
            "{mount} --bind {dir} {dir} && {mount} -o remount,bind,ro {dir}",
            mount = shell_quote(self.mount.as_os_str()).to_string_lossy(),
            dir = shell_quote(dir.as_os_str()).to_string_lossy(),
        );
        let output = std::process::Command::new(&self.unshare)
            .args(["--mount", "--propagation", "private", "--", SHELL, "-c"])
            .arg(script)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.unshare.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "a private mount namespace cannot be made ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

/// How to start one job: the wrapper's program, script and options.
#[derive(Debug)]
pub(crate) struct Wrapper<'a> {
    /// Where the wrapper records the job's exit code.
    pub exit_file: &'a Path,
    /// Set `ulimit -v` to this (when there are no cgroups).
    pub memory_limit_kib: Option<u64>,
    /// Run in a private mount namespace.
    pub namespace: Option<Namespace<'a>>,
}

/// What the wrapper does in a private mount namespace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Namespace<'a> {
    /// The tools.
    pub tools: &'a NamespaceTools,
    /// The directory to bind read-only over itself.
    pub incoming: Option<&'a Path>,
    /// The `uid:gid` to drop to for the job.
    pub user: Option<(u32, u32)>,
}

impl Wrapper<'_> {
    /// The program to start, and its arguments up to the job's command, which follows.
    pub fn command_line(&self) -> (PathBuf, Vec<OsString>) {
        let mut args = Vec::new();
        let program = match self.namespace {
            Some(Namespace { tools, .. }) => {
                args.extend(
                    ["--mount", "--propagation", "private", "--", SHELL].map(OsString::from),
                );
                tools.unshare.clone()
            }
            None => PathBuf::from(SHELL),
        };
        args.extend([OsString::from("-c"), self.script(), OsString::from("sh")]);
        (program, args)
    }

    /// The wrapper's script (see the module doc); the job's command follows as `"$@"`.
    fn script(&self) -> OsString {
        let mut script = OsString::new();
        script.push(format!("read -r go || exit {WRAPPER_FAILED}\n"));
        script.push("exec </dev/null\n");
        let mut job = OsString::from("\"$@\"");
        if let Some(Namespace {
            tools,
            incoming,
            user,
        }) = self.namespace
        {
            if let Some(incoming) = incoming {
                let (mount, dir) = (
                    shell_quote(tools.mount.as_os_str()),
                    shell_quote(incoming.as_os_str()),
                );
                for options in ["--bind", "-o remount,bind,ro"] {
                    script.push(&mount);
                    script.push(format!(" {options} "));
                    script.push(&dir);
                    script.push(" ");
                    script.push(&dir);
                    script.push(format!(" || exit {WRAPPER_FAILED}\n"));
                }
            }
            if let Some((uid, gid)) = user {
                job = shell_quote(tools.setpriv.as_os_str());
                job.push(format!(
                    " --reuid={uid} --regid={gid} --clear-groups -- \"$@\""
                ));
            }
        }
        if let Some(kib) = self.memory_limit_kib {
            script.push(format!("ulimit -v {kib} || exit {WRAPPER_FAILED}\n"));
        }
        script.push(job);
        script.push("\ncode=$?\n");
        // The file may be out of the job user's reach (a state dir it cannot traverse):
        // the manager then still has the code from waiting on its child, and only a
        // manager restarted while the job ran loses it.
        script.push("{ echo \"$code\" > ");
        script.push(shell_quote(self.exit_file.as_os_str()));
        script.push("; } 2>/dev/null\nexit \"$code\"\n");
        script
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn container_paths_are_mapped_only_as_whole_components() {
        let incoming = PathBuf::from("/store/key-1/incoming");
        let outgoing = PathBuf::from("/store/key-1/outgoing");
        let mapped = map_container_paths(
            &strings(&[
                "simpledsapp",
                "/share/incoming",
                "/share/outgoing/",
                "/share/incoming/a/b.txt",
                "/share/incomingx",
                "--dir=/share/outgoing",
                "/share/outgoing/x",
            ]),
            Some(&incoming),
            &outgoing,
        );
        let expected = [
            "simpledsapp",
            "/store/key-1/incoming",
            "/store/key-1/outgoing/",
            "/store/key-1/incoming/a/b.txt",
            "/share/incomingx",
            "--dir=/share/outgoing",
            "/store/key-1/outgoing/x",
        ];
        assert_eq!(
            mapped,
            expected.iter().map(OsString::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn incoming_is_left_alone_without_inputs() {
        let mapped =
            map_container_paths(&strings(&["ls", "/share/incoming"]), None, Path::new("/o"));
        assert_eq!(mapped, vec![OsString::from("ls"), "/share/incoming".into()]);
    }

    #[test]
    fn quoting_survives_the_shell() {
        for value in ["plain", "it's", "'", "$HOME `x` \"y\" \\", "a\nb", ""] {
            let script = {
                let mut s = OsString::from("printf %s ");
                s.push(shell_quote(OsStr::new(value)));
                s
            };
            let out = Command::new(SHELL).arg("-c").arg(script).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), value);
        }
    }

    fn run_wrapper(
        exit_file: &Path,
        start_line: &[u8],
        limit: Option<u64>,
        job: &[&str],
    ) -> (i32, String) {
        use std::io::Write;
        let wrapper = Wrapper {
            exit_file,
            memory_limit_kib: limit,
            namespace: None,
        };
        let (program, args) = wrapper.command_line();
        let mut child = Command::new(program)
            .args(args)
            .args(job)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(start_line).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
        )
    }

    #[test]
    fn wrapper_runs_the_job_and_records_its_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let exit_file = dir.path().join("it's the exit");
        let (code, out) = run_wrapper(
            &exit_file,
            b"go\n",
            None,
            &[
                "sh",
                "-c",
                "echo \"$1\"; read x && echo stdin; exit 3",
                "sh",
                "a b",
            ],
        );
        assert_eq!(code, 3);
        // stdin is /dev/null for the job: `read` fails.
        assert_eq!(out, "a b\n");
        assert_eq!(std::fs::read_to_string(&exit_file).unwrap(), "3\n");
    }

    #[test]
    fn wrapper_never_starts_the_job_without_the_start_line() {
        let dir = tempfile::tempdir().unwrap();
        let exit_file = dir.path().join("exit");
        let (code, out) = run_wrapper(&exit_file, b"", None, &["echo", "ran"]);
        assert_eq!(code, WRAPPER_FAILED);
        assert_eq!(out, "");
        assert!(!exit_file.exists());
    }

    #[test]
    fn wrapper_survives_an_unwritable_exit_file() {
        let (code, out) = run_wrapper(
            Path::new("/nonexistent/dir/exit"),
            b"go\n",
            Some(1 << 20),
            &["echo", "ran"],
        );
        assert_eq!((code, out.as_str()), (0, "ran\n"));
    }
}
