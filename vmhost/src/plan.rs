//! The host's reconcile step, pure: what the leader assigned, what the
//! drivers see and what this host remembers in; actions and the report for
//! the next heartbeat out. The agent (`agent.rs`) carries the actions out.
//!
//! Rules:
//! - A VM runs here at most once per epoch. If it ends by itself (the
//!   workload exited, the guest powered off or failed), that end is final
//!   for the epoch and reported; a new run needs a new epoch from the leader.
//!   An end this host caused (fencing) is not the workload's: the VM runs
//!   again if it is still assigned.
//! - A VM not assigned here any more is stopped and its local run state
//!   removed; its writable layer lives in Locus and stays.
//! - An assignment with `run: false` stops the VM and reports it stopped.

use std::collections::{BTreeMap, BTreeSet};

use fs_client::vm::{Assignment, ReportedState};

/// What this host knows of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Local {
    /// Its process exists (running or paused).
    pub live: bool,
    pub paused: bool,
    /// The epoch it was started at, if it was started here.
    pub epoch: Option<u64>,
    /// How it ended, when it ended by itself: (epoch, state).
    pub ended: Option<(u64, ReportedState)>,
    /// How the driver says it ended (not yet judged natural or fenced).
    pub driver_end: Option<ReportedState>,
    /// Fencing killed it (the guard's record).
    pub fenced: bool,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Prepare (image, clone, customization) and start it at this epoch.
    Start(Assignment),
    /// It runs at a new epoch from now on (reassigned while running).
    Adopt { vm: String, epoch: u64 },
    /// It ended by itself at this epoch: remember that.
    RecordEnd { vm: String, epoch: u64, state: ReportedState },
    /// Stop it gracefully; keep its run state.
    Stop { vm: String },
    /// Stop it if it runs, then forget it here.
    Remove { vm: String },
}

/// One reconcile step. `busy` are the VMs an earlier action is still
/// working on; they are reported as they are and left alone.
pub fn plan(
    assignments: &[Assignment],
    local: &BTreeMap<String, Local>,
    busy: &BTreeSet<String>,
) -> (Vec<Action>, Vec<(String, u64, ReportedState)>) {
    let mut actions = Vec::new();
    let mut report = Vec::new();
    let assigned: BTreeMap<&str, &Assignment> = assignments.iter().map(|a| (a.vm.as_str(), a)).collect();
    for id in local.keys() {
        if !assigned.contains_key(id.as_str()) && !busy.contains(id) {
            actions.push(Action::Remove { vm: id.clone() });
        }
    }
    let stopped = |reason: &str| ReportedState::Stopped { reason: reason.to_string() };
    for a in assignments {
        let l = local.get(&a.vm).cloned().unwrap_or_default();
        if busy.contains(&a.vm) {
            let state = if l.live { running(&l) } else { ReportedState::Preparing };
            report.push((a.vm.clone(), a.epoch, state));
            continue;
        }
        if l.live {
            if l.epoch != Some(a.epoch) {
                actions.push(Action::Adopt { vm: a.vm.clone(), epoch: a.epoch });
            }
            if !a.run {
                actions.push(Action::Stop { vm: a.vm.clone() });
            }
            report.push((a.vm.clone(), a.epoch, running(&l)));
            continue;
        }
        // Not live.
        if let Some((e, state)) = &l.ended {
            if *e == a.epoch {
                report.push((a.vm.clone(), a.epoch, state.clone()));
                continue;
            }
        }
        if !a.run {
            report.push((a.vm.clone(), a.epoch, stopped("stopped")));
            continue;
        }
        // It should run. If it ran at this epoch and ended by itself, that
        // is final; an end by fencing, or a start at another epoch, is not.
        match (&l.driver_end, l.epoch == Some(a.epoch) && !l.fenced) {
            (Some(end), true) => {
                actions.push(Action::RecordEnd { vm: a.vm.clone(), epoch: a.epoch, state: end.clone() });
                report.push((a.vm.clone(), a.epoch, end.clone()));
            }
            _ => {
                actions.push(Action::Start(a.clone()));
                report.push((a.vm.clone(), a.epoch, ReportedState::Preparing));
            }
        }
    }
    (actions, report)
}

fn running(l: &Local) -> ReportedState {
    if l.paused {
        ReportedState::Paused
    } else {
        ReportedState::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(vm: &str, epoch: u64, run: bool) -> Assignment {
        Assignment { vm: vm.into(), service: "s".into(), index: 1, epoch, run, checkpoint: 0 }
    }

    fn live(epoch: u64) -> Local {
        Local { live: true, epoch: Some(epoch), ..Default::default() }
    }

    #[test]
    fn new_assignments_start_and_unknown_vms_go() {
        let local = [("old".to_string(), live(1))].into();
        let (acts, rep) = plan(&[a("new", 3, true)], &local, &BTreeSet::new());
        assert_eq!(acts, vec![Action::Remove { vm: "old".into() }, Action::Start(a("new", 3, true))]);
        assert_eq!(rep, vec![("new".into(), 3, ReportedState::Preparing)]);
    }

    #[test]
    fn a_running_vm_is_left_alone_or_stopped() {
        let local = [("v".to_string(), live(2))].into();
        let (acts, rep) = plan(&[a("v", 2, true)], &local, &BTreeSet::new());
        assert!(acts.is_empty());
        assert_eq!(rep[0].2, ReportedState::Running);
        let (acts, _) = plan(&[a("v", 2, false)], &local, &BTreeSet::new());
        assert_eq!(acts, vec![Action::Stop { vm: "v".into() }]);
        let (acts, _) = plan(&[a("v", 5, true)], &local, &BTreeSet::new());
        assert_eq!(acts, vec![Action::Adopt { vm: "v".into(), epoch: 5 }]);
    }

    #[test]
    fn an_end_by_itself_is_final_for_its_epoch() {
        let failed = ReportedState::Failed { reason: "exit code 3".into() };
        let l = Local { epoch: Some(2), driver_end: Some(failed.clone()), ..Default::default() };
        let local = [("v".to_string(), l.clone())].into();
        let (acts, rep) = plan(&[a("v", 2, true)], &local, &BTreeSet::new());
        assert_eq!(acts, vec![Action::RecordEnd { vm: "v".into(), epoch: 2, state: failed.clone() }]);
        assert_eq!(rep[0].2, failed);
        // Recorded: reported, not restarted.
        let l2 = Local { ended: Some((2, failed.clone())), ..l.clone() };
        let (acts, _) = plan(&[a("v", 2, true)], &[("v".to_string(), l2.clone())].into(), &BTreeSet::new());
        assert!(acts.is_empty());
        // A new epoch runs it again.
        let (acts, _) = plan(&[a("v", 3, true)], &[("v".to_string(), l2)].into(), &BTreeSet::new());
        assert_eq!(acts, vec![Action::Start(a("v", 3, true))]);
        // Killed by fencing: runs again at the same epoch.
        let fenced = Local { fenced: true, ..l };
        let (acts, _) = plan(&[a("v", 2, true)], &[("v".to_string(), fenced)].into(), &BTreeSet::new());
        assert_eq!(acts, vec![Action::Start(a("v", 2, true))]);
    }

    #[test]
    fn busy_vms_are_reported_and_left_alone() {
        let busy: BTreeSet<String> = ["v".to_string()].into();
        let (acts, rep) = plan(&[a("v", 1, true)], &BTreeMap::new(), &busy);
        assert!(acts.is_empty());
        assert_eq!(rep, vec![("v".into(), 1, ReportedState::Preparing)]);
    }

    #[test]
    fn a_stopped_assignment_reports_stopped() {
        let (acts, rep) = plan(&[a("v", 1, false)], &BTreeMap::new(), &BTreeSet::new());
        assert!(acts.is_empty());
        assert!(matches!(rep[0].2, ReportedState::Stopped { .. }));
    }
}
