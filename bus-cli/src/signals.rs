//! SIGINT and SIGTERM as a stop request, and progress on a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A stop request, set on the first SIGINT or SIGTERM. Long-running verbs
/// check it between messages: the message in hand is finished first.
#[derive(Clone, Debug)]
pub struct Stop {
    rx: watch::Receiver<bool>,
}

impl Stop {
    /// Installs the signal handlers.
    pub fn install() -> std::io::Result<Stop> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(true);
        });
        Ok(Stop { rx })
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once a stop is requested.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Progress lines on stderr, only when stderr is a terminal (or when asked
/// with an explicit interval), at most once per interval.
#[derive(Debug)]
pub struct Progress {
    every: Option<Duration>,
    started: Instant,
    last: Instant,
}

impl Progress {
    /// Progress every second on a terminal, or every `explicit` interval
    /// whatever stderr is.
    pub fn new(explicit: Option<Duration>) -> Self {
        let every = explicit.or_else(|| {
            std::io::stderr()
                .is_terminal()
                .then_some(Duration::from_secs(1))
        });
        let now = Instant::now();
        Progress {
            every,
            started: now,
            last: now,
        }
    }

    /// The interval between lines, if any are printed.
    pub fn interval(&self) -> Option<Duration> {
        self.every
    }

    /// Prints `line()` if an interval has passed since the last one.
    pub fn tick(&mut self, line: impl FnOnce(Duration) -> String) {
        if let Some(every) = self.every {
            if self.last.elapsed() >= every {
                self.last = Instant::now();
                eprintln!("{}", line(self.started.elapsed()));
            }
        }
    }
}

/// Messages per second.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}
