//! Exploring seeds: a scenario run under many random fault plans, each on a
//! fresh current-thread runtime with tokio's clock paused, so every run is
//! instant and the same seed always gives the same run (feature
//! `simulation`).
//!
//! ```
//! use bus_core::{Connection, QueueOptions};
//! use bus_local::sim::Explorer;
//! use bus_local::FaultRates;
//!
//! let result = Explorer::new(FaultRates::mixed()).seeds(0..20).run(|broker| async move {
//!     let conn = broker.connect();
//!     // Retry what a fault may refuse: the scenario under test is a
//!     // service's code, which must do the same.
//!     loop {
//!         match conn.declare_queue("jobs", QueueOptions::durable()).await {
//!             Ok(_) => break,
//!             Err(e) if e.is_temporary() => continue,
//!             Err(e) => return Err(e.to_string()),
//!         }
//!     }
//!     Ok(())
//! });
//! assert!(result.is_ok());
//! ```
//!
//! When an invariant fails, [`Explorer::run`] returns the first failing
//! seed's [`Failure`]: the message, the trace of faults and deliveries, and
//! a command that replays that seed alone (`BUS_SIM_SEED=<seed>`).

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use crate::{FaultPlan, FaultRates, LocalBroker, Trace};

/// The environment variable that restricts [`Explorer::run`] to one seed.
pub const SEED_VAR: &str = "BUS_SIM_SEED";

/// Runs a scenario under many seeds.
#[derive(Clone, Debug)]
pub struct Explorer {
    rates: FaultRates,
    seeds: Range<u64>,
    time_limit: Duration,
    max_faults: Option<u64>,
    reconnect_delay: Option<Duration>,
}

/// What a run of every seed found when no invariant failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explored {
    /// How many seeds ran.
    pub runs: u64,
    /// Faults injected over all runs.
    pub faults: u64,
}

/// The first seed whose run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What failed: the scenario's error, its panic message, or that it
    /// did not finish within the time limit (on the paused clock).
    pub message: String,
    /// The broker's trace of that run.
    pub trace: Trace,
    /// A shell command that replays this seed alone.
    pub replay: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {} failed: {}", self.seed, self.message)?;
        writeln!(f, "replay: {}", self.replay)?;
        writeln!(f, "trace of seed {}:", self.seed)?;
        write!(f, "{}", self.trace)
    }
}

impl std::error::Error for Failure {}

impl Explorer {
    /// Seeds 0 to 999, faults at `rates`, at most one hour of (paused)
    /// tokio time per run.
    #[must_use]
    pub fn new(rates: FaultRates) -> Self {
        Explorer {
            rates,
            seeds: 0..1000,
            time_limit: Duration::from_secs(3600),
            max_faults: None,
            reconnect_delay: None,
        }
    }

    /// The seeds to run.
    #[must_use]
    pub fn seeds(mut self, seeds: Range<u64>) -> Self {
        self.seeds = seeds;
        self
    }

    /// How much tokio time a run may take before it counts as hung (a
    /// scenario waiting for a message that was lost). Under the paused
    /// clock this costs no real time.
    #[must_use]
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = limit;
        self
    }

    /// At most this many random faults per run ([`FaultPlan::max_faults`]).
    #[must_use]
    pub fn max_faults(mut self, n: u64) -> Self {
        self.max_faults = Some(n);
        self
    }

    /// The reconnection delay of every run ([`FaultPlan::reconnect_after`]).
    #[must_use]
    pub fn reconnect_after(mut self, delay: Duration) -> Self {
        self.reconnect_delay = Some(delay);
        self
    }

    /// The plan a seed runs under.
    #[must_use]
    pub fn plan(&self, seed: u64) -> FaultPlan {
        let mut plan = FaultPlan::random(seed, self.rates.clone());
        if let Some(n) = self.max_faults {
            plan = plan.max_faults(n);
        }
        if let Some(d) = self.reconnect_delay {
            plan = plan.reconnect_after(d);
        }
        plan
    }

    /// Runs `scenario` once per seed (only the seed of `BUS_SIM_SEED` when
    /// that is set), each time on a new broker with that seed's plan, on a
    /// new current-thread runtime whose clock is paused. The scenario
    /// returns `Err` (or panics) when an invariant of the user's fails.
    ///
    /// # Errors
    /// The [`Failure`] of the first seed that failed.
    pub fn run<F, Fut>(&self, scenario: F) -> Result<Explored, Failure>
    where
        F: Fn(LocalBroker) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let seeds = match std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()) {
            Some(seed) => seed..seed + 1,
            None => self.seeds.clone(),
        };
        let mut explored = Explored { runs: 0, faults: 0 };
        for seed in seeds {
            let (outcome, trace) = self.run_seed(seed, &scenario);
            explored.runs += 1;
            explored.faults += trace.faults().count() as u64;
            if let Err(message) = outcome {
                return Err(Failure {
                    seed,
                    message,
                    trace,
                    replay: replay_command(seed),
                });
            }
        }
        Ok(explored)
    }

    /// Runs one seed and returns its trace, or its [`Failure`]: what a
    /// replay does, for a test to check that a failure reproduces.
    ///
    /// # Errors
    /// The seed's [`Failure`].
    pub fn replay<F, Fut>(&self, seed: u64, scenario: F) -> Result<Trace, Failure>
    where
        F: Fn(LocalBroker) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        match self.run_seed(seed, &scenario) {
            (Ok(()), trace) => Ok(trace),
            (Err(message), trace) => Err(Failure {
                seed,
                message,
                trace,
                replay: replay_command(seed),
            }),
        }
    }

    fn run_seed<F, Fut>(&self, seed: u64, scenario: &F) -> (Result<(), String>, Trace)
    where
        F: Fn(LocalBroker) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                return (
                    Err(format!("cannot build a runtime: {e}")),
                    Trace::default(),
                )
            }
        };
        let limit = self.time_limit;
        let plan = self.plan(seed);
        let (outcome, broker) = runtime.block_on(async move {
            let broker = LocalBroker::with_faults(plan);
            let run = AssertUnwindSafe(scenario(broker.clone())).catch_unwind();
            let outcome = match tokio::time::timeout(limit, run).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(panic_message(panic.as_ref())),
                Err(_) => Err(format!(
                    "the scenario did not finish within {limit:?} of tokio time (something it \
                     waits for never happens)"
                )),
            };
            (outcome, broker)
        });
        // Dropping the runtime ends whatever the scenario left running.
        drop(runtime);
        (outcome, broker.trace())
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("panicked: {text}")
}

/// The command that replays `seed`: the current test (libtest names each
/// test's thread after it) with `BUS_SIM_SEED` set.
fn replay_command(seed: u64) -> String {
    match std::thread::current().name() {
        Some(test) if test != "main" => {
            format!("{SEED_VAR}={seed} cargo test --all-features {test} -- --exact --nocapture")
        }
        _ => format!("{SEED_VAR}={seed} <the same command>"),
    }
}
