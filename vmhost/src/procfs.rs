//! The little of `/proc` the drivers read: a process's state, group and
//! start time (which, with the boot id, tells a VM's process from a later
//! process that got the same pid).

use std::io;
use std::sync::OnceLock;

/// What `/proc/PID/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// `R`, `S`, `D`, `T` (stopped), `t` (traced), `Z` (zombie), `X`…
    pub state: char,
    pub pgrp: i32,
    /// Clock ticks after boot when the process started.
    pub start_ticks: u64,
}

impl ProcStat {
    /// A zombie or dead process no longer runs anything.
    pub fn has_ended(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// Stopped by a signal (SIGSTOP).
    pub fn is_stopped(&self) -> bool {
        self.state == 'T'
    }
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so the fields are
/// counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_ascii_whitespace().collect();
    // fields[0] is field 3 of proc(5): field N is fields[N - 3].
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(5 - 3)?.parse().ok()?;
    let start_ticks = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat { state, pgrp, start_ticks })
}

/// Reads `/proc/PID/stat`; `None` when there is no such process.
pub(crate) fn read_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(&text)
            .map(Some)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable /proc/{pid}/stat"))),
        // ESRCH can show up when the process ends between open and read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every process of a process group, from a scan of `/proc`. Processes that
/// end during the scan are left out.
pub(crate) fn group_members(pgrp: i32) -> io::Result<Vec<ProcStat>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Ok(Some(stat)) = read_stat(pid) {
            if stat.pgrp == pgrp {
                out.push(stat);
            }
        }
    }
    Ok(out)
}

/// A group is paused when SIGSTOP took hold: some member is stopped and
/// none runs or sleeps. A member blocked in `vfork` until its stopped
/// child execs shows as `D`, not `T`, so the leader's state alone is not
/// enough (`sh` does exactly this).
pub(crate) fn group_is_paused(members: &[ProcStat]) -> bool {
    members.iter().any(ProcStat::is_stopped) && !members.iter().any(|s| matches!(s.state, 'R' | 'S'))
}

/// A process's command line, one string per argument.
pub(crate) fn read_cmdline(pid: u32) -> io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

/// This boot's id: a pid and start time mean the same process only within
/// one boot.
pub(crate) fn boot_id() -> &'static str {
    static BOOT_ID: OnceLock<String> = OnceLock::new();
    BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_hostile_command_name() {
        let line = "4242 (a) b (c) S) T 1 4242 4242 0 -1 4194560 97 0 0 0 0 0 0 0 20 0 1 0 987654 2449408 \
                    131 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).expect("parse");
        assert_eq!(s, ProcStat { state: 'T', pgrp: 4242, start_ticks: 987654 });
        assert!(s.is_stopped() && !s.has_ended());
    }

    #[test]
    fn refuses_truncated_lines() {
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn a_group_is_paused_when_nothing_in_it_runs() {
        let st = |state| ProcStat { state, pgrp: 1, start_ticks: 1 };
        assert!(group_is_paused(&[st('T'), st('T')]));
        // A shell blocked in vfork while its child is stopped.
        assert!(group_is_paused(&[st('D'), st('T')]));
        assert!(!group_is_paused(&[st('T'), st('S')]));
        assert!(!group_is_paused(&[st('R')]));
        assert!(!group_is_paused(&[st('D')]));
        assert!(!group_is_paused(&[]));
    }

    #[test]
    fn reads_this_process() {
        let me = read_stat(std::process::id()).expect("read").expect("exists");
        assert!(!me.has_ended() && !me.is_stopped(), "{me:?}");
        assert!(me.start_ticks > 0);
        assert!(!boot_id().is_empty());
        assert!(!read_cmdline(std::process::id()).expect("cmdline").is_empty());
    }
}
