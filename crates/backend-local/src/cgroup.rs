//! Per-job cgroups: a memory limit (and a CPU quota where the CPU controller can be
//! written), an OOM count, and a sure way to find every process a job left behind.
//!
//! Layout: `<root>/chris-dispatch/<manager-id>/<job-id>` in each hierarchy used, where
//! `<root>` is the memory controller's mount (cgroup v1, where the CPU controller has its
//! own mount and the same layout) or the cgroup2 mount, unless the configuration names
//! another root (a delegated subtree).
//!
//! Every function here does blocking file I/O on cgroupfs: async callers use
//! `spawn_blocking`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::UseCgroups;

/// The directory under a cgroup root that holds everything this suite creates.
pub(crate) const SUITE_DIR: &str = "chris-dispatch";

/// CFS period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The smallest CFS quota the kernel accepts, in microseconds.
const CPU_MIN_QUOTA_US: u64 = 1_000;

/// Which cgroups the backend puts jobs in; the paths are this manager's own directories,
/// parents of the jobs' cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cgroups {
    /// No usable memory controller: memory is limited by `ulimit -v`, CPU not at all.
    None,
    /// cgroup v1: the memory hierarchy, and the CPU hierarchy when it can be written.
    V1 {
        /// `<memory root>/chris-dispatch/<manager-id>`.
        memory: PathBuf,
        /// `<cpu root>/chris-dispatch/<manager-id>`.
        cpu: Option<PathBuf>,
    },
    /// cgroup v2: one hierarchy.
    V2 {
        /// `<root>/chris-dispatch/<manager-id>`.
        base: PathBuf,
        /// Whether the `cpu` controller is enabled for jobs.
        cpu: bool,
    },
}

impl Cgroups {
    /// `v1`, `v2` or `none`, for the backend's version string.
    pub fn version_name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::V1 { .. } => "v1",
            Self::V2 { .. } => "v2",
        }
    }

    /// Finds and prepares the cgroups to use. `Auto` falls back to [`Cgroups::None`] (with
    /// a warning) where `Always` fails.
    pub fn detect(
        mode: UseCgroups,
        root_override: Option<&Path>,
        manager_id: &str,
    ) -> Result<Self, String> {
        if mode == UseCgroups::Never {
            return Ok(Self::None);
        }
        let found = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))
            .and_then(|mountinfo| {
                let mounts = parse_mountinfo(&mountinfo);
                Self::prepare(&mounts, root_override, manager_id)
            });
        match (found, mode) {
            (Ok(cgroups), _) => Ok(cgroups),
            (Err(reason), UseCgroups::Always) => Err(reason),
            (Err(reason), _) => {
                tracing::warn!(
                    %reason,
                    "cgroups are not usable: jobs get `ulimit -v` as memory limit and no cpu limit"
                );
                Ok(Self::None)
            }
        }
    }

    fn prepare(
        mounts: &[Mount],
        root_override: Option<&Path>,
        manager_id: &str,
    ) -> Result<Self, String> {
        let v1_memory = mounts.iter().find(|m| m.is_v1("memory"));
        let v1_cpu = mounts.iter().find(|m| m.is_v1("cpu"));
        let v2 = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2" && v2_controllers(&m.point).contains("memory"));
        let mine = |root: &Path| root.join(SUITE_DIR).join(manager_id);
        match root_override {
            Some(root) if root.join("cgroup.controllers").exists() => prepare_v2(root, manager_id),
            Some(root) if root.join("memory.limit_in_bytes").exists() => {
                // The CPU hierarchy at the same place relative to its mount, if any.
                let cpu = v1_memory
                    .and_then(|m| root.strip_prefix(&m.point).ok())
                    .zip(v1_cpu)
                    .map(|(relative, cpu)| cpu.point.join(relative));
                prepare_v1(&mine(root), cpu.as_deref().map(mine).as_deref())
            }
            Some(root) => Err(format!(
                "cgroup_root {} is neither a cgroup v2 directory nor a cgroup v1 memory directory",
                root.display()
            )),
            None => match (v1_memory, v2) {
                (Some(memory), _) => prepare_v1(
                    &mine(&memory.point),
                    v1_cpu.map(|cpu| mine(&cpu.point)).as_deref(),
                ),
                (None, Some(v2)) => prepare_v2(&v2.point, manager_id),
                (None, None) => Err("no cgroup memory controller is mounted".into()),
            },
        }
    }
}

fn prepare_v1(memory: &Path, cpu: Option<&Path>) -> Result<Cgroups, String> {
    std::fs::create_dir_all(memory)
        .map_err(|e| format!("cannot create memory cgroup {}: {e}", memory.display()))?;
    if !memory.join("memory.limit_in_bytes").exists() {
        return Err(format!(
            "{} is not in a cgroup v1 memory hierarchy",
            memory.display()
        ));
    }
    let cpu = cpu.and_then(|cpu| match std::fs::create_dir_all(cpu) {
        Ok(()) if cpu.join("cpu.cfs_quota_us").exists() => Some(cpu.to_owned()),
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(path = %cpu.display(), error = %e, "cpu cgroup not writable: cpu limits are not enforced");
            None
        }
    });
    Ok(Cgroups::V1 {
        memory: memory.to_owned(),
        cpu,
    })
}

fn prepare_v2(root: &Path, manager_id: &str) -> Result<Cgroups, String> {
    let available = v2_controllers(root);
    if !available.contains("memory") {
        return Err(format!(
            "the memory controller is not available in {}",
            root.display()
        ));
    }
    let cpu_available = available.contains("cpu");
    let mut cpu = cpu_available;
    // Controllers reach a cgroup only when every ancestor enables them for its children.
    let suite = root.join(SUITE_DIR);
    let base = suite.join(manager_id);
    for dir in [root, suite.as_path(), base.as_path()] {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
        let control = dir.join("cgroup.subtree_control");
        std::fs::write(&control, "+memory")
            .map_err(|e| format!("cannot enable memory in {}: {e}", control.display()))?;
        if cpu && std::fs::write(&control, "+cpu").is_err() {
            cpu = false;
        }
    }
    if cpu_available && !cpu {
        tracing::warn!(path = %base.display(), "cpu controller cannot be enabled: cpu limits are not enforced");
    }
    Ok(Cgroups::V2 { base, cpu })
}

fn v2_controllers(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default()
}

/// One line of `/proc/self/mountinfo`, the parts that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    fstype: String,
    super_options: Vec<String>,
}

impl Mount {
    fn is_v1(&self, controller: &str) -> bool {
        self.fstype == "cgroup" && self.super_options.iter().any(|o| o == controller)
    }
}

/// Parses mountinfo (proc(5)): field 5 is the mount point; after the ` - ` separator come
/// the file system type, the source and the super options.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split(' ').nth(4)?;
            let mut after = after.split(' ');
            let fstype = after.next()?.to_owned();
            let super_options = after.nth(1)?.split(',').map(str::to_owned).collect();
            Some(Mount {
                point: PathBuf::from(unescape_octal(point)),
                fstype,
                super_options,
            })
        })
        .collect()
}

/// Mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a job's cgroups are to enforce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Hard memory limit (no swap beyond it).
    pub memory_bytes: u64,
    /// CPU, in thousandths of a core.
    pub cpu_millis: u32,
}

/// Creates the job's cgroups with its limits, memory first. A cgroup of the same name
/// left by an earlier attempt is removed first (it can only be empty: a job's processes
/// are killed before its record is closed). On failure nothing is left behind.
pub(crate) fn create_job_cgroups(
    cgroups: &Cgroups,
    job: &str,
    limits: Limits,
) -> io::Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    let result = create_into(cgroups, job, limits, &mut created);
    match result {
        Ok(()) => Ok(created),
        Err(e) => {
            remove(&created);
            Err(e)
        }
    }
}

fn create_into(
    cgroups: &Cgroups,
    job: &str,
    limits: Limits,
    created: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let quota_us = (u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000).max(CPU_MIN_QUOTA_US);
    match cgroups {
        Cgroups::None => {}
        Cgroups::V1 { memory, cpu } => {
            let dir = fresh_dir(&memory.join(job))?;
            created.push(dir.clone());
            write(&dir, "memory.limit_in_bytes", limits.memory_bytes)?;
            // memsw (memory + swap) exists when swap accounting is on. Equal to the memory
            // limit, it keeps a job from swapping past its limit: going over kills it.
            // (Docker, given only --memory, allows as much swap again.)
            if dir.join("memory.memsw.limit_in_bytes").exists() {
                write(&dir, "memory.memsw.limit_in_bytes", limits.memory_bytes)?;
            }
            if let Some(cpu) = cpu {
                let cpu_dir = fresh_dir(&cpu.join(job))?;
                created.push(cpu_dir.clone());
                write(&cpu_dir, "cpu.cfs_period_us", CPU_PERIOD_US)?;
                write(&cpu_dir, "cpu.cfs_quota_us", quota_us)?;
            }
        }
        Cgroups::V2 { base, cpu } => {
            let dir = fresh_dir(&base.join(job))?;
            created.push(dir.clone());
            write(&dir, "memory.max", limits.memory_bytes)?;
            if dir.join("memory.swap.max").exists() {
                write(&dir, "memory.swap.max", 0)?;
            }
            if *cpu {
                write(&dir, "cpu.max", format!("{quota_us} {CPU_PERIOD_US}"))?;
            }
        }
    }
    Ok(())
}

fn fresh_dir(dir: &Path) -> io::Result<PathBuf> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_dir(dir)?;
            std::fs::create_dir(dir)?;
        }
        other => other?,
    }
    Ok(dir.to_owned())
}

fn write(dir: &Path, file: &str, value: impl ToString) -> io::Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, value.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
}

/// Moves process `pid` into each cgroup.
pub(crate) fn join(cgroups: &[PathBuf], pid: u32) -> io::Result<()> {
    cgroups
        .iter()
        .try_for_each(|dir| write(dir, "cgroup.procs", pid))
}

/// The processes in a cgroup; none when it is gone.
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGKILLs every process in the cgroups, including those that left the job's process
/// group (`setsid`), until they are empty or a second has passed. A pid read from a
/// cgroup of ours is one of the job's processes, so this never hits a stranger.
pub(crate) fn kill_all(cgroups: &[PathBuf]) {
    for _ in 0..50 {
        let mut any = false;
        for dir in cgroups {
            if dir.join("cgroup.kill").exists() {
                any |= !procs(dir).is_empty();
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                continue;
            }
            for pid in procs(dir) {
                any = true;
                if let Some(pid) = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
        if !any {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when the kernel's OOM killer killed a process in the job's memory cgroup (the
/// first of `cgroups`): `oom_kill N` in `memory.oom_control` (v1) or `memory.events` (v2).
pub(crate) fn oom_killed(cgroups: &[PathBuf]) -> bool {
    let Some(memory) = cgroups.first() else {
        return false;
    };
    ["memory.oom_control", "memory.events"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(memory.join(file)).ok())
        .any(|text| oom_kill_count(&text) > 0)
}

/// The `oom_kill` counter in `memory.oom_control` or `memory.events`.
pub(crate) fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.strip_prefix("oom_kill "))
        .filter_map(|n| n.trim().parse().ok())
        .next()
        .unwrap_or(0)
}

/// Removes the job's cgroups (a cgroup goes with `rmdir` once its last process has gone,
/// which takes the kernel a moment after a kill). Returns the ones that would not go.
pub(crate) fn remove(cgroups: &[PathBuf]) -> Vec<(PathBuf, io::Error)> {
    let mut failed = Vec::new();
    for dir in cgroups {
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            match std::fs::remove_dir(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => break Ok(()),
                Err(_) if attempts < 50 => std::thread::sleep(Duration::from_millis(20)),
                other => break other,
            }
        };
        if let Err(e) = outcome {
            failed.push((dir.clone(), e));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/mem\\040ory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn mountinfo_gives_points_types_and_controllers() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[3].point, PathBuf::from("/sys/fs/cgroup/mem ory"));
        assert!(mounts[3].is_v1("memory"));
        assert!(mounts[1].is_v1("cpu"));
        assert!(mounts[2].is_v1("cpu") && mounts[2].is_v1("cpuacct"));
        assert!(!mounts[0].is_v1("memory"));
        assert_eq!(mounts[4].fstype, "cgroup2");
        assert_eq!(mounts[4].super_options, vec!["rw", "nsdelegate"]);
    }

    #[test]
    fn oom_kill_counter_is_read_from_either_file() {
        assert_eq!(
            oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
            2
        );
        assert_eq!(
            oom_kill_count("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n"),
            1
        );
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    #[test]
    fn never_means_no_cgroups() {
        assert_eq!(
            Cgroups::detect(UseCgroups::Never, None, "m").unwrap(),
            Cgroups::None
        );
    }

    #[test]
    fn an_override_that_is_no_cgroup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Cgroups::detect(UseCgroups::Always, Some(dir.path()), "m").unwrap_err();
        assert!(err.contains("neither"), "{err}");
        assert_eq!(
            Cgroups::detect(UseCgroups::Auto, Some(dir.path()), "m").unwrap(),
            Cgroups::None
        );
    }
}
