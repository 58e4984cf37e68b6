//! What `/proc` says about processes and the machine: enough to tell a job's process from
//! an unrelated one that reused its pid, and to size the machine.

use std::io;

/// The fields of `/proc/<pid>/stat` the backend needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead)...
    pub state: char,
    /// Field 5: the process group.
    pub pgrp: u32,
    /// Field 22: when the process started, in clock ticks since boot. With the boot id it
    /// names a process uniquely, where a pid alone is reused.
    pub start_ticks: u64,
}

impl ProcStat {
    /// True while the process runs (a zombie has already exited: only its exit status,
    /// which only its parent can read, is left).
    pub fn is_running(self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself
/// hold spaces and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let after_name = &text[text.rfind(')')? + 1..];
    // Field 3 is the first after the name.
    let fields: Vec<&str> = after_name.split_ascii_whitespace().take(20).collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// True while a process of group `pgid` runs (zombies aside: they have ended, and an
/// init that does not reap may keep them for long).
pub(crate) fn group_running(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat_blocking(pid).ok().flatten())
        .any(|stat| stat.pgrp == pgid && stat.is_running())
}

/// Reads `/proc/<pid>/stat`; `None` when there is no such process.
pub(crate) async fn stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await {
        Ok(text) => parse_stat(&text)
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`stat`] for synchronous callers (start-up, blocking threads).
pub(crate) fn stat_blocking(pid: u32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(&text)
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// True when `pid` is still the process that started at `start_ticks` and has not exited.
pub(crate) fn same_process_running(stat: Option<ProcStat>, start_ticks: u64) -> bool {
    stat.is_some_and(|s| s.start_ticks == start_ticks && s.is_running())
}

/// This boot's id: start ticks count from boot, so they only identify a process within
/// one boot.
pub(crate) fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub(crate) fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_ascii_whitespace();
    let amount: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => amount.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "1234 (we (i)rd name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(ProcStat {
                state: 'S',
                pgrp: 1234,
                start_ticks: 987_654
            })
        );
        assert_eq!(parse_stat("1 (x) Z"), None);
    }

    #[test]
    fn own_process_is_running_and_matches_itself() {
        let me = std::process::id();
        let stat = stat_blocking(me).unwrap().unwrap();
        assert!(stat.is_running());
        assert!(same_process_running(Some(stat), stat.start_ticks));
        assert!(!same_process_running(Some(stat), stat.start_ticks + 1));
        assert!(!same_process_running(None, stat.start_ticks));
        assert!(group_running(stat.pgrp));
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let meminfo = "MemTotal:       16318412 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(16_318_412 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }
}
