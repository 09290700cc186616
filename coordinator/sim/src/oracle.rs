//! What must hold in every run, whatever the faults.
//!
//! A call that got no answer tells nothing: only answers are recorded, and each is checked
//! against what the participants did and against every other answer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use pledge_proto::{BranchKey, Gtid};

use crate::participant::{Participant, State};

/// An answer a client heard about a transaction's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    Committed,
    Aborted,
    /// NOT_FOUND: the coordinator has no record, so it was never committed (presumed abort).
    NoRecord,
    /// The outcome is older than the retention window (no claim either way).
    Forgotten,
}

impl Heard {
    /// Committed (`Some(true)`), not committed (`Some(false)`), or no claim.
    fn committed(self) -> Option<bool> {
        match self {
            Heard::Committed => Some(true),
            Heard::Aborted | Heard::NoRecord => Some(false),
            Heard::Forgotten => None,
        }
    }
}

/// A broken rule, with the simulated time at which it was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    pub at_ms: u64,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {} at t={} ms: {}", self.seed, self.at_ms, self.what)
    }
}

#[derive(Default)]
pub struct Oracle {
    /// Branches each transaction enlisted.
    pub enlisted: BTreeMap<Gtid, Vec<BranchKey>>,
    /// Transactions the coordinator reports heuristic mixed (branches ended differently): the
    /// one case where branches may disagree, and only if reported.
    pub reported_mixed: BTreeSet<Gtid>,
    /// Every answer heard, with when and from which call.
    heard: BTreeMap<Gtid, Vec<(u64, Heard, &'static str)>>,
    /// When each finished transaction completed, as its durable End record says: the
    /// coordinator must answer for it until `completed + retention`.
    completed_ms: BTreeMap<Gtid, u64>,
}

impl Oracle {
    /// An End record reached the disk.
    pub fn completed(&mut self, gtid: Gtid, completed_ms: u64) {
        self.completed_ms.insert(gtid, completed_ms);
    }

    /// Records an answer; a second answer that contradicts an earlier one, or an outcome
    /// forgotten before `retention_ms` passed since its transaction completed, is a violation.
    pub fn heard(
        &mut self,
        now: u64,
        gtid: Gtid,
        heard: Heard,
        call: &'static str,
        retention_ms: u64,
    ) -> Result<(), String> {
        let answers = self.heard.entry(gtid).or_default();
        if let Some(said) = heard.committed()
            && let Some((at, earlier, by)) = answers.iter().find(|(_, h, _)| h.committed() == Some(!said))
        {
            return Err(format!("{gtid}: {call} answered {heard:?}, but {by} answered {earlier:?} at t={at} ms"));
        }
        if heard == Heard::Forgotten
            && let Some(completed) = self.completed_ms.get(&gtid)
            && now < completed + retention_ms
        {
            return Err(format!(
                "{gtid}: {call} answered that the outcome is forgotten {} ms after the transaction completed \
                 (retention {retention_ms} ms)",
                now - completed
            ));
        }
        answers.push((now, heard, call));
        Ok(())
    }

    /// The end-of-run checks, once faults have stopped and the system had time to settle.
    pub fn check_end(&self, participants: &BTreeMap<String, Participant>) -> Result<(), String> {
        for p in participants.values() {
            if let Some(c) = p.contradictions.first() {
                return Err(format!("a participant was told to contradict a decision: {c}"));
            }
        }
        for (gtid, branches) in &self.enlisted {
            let mut states = Vec::new();
            for key in branches {
                let p = &participants[key.resource.as_str()];
                states.push((key, p.branches.get(&(*gtid, key.clone())).copied()));
            }
            if let Some((key, _)) =
                states.iter().find(|(_, s)| matches!(s, Some(State::Prepared { .. } | State::PreCommitted { .. })))
            {
                return Err(format!("{gtid}: branch {key} is still prepared (in doubt) after the faults stopped"));
            }
            let committed = states.iter().any(|(_, s)| *s == Some(State::Committed));
            let aborted = states.iter().any(|(_, s)| *s == Some(State::Aborted));
            if self.reported_mixed.contains(gtid) {
                if !(committed && aborted) {
                    return Err(format!("{gtid}: reported heuristic mixed, but the branches ended {states:?}"));
                }
                continue;
            }
            if committed && aborted {
                return Err(format!("{gtid}: committed at some branches and aborted at others: {states:?}"));
            }
            for (at, heard, call) in self.heard.get(gtid).into_iter().flatten() {
                match heard.committed() {
                    Some(true) if !committed || states.iter().any(|(_, s)| *s != Some(State::Committed)) => {
                        return Err(format!(
                            "{gtid}: {call} answered committed at t={at} ms, but the branches ended {states:?}"
                        ));
                    }
                    Some(false) if committed => {
                        return Err(format!(
                            "{gtid}: {call} answered {heard:?} at t={at} ms, but some branch committed: {states:?}"
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
