//! The worker's protocol logic with no I/O: what each coordinator frame means, what goes back,
//! and the state that decides it (the units held, the pipeline sessions served, the totals).
//! The native loop (`native.rs`, tokio and a WebSocket) and the browser's (`tabula-web`'s
//! `Volunteer`, driven by JavaScript) both drive one [`WorkerCore`]: they read frames, hand
//! them to [`WorkerCore::on_frame`], and do what the returned [`Meaning`] says. Scheduling
//! policy (when to ask for more units, the browser's throttle) stays with the drivers.

use std::collections::{BTreeSet, VecDeque};

use tabula_protocol::{
    Address, Assignment, Identity, LeaseId, Precision, PublicKey, SessionId, Signal, StageOrder,
    Takes, ToCoordinator, ToWorker,
};

use crate::WorkerError;

/// How a worker presents itself and what it takes.
#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// Free text shown by the coordinator, e.g. `tabula-cli/0.1.0 cpu`.
    pub agent: String,
    pub precisions: Vec<Precision>,
    /// Take pipeline stages.
    pub stages: bool,
    /// The most model weights this worker holds, in MiB (0: no limit declared).
    pub max_model_mb: u32,
    /// Units held at once (computing and waiting), 1 to [`MAX_UNITS_HELD`].
    pub units_held: usize,
    /// Units computed at once (side by side, one per compute thread), 1 to
    /// [`MAX_PARALLEL`]; at most `units_held`.
    pub parallel: usize,
    /// Pipeline sessions served at once, 1 to [`MAX_MEMBERSHIPS`].
    pub memberships: usize,
}

/// The most units a worker holds at once.
pub const MAX_UNITS_HELD: usize = 16;
/// The most units a worker computes at once (the coordinator leases at most 16 units to a key
/// by default).
pub const MAX_PARALLEL: usize = 16;
const _: () = assert!(MAX_PARALLEL <= MAX_UNITS_HELD);
/// The most pipeline stages a worker serves at once.
pub const MAX_MEMBERSHIPS: usize = 4;

/// Totals of a worker's run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub submitted: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub credit_micro: u64,
}

/// What the coordinator sent for a pipeline member.
#[derive(Debug, PartialEq, Eq)]
pub enum MemberInput {
    /// The first stage's input for `step`.
    Input {
        step: u32,
        tokens: Vec<u32>,
    },
    Signal {
        peer: PublicKey,
        signal: Signal,
    },
    Relay {
        peer: PublicKey,
        chunk: Vec<u8>,
    },
    /// Send the retained outputs of steps up to `step`.
    History {
        step: u32,
    },
}

/// What a frame asks of the driver.
#[derive(Debug)]
pub enum Meaning {
    /// Send the login.
    Login(ToCoordinator),
    Welcome {
        heartbeat_ms: u32,
        credit_micro: u64,
    },
    /// A unit is held now: compute it when nothing else computes ([`WorkerCore::next_unit`]).
    Unit,
    /// A unit this worker did not want (it holds as many as it takes): send the release.
    GiveBack(ToCoordinator),
    /// A unit of a model larger than this worker's `max_model_mb` (a coordinator that ignored
    /// the budget sent at login): send the release, and tell the volunteer `why`.
    TooLarge {
        release: ToCoordinator,
        why: String,
    },
    /// Nothing to do: ask again after `retry_ms` (bounded to 50 ms – 60 s).
    NoWork {
        retry_ms: u32,
    },
    /// A verdict on a submitted unit (counted in the totals).
    Verdict {
        accepted: bool,
        reason: Option<String>,
    },
    /// A receipt that verifies and names this worker: `credit_micro` more, for `unit`.
    Credited {
        credit_micro: u64,
        unit: tabula_protocol::Hash,
    },
    /// A receipt that does not verify or is someone else's: ignored.
    BadReceipt,
    PayoutLinked(Address),
    /// The coordinator ends the session; with `retry` the worker reconnects with backoff,
    /// else it stops (see [`session_ended`]).
    Ended {
        message: String,
        retry: bool,
    },
    /// Join a pipeline session (the membership is counted from here).
    JoinStage(StageOrder),
    /// A stage order this worker does not take: send the refusal.
    DeclineStage(ToCoordinator),
    /// For the member serving `session`.
    ToMember(SessionId, MemberInput),
    /// The session is over for this worker's member.
    EndStage(SessionId),
    /// A message about a session this worker does not serve, or a repeated challenge.
    Ignored,
}

/// A worker's protocol state. Units held and their totals outlive a connection (a lease is
/// bound to the key, not the socket); memberships do not.
#[derive(Debug)]
pub struct WorkerCore {
    key: PublicKey,
    options: CoreOptions,
    /// The units being computed, oldest first. Invariants: `len() <= options.parallel`, and
    /// `len() == options.parallel || waiting.is_empty()` once [`WorkerCore::next_unit`] has
    /// returned `None` after each change.
    computing: Vec<Assignment>,
    /// Units leased and waiting their turn. Invariant: held units ≤ `options.units_held`.
    waiting: VecDeque<Assignment>,
    /// Sessions whose member runs. Invariant: ≤ `options.memberships`.
    members: BTreeSet<SessionId>,
    pub stats: Stats,
}

impl WorkerCore {
    pub fn new(key: PublicKey, mut options: CoreOptions) -> Self {
        options.parallel = options.parallel.clamp(1, MAX_PARALLEL);
        // A login with a longer agent is refused: cut it (on a character boundary) instead.
        if options.agent.len() > tabula_protocol::MAX_NAME {
            let mut end = tabula_protocol::MAX_NAME;
            while !options.agent.is_char_boundary(end) {
                end -= 1;
            }
            options.agent.truncate(end);
        }
        options.units_held = options.units_held.clamp(options.parallel, MAX_UNITS_HELD);
        options.memberships = options.memberships.clamp(1, MAX_MEMBERSHIPS);
        debug_assert!(options.parallel <= options.units_held);
        Self {
            key,
            options,
            computing: Vec::new(),
            waiting: VecDeque::new(),
            members: BTreeSet::new(),
            stats: Stats::default(),
        }
    }

    pub fn options(&self) -> &CoreOptions {
        &self.options
    }

    /// Offers stages (or stops offering them) from the next login on.
    pub fn set_stages(&mut self, stages: bool, max_model_mb: u32) {
        self.options.stages = stages;
        self.options.max_model_mb = max_model_mb;
    }

    /// Computes up to `parallel` units at once and holds as many (the browser's pool follows
    /// its volunteer's throttle). Units computing beyond a lower limit finish; no new one
    /// starts until fewer compute. Returns the limit taken (1 to [`MAX_PARALLEL`]).
    pub fn set_parallel(&mut self, parallel: usize) -> usize {
        self.options.parallel = parallel.clamp(1, MAX_PARALLEL);
        self.options.units_held = self.options.parallel;
        self.options.parallel
    }

    /// Units held now (computing and waiting).
    pub fn held(&self) -> usize {
        self.computing.len() + self.waiting.len()
    }

    /// Room for more units.
    pub fn wants_units(&self) -> usize {
        // More can be held than the limit for a while after `set_parallel` lowered it.
        self.options.units_held.saturating_sub(self.held())
    }

    /// The oldest unit being computed, if any.
    pub fn computing(&self) -> Option<&Assignment> {
        self.computing.first()
    }

    /// The unit computing under `lease`, if any.
    pub fn computing_unit(&self, lease: LeaseId) -> Option<&Assignment> {
        self.computing.iter().find(|a| a.lease == lease)
    }

    /// Starts the next waiting unit when fewer than `parallel` compute; returns it (to
    /// compute). Call until it returns `None`.
    pub fn next_unit(&mut self) -> Option<&Assignment> {
        if self.computing.len() < self.options.parallel {
            let next = self.waiting.pop_front()?;
            self.computing.push(next);
            return self.computing.last();
        }
        None
    }

    /// A connection ended: its memberships end with it (the coordinator rebuilds without
    /// them); units held stay held.
    pub fn disconnected(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.members).into_iter().collect()
    }

    /// The member of `session` stopped by itself (it failed and told the coordinator).
    pub fn member_stopped(&mut self, session: &SessionId) {
        self.members.remove(session);
    }

    /// The signed result of the unit computing under `lease`, which is no longer held.
    pub fn submit(
        &mut self,
        identity: &Identity,
        lease: LeaseId,
        output: Vec<u8>,
    ) -> Option<ToCoordinator> {
        debug_assert_eq!(identity.public(), self.key);
        let a = self.take_computing(lease)?;
        self.stats.submitted += 1;
        Some(ToCoordinator::Submit(
            identity.submission(lease, a.unit, output),
        ))
    }

    /// Gives back the unit computing under `lease` (it failed, or the volunteer stopped).
    pub fn release(&mut self, lease: LeaseId) -> Option<ToCoordinator> {
        self.take_computing(lease)
            .map(|a| ToCoordinator::Release { lease: a.lease })
    }

    fn take_computing(&mut self, lease: LeaseId) -> Option<Assignment> {
        let at = self.computing.iter().position(|a| a.lease == lease)?;
        Some(self.computing.remove(at))
    }

    /// Gives back every unit held (shutdown, or a run that has submitted what it should).
    pub fn release_all(&mut self) -> Vec<ToCoordinator> {
        self.computing
            .drain(..)
            .chain(self.waiting.drain(..))
            .map(|a| ToCoordinator::Release { lease: a.lease })
            .collect()
    }

    /// What `frame` means, with the state changed accordingly.
    pub fn on_frame(&mut self, identity: &Identity, frame: ToWorker) -> Meaning {
        match frame {
            ToWorker::Challenge { nonce, coordinator } => Meaning::Login(ToCoordinator::Login {
                key: self.key,
                signature: identity.sign_login(&nonce, &coordinator),
                agent: self.options.agent.clone(),
                precisions: self.options.precisions.clone(),
                stages: self.options.stages,
                max_model_mb: self.options.max_model_mb,
            }),
            ToWorker::Welcome {
                heartbeat_ms,
                credit_micro,
            } => {
                self.stats.credit_micro = credit_micro;
                Meaning::Welcome {
                    heartbeat_ms,
                    credit_micro,
                }
            }
            ToWorker::Assign(a) => {
                let budget = Takes {
                    precisions: self.options.precisions.clone(),
                    max_model_mb: self.options.max_model_mb,
                };
                if !budget.fits(a.task.model()) {
                    let model = a.task.model();
                    Meaning::TooLarge {
                        why: format!(
                            "refused a unit of {}: its weights are {} MiB, more than this \
                             worker's --max-model-mb {}",
                            model.name,
                            model.bytes().div_ceil(1 << 20),
                            self.options.max_model_mb
                        ),
                        release: ToCoordinator::Release { lease: a.lease },
                    }
                } else if self.held() >= self.options.units_held {
                    Meaning::GiveBack(ToCoordinator::Release { lease: a.lease })
                } else {
                    self.waiting.push_back(a);
                    Meaning::Unit
                }
            }
            ToWorker::NoWork { retry_ms } => Meaning::NoWork {
                retry_ms: retry_ms.clamp(50, 60_000),
            },
            ToWorker::Accepted { .. } => {
                self.stats.accepted += 1;
                Meaning::Verdict {
                    accepted: true,
                    reason: None,
                }
            }
            ToWorker::Rejected { reason, .. } => {
                self.stats.rejected += 1;
                Meaning::Verdict {
                    accepted: false,
                    reason: Some(reason),
                }
            }
            ToWorker::Credited(receipt) => {
                if receipt.verify().is_ok() && receipt.worker == self.key {
                    self.stats.credit_micro += receipt.credit_micro;
                    Meaning::Credited {
                        credit_micro: receipt.credit_micro,
                        unit: receipt.unit,
                    }
                } else {
                    Meaning::BadReceipt
                }
            }
            ToWorker::PayoutLinked { address } => Meaning::PayoutLinked(address),
            ToWorker::Error { message, retry } => Meaning::Ended { message, retry },
            ToWorker::Stage(order) => {
                let session = order.session;
                let decline = |reason: String| {
                    Meaning::DeclineStage(ToCoordinator::StageFailed { session, reason })
                };
                if !self.options.stages {
                    return decline("this worker takes no pipeline stages".into());
                }
                if let Err(e) = order.validate() {
                    return decline(format!("a stage order that does not check: {e}"));
                }
                if self.members.contains(&session) {
                    return decline("this worker already serves this session".into());
                }
                if self.members.len() >= self.options.memberships {
                    return decline(format!(
                        "this worker already serves {} stage{}",
                        self.members.len(),
                        if self.members.len() == 1 { "" } else { "s" }
                    ));
                }
                self.members.insert(session);
                Meaning::JoinStage(order)
            }
            ToWorker::StageInput {
                session,
                step,
                tokens,
            } => self.to_member(session, MemberInput::Input { step, tokens }),
            ToWorker::Signal {
                session,
                peer,
                signal,
            } => {
                if signal.validate().is_err() {
                    return Meaning::Ignored;
                }
                self.to_member(session, MemberInput::Signal { peer, signal })
            }
            ToWorker::Relay {
                session,
                peer,
                chunk,
            } => self.to_member(session, MemberInput::Relay { peer, chunk }),
            ToWorker::StageHistory { session, step } => {
                self.to_member(session, MemberInput::History { step })
            }
            ToWorker::StageEnd { session } => {
                if self.members.remove(&session) {
                    Meaning::EndStage(session)
                } else {
                    Meaning::Ignored
                }
            }
        }
    }

    fn to_member(&self, session: SessionId, input: MemberInput) -> Meaning {
        if self.members.contains(&session) {
            Meaning::ToMember(session, input)
        } else {
            Meaning::Ignored
        }
    }
}

/// The coordinator ended the session: a refusal for good stops the worker, anything else (a
/// silent socket, a passing failure on its side) is a lost connection to retry with backoff.
pub fn session_ended(message: String, retry: bool) -> WorkerError {
    if retry {
        WorkerError::Connection(format!("the coordinator ended the session: {message}"))
    } else {
        WorkerError::Refused(message)
    }
}

#[cfg(test)]
mod tests {
    use tabula_protocol::{Bytes, FileRef, ModelRef, Receipt, Task};

    use super::*;

    fn task() -> Task {
        Task::Embed {
            model: ModelRef {
                name: "m".into(),
                files: Vec::new(),
            },
            precision: Precision::Exact,
            sequences: vec![vec![1, 2]],
        }
    }

    fn receipt(coordinator: &Identity, worker: PublicKey, credit_micro: u64) -> Receipt {
        let mut r = Receipt {
            coordinator: coordinator.public(),
            worker,
            unit: task().digest(),
            lease: Bytes([1; 16]),
            output_hash: Bytes([0; 32]),
            credit_micro,
            issued_ms: 0,
            signature: Bytes([0; 64]),
        };
        coordinator.sign_receipt(&mut r);
        r
    }

    fn stage_order() -> StageOrder {
        StageOrder {
            session: Bytes([1; 16]),
            stage: 0,
            stages: 2,
            layers: (0, 10),
            model: ModelRef {
                name: "m".into(),
                files: vec![FileRef {
                    role: "piece".into(),
                    sha256: Bytes([2; 32]),
                    size: 1,
                }],
            },
            capacity: 64,
            first_step: 0,
            temperature_milli: 0,
            top_p_q16: 65536,
            seed: 0,
            upstream: None,
            downstream: Some(Bytes([4; 32])),
            direct_ms: 5000,
        }
    }

    fn core(units: usize, stages: bool) -> (Identity, WorkerCore) {
        let id = Identity::from_seed([3; 32]);
        let core = WorkerCore::new(
            id.public(),
            CoreOptions {
                agent: "test".into(),
                precisions: vec![Precision::Exact],
                stages,
                max_model_mb: 0,
                units_held: units,
                parallel: 1,
                memberships: 1,
            },
        );
        (id, core)
    }

    /// Exact precision, no stages, one membership.
    fn options(units_held: usize, parallel: usize) -> CoreOptions {
        CoreOptions {
            agent: "test".into(),
            precisions: vec![Precision::Exact],
            stages: false,
            max_model_mb: 0,
            units_held,
            parallel,
            memberships: 1,
        }
    }

    fn assignment(lease: u8) -> Assignment {
        let task = task();
        Assignment {
            lease: Bytes([lease; 16]),
            unit: task.digest(),
            deadline_ms: 0,
            task,
        }
    }

    /// A unit of a model over the worker's budget goes back with the reason, whatever the
    /// coordinator meant by sending it; one that fits is taken.
    #[test]
    fn a_unit_of_a_model_over_the_budget_goes_back_with_the_reason() {
        let (id, mut core) = core(2, false);
        core.options.max_model_mb = 1;
        let sized = |lease: u8, bytes: u64| {
            let mut a = assignment(lease);
            let Task::Embed { model, .. } = &mut a.task else {
                unreachable!("task() is an embedding")
            };
            model.files.push(tabula_protocol::FileRef {
                role: "exact".into(),
                sha256: Bytes([9; 32]),
                size: bytes,
            });
            a
        };
        match core.on_frame(&id, ToWorker::Assign(sized(1, (1 << 20) + 1))) {
            Meaning::TooLarge {
                release: ToCoordinator::Release { lease },
                why,
            } => {
                assert_eq!(lease, Bytes([1; 16]));
                assert!(
                    why.contains("its weights are 2 MiB, more than this worker's --max-model-mb 1"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(core.next_unit().is_none(), "the refused unit is not held");
        assert!(matches!(
            core.on_frame(&id, ToWorker::Assign(sized(2, 1 << 20))),
            Meaning::Unit
        ));
    }

    #[test]
    fn units_beyond_what_the_worker_holds_go_back_and_results_are_signed_once() {
        let (id, mut core) = core(2, false);
        assert!(matches!(
            core.on_frame(&id, ToWorker::Assign(assignment(1))),
            Meaning::Unit
        ));
        assert!(matches!(
            core.on_frame(&id, ToWorker::Assign(assignment(2))),
            Meaning::Unit
        ));
        match core.on_frame(&id, ToWorker::Assign(assignment(3))) {
            Meaning::GiveBack(ToCoordinator::Release { lease }) => {
                assert_eq!(lease, Bytes([3; 16]))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(core.next_unit().map(|a| a.lease), Some(Bytes([1; 16])));
        assert!(core.next_unit().is_none(), "one computes at a time");
        // A result for a lease that is not computing is not signed.
        assert!(core.submit(&id, Bytes([2; 16]), vec![1]).is_none());
        let Some(ToCoordinator::Submit(s)) = core.submit(&id, Bytes([1; 16]), vec![1]) else {
            panic!("a submission");
        };
        assert_eq!(s.lease, Bytes([1; 16]));
        assert!(core.submit(&id, Bytes([1; 16]), vec![1]).is_none(), "once");
        assert_eq!(core.stats.submitted, 1);
        assert_eq!(core.next_unit().map(|a| a.lease), Some(Bytes([2; 16])));
        assert_eq!(core.release_all().len(), 1);
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn units_compute_side_by_side_up_to_the_threads_and_the_rest_wait() {
        let id = Identity::from_seed([3; 32]);
        // Fewer units held than threads: each thread still gets one.
        let core = WorkerCore::new(id.public(), options(1, 3));
        assert_eq!((core.options().units_held, core.wants_units()), (3, 3));
        let mut core = WorkerCore::new(id.public(), options(4, 2));
        for lease in 1..=4 {
            assert!(matches!(
                core.on_frame(&id, ToWorker::Assign(assignment(lease))),
                Meaning::Unit
            ));
        }
        assert_eq!(core.next_unit().map(|a| a.lease), Some(Bytes([1; 16])));
        assert_eq!(core.next_unit().map(|a| a.lease), Some(Bytes([2; 16])));
        assert!(core.next_unit().is_none(), "two threads");
        // The second finishes first: its thread takes the third unit.
        assert!(core.submit(&id, Bytes([2; 16]), vec![2]).is_some());
        assert_eq!(core.next_unit().map(|a| a.lease), Some(Bytes([3; 16])));
        assert!(core.next_unit().is_none());
        assert!(core.release(Bytes([1; 16])).is_some());
        assert_eq!(core.next_unit().map(|a| a.lease), Some(Bytes([4; 16])));
        assert_eq!(core.held(), 2);
        assert_eq!(core.release_all().len(), 2);
        // Out-of-range options are clamped.
        let core = WorkerCore::new(id.public(), options(0, 1000));
        assert_eq!(core.options().parallel, MAX_PARALLEL);
        assert_eq!(core.options().units_held, MAX_UNITS_HELD);
    }

    #[test]
    fn a_lower_thread_limit_lets_running_units_finish_and_starts_none_until_below_it() {
        let id = Identity::from_seed([3; 32]);
        let mut core = WorkerCore::new(id.public(), options(1, 1));
        assert_eq!(core.set_parallel(3), 3);
        assert_eq!(core.wants_units(), 3);
        for lease in 1..=3 {
            assert!(matches!(
                core.on_frame(&id, ToWorker::Assign(assignment(lease))),
                Meaning::Unit
            ));
            assert_eq!(core.next_unit().map(|a| a.lease), Some(Bytes([lease; 16])));
        }
        // The volunteer lowers the throttle to one thread: three still compute.
        assert_eq!(core.set_parallel(1), 1);
        assert_eq!(core.wants_units(), 0);
        assert!(matches!(
            core.on_frame(&id, ToWorker::Assign(assignment(4))),
            Meaning::GiveBack(ToCoordinator::Release { .. })
        ));
        assert!(core.submit(&id, Bytes([1; 16]), vec![1]).is_some());
        assert!(core.submit(&id, Bytes([2; 16]), vec![2]).is_some());
        assert_eq!(core.wants_units(), 0, "one still computes");
        assert!(core.submit(&id, Bytes([3; 16]), vec![3]).is_some());
        assert_eq!(core.wants_units(), 1);
        assert_eq!(
            (core.set_parallel(0), core.set_parallel(1000)),
            (1, MAX_PARALLEL)
        );
    }

    #[test]
    fn a_long_agent_is_cut_so_that_the_login_is_accepted() {
        let id = Identity::from_seed([3; 32]);
        let mut core = WorkerCore::new(
            id.public(),
            CoreOptions {
                agent: "tabula-web/0.1.0 é".repeat(20),
                precisions: vec![Precision::Exact],
                stages: false,
                max_model_mb: 0,
                units_held: 1,
                parallel: 1,
                memberships: 1,
            },
        );
        assert!(core.options().agent.len() <= tabula_protocol::MAX_NAME);
        let challenge = ToWorker::Challenge {
            nonce: Bytes([1; 32]),
            coordinator: Identity::from_seed([9; 32]).public(),
        };
        let Meaning::Login(login) = core.on_frame(&id, challenge) else {
            panic!("a login");
        };
        login
            .validate()
            .expect("the coordinator accepts this login");
    }

    #[test]
    fn receipts_count_only_when_they_verify_and_name_this_worker() {
        let (id, mut core) = core(1, false);
        let coordinator = Identity::from_seed([9; 32]);
        let mine = receipt(&coordinator, id.public(), 5);
        assert!(matches!(
            core.on_frame(&id, ToWorker::Credited(mine.clone())),
            Meaning::Credited {
                credit_micro: 5,
                ..
            }
        ));
        let theirs = receipt(&coordinator, Identity::from_seed([4; 32]).public(), 5);
        assert!(matches!(
            core.on_frame(&id, ToWorker::Credited(theirs)),
            Meaning::BadReceipt
        ));
        let mut forged = mine;
        forged.credit_micro = 500;
        assert!(matches!(
            core.on_frame(&id, ToWorker::Credited(forged)),
            Meaning::BadReceipt
        ));
        assert_eq!(core.stats.credit_micro, 5);
    }

    #[test]
    fn stage_orders_are_declined_or_joined_and_messages_reach_only_members() {
        let order = stage_order();
        let session = order.session;
        let (id, mut no_stages) = core(1, false);
        assert!(matches!(
            no_stages.on_frame(&id, ToWorker::Stage(order.clone())),
            Meaning::DeclineStage(ToCoordinator::StageFailed { .. })
        ));
        let (id, mut core) = core(1, true);
        let input = || ToWorker::StageInput {
            session,
            step: 0,
            tokens: vec![1],
        };
        assert!(
            matches!(core.on_frame(&id, input()), Meaning::Ignored),
            "not a member yet"
        );
        assert!(matches!(
            core.on_frame(&id, ToWorker::Stage(order.clone())),
            Meaning::JoinStage(_)
        ));
        assert!(
            matches!(core.on_frame(&id, input()), Meaning::ToMember(s, MemberInput::Input { .. }) if s == session)
        );
        // One membership at a time here; a second order is declined with the reason.
        let mut other = order.clone();
        other.session = Bytes([0xee; 16]);
        assert!(matches!(
            core.on_frame(&id, ToWorker::Stage(other)),
            Meaning::DeclineStage(_)
        ));
        // A signal that breaks the protocol's bounds never reaches the member.
        let garbage = ToWorker::Signal {
            session,
            peer: id.public(),
            signal: Signal::Candidate {
                json: String::new(),
            },
        };
        assert!(matches!(core.on_frame(&id, garbage), Meaning::Ignored));
        assert!(matches!(
            core.on_frame(&id, ToWorker::StageEnd { session }),
            Meaning::EndStage(_)
        ));
        assert!(matches!(core.on_frame(&id, input()), Meaning::Ignored));
        // A broken order is declined, not joined.
        let mut broken = order;
        broken.stages = 0;
        assert!(matches!(
            core.on_frame(&id, ToWorker::Stage(broken)),
            Meaning::DeclineStage(_)
        ));
    }

    #[test]
    fn the_coordinator_ending_a_session_says_whether_to_come_back() {
        let (id, mut core) = core(1, false);
        let end = |core: &mut WorkerCore, retry| match core.on_frame(
            &id,
            ToWorker::Error {
                message: "m".into(),
                retry,
            },
        ) {
            Meaning::Ended { message, retry } => session_ended(message, retry),
            other => panic!("{other:?}"),
        };
        assert!(matches!(end(&mut core, true), WorkerError::Connection(_)));
        assert!(matches!(end(&mut core, false), WorkerError::Refused(_)));
    }
}
