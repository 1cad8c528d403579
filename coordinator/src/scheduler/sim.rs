//! A deterministic simulation of the scheduler ([`Book`]) and its journal, with no sockets and
//! no clock: one seed decides everything. Honest workers and Byzantine ones (pair-seekers
//! that release unpaired units, rings across prefixes, sleepers that behave for 500 units and
//! then lie, hoarders, canary poisoners) run against the real decision code; the coordinator
//! crashes at random, losing the journal's uncommitted tail (its memory goes back to the last
//! commit, what the database holds). After every step it checks that no honest worker was
//! struck, that no (worker, unit) was credited twice and that the book's indexes are exact;
//! at the end, that every unit finished. It measures wrong results delivered per unit, lies
//! before each cheater's ban, and the verification overhead (compute spent / useful).
//!
//! `cargo test -p tabula-coordinator simulation` runs a few seeds (CI);
//! `TABULA_SIM_SEEDS=1000 TABULA_SIM_STEPS=20000 cargo test --release -p tabula-coordinator
//! simulation -- --nocapture` runs for as long as you like and prints the figures.

use std::collections::{HashMap, HashSet};

use tabula_protocol::{Assignment, Hash, Identity, ModelRef, Precision, Submission, Takes, Task};

use super::{
    Assurance, Metrics,
    book::{Book, Ctx, Effects, Entropy, SubmitOutcome, Unit, testing::output},
};
use crate::{Config, journal::Write};

const UNITS_PER_JOB: u32 = 32;
/// Simulated milliseconds per step.
const STEP_MS: i64 = 100;
/// How long a banned cheater takes to come back under a new key (the coordinator takes a
/// limited number of new keys a minute from a network).
const REJOIN_MS: i64 = 5_000;
/// Unfinished jobs beyond which requesters wait.
const MAX_BACKLOG_JOBS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Honest,
    /// Lies (with its group's shared wrong answer) only when another member holds the same
    /// unit; gives back units it holds alone, to draw again.
    PairSeeker,
    /// Like a pair-seeker across many networks, but never releases (honest when alone).
    Ring,
    /// Honest for 500 verified units, then lies on everything.
    Sleeper,
    /// Takes as many units as it may, answers none, drops its connection and comes back.
    Hoarder,
    /// Answers every unit with its group's shared wrong answer, hoping to poison canaries.
    CanaryPoisoner,
}

impl Strategy {
    fn colludes(self) -> bool {
        matches!(
            self,
            Strategy::PairSeeker | Strategy::Ring | Strategy::CanaryPoisoner
        )
    }
}

struct SimWorker {
    identity: Identity,
    key: String,
    prefix: String,
    strategy: Strategy,
    /// Assignments it holds (heard of: committed), oldest first.
    held: Vec<Assignment>,
    /// Results sent whose verdict it has not heard yet.
    sent: HashSet<tabula_protocol::LeaseId>,
    /// Lies sent under this key.
    lies: u64,
    honest_done: u64,
    connected: bool,
    retired: bool,
    /// A replacement key acts only from this time on.
    rejoin_at: i64,
}

/// What a run measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub units: u64,
    pub wrong_delivered: u64,
    pub executions: u64,
    pub referee_runs: u64,
    pub bans: u64,
    pub lies_before_ban: Vec<u64>,
    pub lies_unbanned: u64,
    pub crashes: u64,
    /// Units delivered, worker executions and referee runs in the second half of the run
    /// (once workers have earned their standing): the steady state.
    pub steady_units: u64,
    pub steady_executions: u64,
    pub steady_referee_runs: u64,
}

impl Report {
    pub fn wrong_per_unit(&self) -> f64 {
        self.wrong_delivered as f64 / self.units.max(1) as f64
    }
    pub fn overhead(&self) -> f64 {
        (self.executions + self.referee_runs) as f64 / self.units.max(1) as f64
    }
    pub fn steady_overhead(&self) -> f64 {
        (self.steady_executions + self.steady_referee_runs) as f64 / self.steady_units.max(1) as f64
    }
    pub fn mean_lies_before_ban(&self) -> f64 {
        if self.lies_before_ban.is_empty() {
            return 0.0;
        }
        self.lies_before_ban.iter().sum::<u64>() as f64 / self.lies_before_ban.len() as f64
    }
}

pub struct Sim {
    config: Config,
    identity: Identity,
    metrics: Metrics,
    book: Book,
    /// The book at the last commit: what a restart would find.
    committed: Book,
    rng: Entropy,
    now: i64,
    workers: Vec<SimWorker>,
    /// Writes of the current step, committed at its end (or lost in a crash).
    pending: Vec<Write>,
    /// Messages to workers, delivered at commit: (worker index, what).
    outbox: Vec<(usize, Message)>,
    /// Every unit ever created: its digest, to judge what was delivered.
    digests: HashMap<String, Hash>,
    credits: HashSet<(String, String)>,
    /// Credits by worker, committed (what the database's `credits` would answer).
    credited_units: HashMap<String, Vec<String>>,
    jobs: u64,
    finished_jobs: HashSet<String>,
    /// Each job's units, for judging what was delivered.
    job_units: HashMap<String, Vec<String>>,
    /// Verified outputs, as committed (unit id → output hash).
    outputs: HashMap<String, String>,
    /// Units every group member holds (for colluders): digest → worker indexes.
    group_holdings: HashMap<Hash, Vec<usize>>,
    crash_rate: f64,
    steps: u64,
    report: Report,
    seed: u64,
    /// The assurance every job asks for.
    assurance: Assurance,
}

enum Message {
    Assigned(Assignment),
    Verdict(tabula_protocol::LeaseId),
}

fn task(n: u64) -> Task {
    Task::Embed {
        model: ModelRef {
            name: "all-MiniLM-L6-v2".into(),
            files: Vec::new(),
        },
        precision: Precision::Exact,
        sequences: vec![vec![
            101,
            (n % 30_000) as u32 + 1000,
            (n / 30_000) as u32 + 1,
            102,
        ]],
    }
}

/// The honest answer to a unit: a function of its digest.
fn truth(digest: &Hash) -> Vec<u8> {
    output(i32::from(digest.0[0]) + 1)
}

/// The colluders' shared wrong answer.
fn lie(digest: &Hash) -> Vec<u8> {
    output(-(i32::from(digest.0[1]) + 1))
}

impl Sim {
    /// `mix`: how many workers of each strategy; honest ones on distinct networks, each
    /// Byzantine group spread over networks of its own.
    pub fn new(seed: u64, config: Config, mix: &[(Strategy, usize)], crash_rate: f64) -> Self {
        let mut book = Book::default();
        book.seed(seed);
        let mut sim = Sim {
            committed: book.clone(),
            book,
            config,
            identity: Identity::from_seed([7; 32]),
            metrics: Metrics::default(),
            rng: Entropy::Seeded(seed ^ 0x5eed),
            now: 1_000_000,
            workers: Vec::new(),
            pending: Vec::new(),
            outbox: Vec::new(),
            digests: HashMap::new(),
            credits: HashSet::new(),
            credited_units: HashMap::new(),
            jobs: 0,
            finished_jobs: HashSet::new(),
            job_units: HashMap::new(),
            outputs: HashMap::new(),
            group_holdings: HashMap::new(),
            crash_rate,
            steps: 0,
            report: Report::default(),
            seed,
            assurance: Assurance::Standard,
        };
        for &(strategy, n) in mix {
            for _ in 0..n {
                sim.add_worker(strategy);
            }
        }
        sim.committed = sim.book.clone();
        sim
    }

    /// Every job from now on asks for `assurance`.
    pub fn with_assurance(mut self, assurance: Assurance) -> Self {
        self.assurance = assurance;
        self
    }

    fn add_worker(&mut self, strategy: Strategy) -> usize {
        let n = self.workers.len() as u64;
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&n.to_le_bytes());
        seed[16] = 1;
        let identity = Identity::from_seed(seed);
        let key = identity.public().to_hex();
        // Hoarders share one network, as a single attacker's machines would.
        let prefix = match strategy {
            Strategy::Hoarder => "hoard/24".to_string(),
            _ => format!("net-{n}"),
        };
        self.book.add_worker(&key, Default::default());
        self.workers.push(SimWorker {
            identity,
            key,
            prefix,
            strategy,
            held: Vec::new(),
            sent: HashSet::new(),
            lies: 0,
            honest_done: 0,
            connected: true,
            retired: false,
            rejoin_at: 0,
        });
        self.workers.len() - 1
    }

    fn decide<T>(&mut self, f: impl FnOnce(&mut Book, &Ctx) -> (T, Effects)) -> T {
        let ctx = Ctx::for_tests(&self.config, self.now, &self.identity, &self.metrics);
        let (value, effects) = f(&mut self.book, &ctx);
        self.pending.extend(effects.writes);
        for liar in effects.caught {
            self.audit_units_of(&liar);
        }
        value
    }

    /// What `load_for_audit` reads from the database: the units `liar` was credited for.
    fn audit_units_of(&mut self, liar: &str) {
        let ids: Vec<String> = self.credited_units.get(liar).cloned().unwrap_or_default();
        // Units evicted from memory come back as the database has them; the simulation keeps
        // them whole in memory instead (their leases are gone with them, so only units still
        // in memory can name partners: a conservative model).
        let loaded: Vec<Unit> = Vec::new();
        self.decide(|book, _| ((), book.add_for_audit(&ids, loaded, Vec::new())));
    }

    fn add_job(&mut self) {
        let job = format!("job{}", self.jobs);
        let mut ids = Vec::new();
        let units: Vec<Unit> = (0..UNITS_PER_JOB)
            .map(|i| {
                let n = self.jobs * u64::from(UNITS_PER_JOB) + u64::from(i);
                let id = format!("{job}-u{i}");
                let task = task(n);
                self.digests.insert(id.clone(), task.digest());
                ids.push(id.clone());
                Unit::new(
                    id,
                    job.clone(),
                    n as i64,
                    task,
                    1_000,
                    self.assurance,
                    &self.config,
                )
            })
            .collect();
        self.job_units.insert(job.clone(), ids);
        // Jobs are created in the database before the book hears of them.
        self.book.add_job(&job, units.clone());
        self.committed.add_job(&job, units);
        self.jobs += 1;
    }

    /// One step: workers act in a random order, leases expire, the referee works, then the
    /// step's writes commit (or the coordinator crashes and they are lost).
    fn step(&mut self, add_jobs: bool) {
        self.now += STEP_MS;
        // Requesters arrive on their own (open loop): a job every other step, about 80 % of
        // what the honest workers can verify, up to a bounded backlog. A unit held hostage
        // delays its job, not the arrival of others.
        self.steps += 1;
        if add_jobs && self.steps.is_multiple_of(2) && self.book_jobs() < MAX_BACKLOG_JOBS {
            self.add_job();
        }
        let mut order: Vec<usize> = (0..self.workers.len()).collect();
        for i in (1..order.len()).rev() {
            let j = self.rng.below(i + 1);
            order.swap(i, j);
        }
        for w in order {
            self.act(w, add_jobs);
        }
        self.decide(|book, ctx| ((), book.expire(ctx)));
        // The referee: a couple of units per step (the coordinator is one machine).
        for _ in 0..2 {
            let Some(job) = self.book.next_for_referee() else {
                break;
            };
            let digest = job.task.digest();
            let out = truth(&digest);
            let hash = tabula_protocol::sha256(&out).to_hex();
            self.report.referee_runs += 1;
            self.decide(|book, ctx| ((), book.judged(ctx, &job, out, hash).unwrap_or_default()));
        }
        if self.rng.unit() < self.crash_rate {
            self.crash();
        } else {
            self.commit();
        }
    }

    fn book_jobs(&self) -> usize {
        self.job_units.len() - self.finished_jobs.len()
    }

    fn crash(&mut self) {
        self.report.crashes += 1;
        self.book = self.committed.clone();
        self.pending.clear();
        self.outbox.clear();
        // Every connection drops with the process; workers log in again at once and keep the
        // units they heard of (a reconnecting worker still submits them).
        for w in &mut self.workers {
            w.sent.clear();
        }
    }

    fn commit(&mut self) {
        for write in std::mem::take(&mut self.pending) {
            match write {
                Write::Credit(c) => {
                    assert!(
                        self.credits.insert((c.worker.clone(), c.unit_id.clone())),
                        "seed {}: {} credited twice for {}",
                        self.seed,
                        c.worker,
                        c.unit_id
                    );
                    self.credited_units
                        .entry(c.worker)
                        .or_default()
                        .push(c.unit_id);
                }
                Write::Unit(u) => {
                    if let Some(hash) = u.output_hash {
                        self.outputs.insert(u.id, hash);
                    }
                }
                // Delivered now (once): judge every unit against the truth.
                Write::Job(j) if j.status == "done" && self.finished_jobs.insert(j.id.clone()) => {
                    for id in &self.job_units[&j.id] {
                        let digest = self.digests[id];
                        let right = tabula_protocol::sha256(&truth(&digest)).to_hex();
                        self.report.units += 1;
                        if self.outputs.get(id) != Some(&right) {
                            self.report.wrong_delivered += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        for (w, message) in std::mem::take(&mut self.outbox) {
            let worker = &mut self.workers[w];
            match message {
                Message::Assigned(a) => worker.held.push(a),
                Message::Verdict(lease) => {
                    worker.sent.remove(&lease);
                    worker.held.retain(|a| a.lease != lease);
                }
            }
        }
        self.committed = self.book.clone();
        self.book.check_invariants();
        self.check_safety();
    }

    fn check_safety(&mut self) {
        for w in &self.workers {
            let Some(r) = self.book.worker(&w.key) else {
                continue;
            };
            if w.strategy == Strategy::Honest {
                assert_eq!(
                    (r.strikes, r.banned),
                    (0, false),
                    "seed {}: an honest worker was struck",
                    self.seed
                );
            }
        }
    }

    fn act(&mut self, w: usize, byzantine_active: bool) {
        let strategy = self.workers[w].strategy;
        if self.workers[w].retired || self.now < self.workers[w].rejoin_at {
            return;
        }
        let banned = self
            .book
            .worker(&self.workers[w].key)
            .is_some_and(|r| r.banned);
        if banned {
            // Keys are free: a banned cheater comes back under a new one.
            let worker = &mut self.workers[w];
            worker.retired = true;
            self.report.bans += 1;
            self.report.lies_before_ban.push(worker.lies);
            if byzantine_active {
                // After a pause: a network may bring only so many new keys a minute.
                let n = self.add_worker(strategy);
                self.workers[n].prefix = self.workers[w].prefix.clone();
                self.workers[n].rejoin_at = self.now + REJOIN_MS;
            }
            return;
        }
        if strategy != Strategy::Honest && !byzantine_active {
            // The attack is over: cheaters leave (their leases are orphaned).
            let key = self.workers[w].key.clone();
            self.decide(|book, ctx| ((), book.orphan(ctx, &key)));
            self.workers[w].retired = true;
            return;
        }
        if strategy == Strategy::Hoarder {
            let worker = &mut self.workers[w];
            if !worker.connected {
                worker.connected = true;
                return;
            }
            if self.rng.unit() < 0.05 {
                let key = self.workers[w].key.clone();
                self.decide(|book, ctx| ((), book.orphan(ctx, &key)));
                let worker = &mut self.workers[w];
                worker.connected = false;
                worker.held.clear();
                return;
            }
            self.ask(w, 16);
            return;
        }
        // Everyone else: keep two units, answer the oldest one it has not answered yet.
        self.ask(w, 2);
        let next = self.workers[w]
            .held
            .iter()
            .find(|a| !self.workers[w].sent.contains(&a.lease))
            .cloned();
        if let Some(a) = next {
            self.answer(w, a);
        }
    }

    fn ask(&mut self, w: usize, want: usize) {
        let held = self.workers[w].held.len();
        if held >= want {
            return;
        }
        let (key, prefix) = (self.workers[w].key.clone(), self.workers[w].prefix.clone());
        let granted =
            self.decide(
                |book, ctx| match book.grant(ctx, &key, &prefix, &Takes::exact()) {
                    Some((a, e)) => (Some(a), e),
                    None => (None, Effects::default()),
                },
            );
        if let Some(a) = granted {
            self.outbox.push((w, Message::Assigned(a)));
        }
    }

    fn answer(&mut self, w: usize, a: Assignment) {
        let strategy = self.workers[w].strategy;
        let paired = strategy.colludes() && {
            let holders = self.group_holdings.entry(a.unit).or_default();
            if !holders.contains(&w) {
                holders.push(w);
            }
            holders.iter().any(|&o| {
                o != w
                    && self.workers[o].strategy == strategy
                    && !self.workers[o].retired
                    && self.workers[o].held.iter().any(|h| h.unit == a.unit)
            })
        };
        let lying = match strategy {
            Strategy::Honest | Strategy::Hoarder => false,
            Strategy::PairSeeker | Strategy::Ring => paired,
            Strategy::CanaryPoisoner => true,
            Strategy::Sleeper => self.workers[w].honest_done >= 500,
        };
        if strategy == Strategy::PairSeeker && !paired && self.rng.unit() < 0.5 {
            // Alone on it: give it back and draw again (half the time; the rest, honest).
            let key = self.workers[w].key.clone();
            self.decide(|book, ctx| ((), book.release(ctx, &key, &a.lease)));
            let worker = &mut self.workers[w];
            worker.held.retain(|h| h.lease != a.lease);
            return;
        }
        let out = if lying { lie(&a.unit) } else { truth(&a.unit) };
        let worker = &mut self.workers[w];
        if lying {
            worker.lies += 1;
        } else {
            worker.honest_done += 1;
        }
        self.report.executions += 1;
        // The signature is checked outside the book (here: valid by construction).
        let s: Submission = worker.identity.submission(a.lease, a.unit, out);
        worker.sent.insert(a.lease);
        let key = worker.key.clone();
        let verdict = self.decide(|book, ctx| match book.submit(ctx, &key, &s, Ok(())) {
            SubmitOutcome::Decided(v, e) => (Some(v), e),
            SubmitOutcome::NotInMemory => (None, Effects::default()),
        });
        // Accepted or not, the worker is done with it (a rejection already struck it).
        let _ = verdict;
        self.outbox.push((w, Message::Verdict(a.lease)));
    }

    /// Runs `steps` steps with work arriving, then lets the honest workers finish every job
    /// (at most `drain` more steps); panics if a unit never finishes.
    pub fn run(mut self, steps: usize, drain: usize) -> Report {
        for i in 0..steps {
            if i == steps / 2 {
                let r = &self.report;
                (
                    self.report.steady_units,
                    self.report.steady_executions,
                    self.report.steady_referee_runs,
                ) = (r.units, r.executions, r.referee_runs);
            }
            self.step(true);
        }
        let r = &self.report;
        (
            self.report.steady_units,
            self.report.steady_executions,
            self.report.steady_referee_runs,
        ) = (
            r.units - r.steady_units,
            r.executions - r.steady_executions,
            r.referee_runs - r.steady_referee_runs,
        );
        for _ in 0..drain {
            if self.book_jobs() == 0 {
                break;
            }
            self.step(false);
        }
        assert_eq!(
            self.book_jobs(),
            0,
            "seed {}: jobs unfinished after draining",
            self.seed
        );
        for w in &self.workers {
            if !w.retired && w.lies > 0 {
                self.report.lies_unbanned += w.lies;
            }
        }
        self.report
    }
}

/// The mix for `share` Byzantine workers among `n`: every strategy in equal parts.
pub fn mix(n: usize, share: f64) -> Vec<(Strategy, usize)> {
    let bad = (n as f64 * share).ceil() as usize;
    let per = bad / 5;
    let strategies = [
        Strategy::PairSeeker,
        Strategy::Ring,
        Strategy::Sleeper,
        Strategy::Hoarder,
        Strategy::CanaryPoisoner,
    ];
    let mut out = vec![(Strategy::Honest, n - bad)];
    for (i, s) in strategies.iter().enumerate() {
        out.push((*s, per + usize::from(i < bad % 5)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Runs `seeds` seeds at `share` Byzantine workers and adds up what they measured.
    pub fn measure(share: f64, seeds: u64, steps: usize, workers: usize) -> Report {
        measure_at(Assurance::Standard, share, seeds, steps, workers)
    }

    /// [`measure`] with every job at `assurance`.
    pub fn measure_at(
        assurance: Assurance,
        share: f64,
        seeds: u64,
        steps: usize,
        workers: usize,
    ) -> Report {
        let mut total = Report::default();
        for seed in 0..seeds {
            let crash_rate = env("TABULA_SIM_CRASH_PERCENT", 1) as f64 / 100.0;
            let sim = Sim::new(seed, Config::default(), &mix(workers, share), crash_rate)
                .with_assurance(assurance);
            let r = sim.run(steps, 20 * steps);
            total.units += r.units;
            total.wrong_delivered += r.wrong_delivered;
            total.executions += r.executions;
            total.referee_runs += r.referee_runs;
            total.bans += r.bans;
            total.lies_before_ban.extend(r.lies_before_ban);
            total.lies_unbanned += r.lies_unbanned;
            total.crashes += r.crashes;
            total.steady_units += r.steady_units;
            total.steady_executions += r.steady_executions;
            total.steady_referee_runs += r.steady_referee_runs;
        }
        total
    }

    /// The simulation's invariants (asserted inside, after every step) on a few seeds, at
    /// 0 %, 1 %, 10 % and 30 % Byzantine workers with crashes, and the targets with the
    /// default settings. `TABULA_SIM_SEEDS`, `TABULA_SIM_STEPS` and `TABULA_SIM_WORKERS` make
    /// it as long as you like; `TABULA_SIM_CRASH_PERCENT` (1) is the share of steps that end
    /// in a crash.
    #[test]
    fn simulation() {
        let seeds = env("TABULA_SIM_SEEDS", 2);
        let steps = env("TABULA_SIM_STEPS", 800) as usize;
        let workers = env("TABULA_SIM_WORKERS", 40) as usize;
        for share in [0.0, 0.01, 0.1, 0.3] {
            let total = measure(share, seeds, steps, workers);
            assert!(total.units > 0);
            println!(
                "byzantine {:>4.0}%: units {:>7}  wrong delivered {:.4}%  mean lies before ban {:>5.1} ({} bans, {} lies by keys never banned)  overhead {:.3}x (steady state {:.3}x)  referee {:.3}/unit  crashes {}",
                share * 100.0,
                total.units,
                total.wrong_per_unit() * 100.0,
                total.mean_lies_before_ban(),
                total.bans,
                total.lies_unbanned,
                total.overhead(),
                total.steady_overhead(),
                total.referee_runs as f64 / total.units as f64,
                total.crashes,
            );
            assert!(total.mean_lies_before_ban() <= 50.0);
            if share <= 0.1 {
                assert!(total.wrong_per_unit() <= 0.001, "{total:?}");
            }
        }
    }

    /// What each assurance level costs and buys, with and without cheaters: `high` never runs
    /// a unit alone and needs three agreeing workers; `referee` delivers only outputs the
    /// coordinator computed itself, so nothing wrong is ever delivered.
    #[test]
    fn assurance_levels() {
        let seeds = env("TABULA_SIM_SEEDS", 2);
        let steps = env("TABULA_SIM_STEPS", 800) as usize / 4;
        let workers = env("TABULA_SIM_WORKERS", 40) as usize;
        for share in [0.0, 0.1] {
            let mut overheads = Vec::new();
            for assurance in [Assurance::Standard, Assurance::High, Assurance::Referee] {
                let total = measure_at(assurance, share, seeds, steps, workers);
                println!(
                    "{:>8} at {:>2.0}% byzantine: units {:>6}  wrong delivered {:.4}%  worker executions {:.3}/unit  referee {:.3}/unit  overhead {:.3}x (steady state {:.3}x)",
                    assurance.as_str(),
                    share * 100.0,
                    total.units,
                    total.wrong_per_unit() * 100.0,
                    total.executions as f64 / total.units as f64,
                    total.referee_runs as f64 / total.units as f64,
                    total.overhead(),
                    total.steady_overhead(),
                );
                assert!(total.units > 0);
                match assurance {
                    Assurance::Referee => {
                        assert_eq!(total.wrong_delivered, 0, "{total:?}");
                        assert!(total.referee_runs >= total.units, "{total:?}");
                    }
                    Assurance::High => {
                        assert!(total.wrong_per_unit() <= 0.001, "{total:?}");
                        // Never alone: at least three workers' executions per unit.
                        assert!(total.executions >= 3 * total.units, "{total:?}");
                    }
                    Assurance::Standard => assert!(total.wrong_per_unit() <= 0.001, "{total:?}"),
                }
                overheads.push(total.steady_overhead());
            }
            assert!(
                overheads[0] < overheads[1] && overheads[0] < overheads[2],
                "a stronger level costs more: {overheads:?}"
            );
        }
    }
}
