//! The per-connection background pass: takes back the claims of dead
//! connections (whose owner lock can be acquired: the owner is certainly
//! gone) and expires messages whose TTL has passed.

use std::sync::Weak;
use std::time::Duration;

use bus_core::engine::dead_letter::Reason;
use bus_core::engine::policy;
use bus_core::QueueArguments;
use tokio::time::Instant;

use crate::connection::Inner;
use crate::consumer::Claim;
use crate::fsys::{self, FileLock};
use crate::layout;
use crate::names;

/// Runs until the connection closes.
pub(crate) async fn run(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if !inner.is_open() {
            return;
        }
        // The pass's file work runs on the blocking pool.
        let i = inner.clone();
        let due = tokio::task::spawn_blocking(move || {
            reap_dead_owners(&i);
            claim_expired(&i)
        })
        .await;
        let next = match due {
            Ok((claims, next)) => {
                for (queue, args, claim) in claims {
                    if let Err(e) = inner
                        .dead_letter_or_drop(&queue, &args, &claim, Reason::Expired)
                        .await
                    {
                        tracing::warn!(queue, error = %e, "dead-lettering an expired message failed");
                    }
                }
                next
            }
            Err(e) => {
                tracing::warn!(error = %e, "janitor pass failed");
                None
            }
        };
        let interval = inner.options.rescan_interval;
        let wait = next.map_or(interval, |d| d.min(interval));
        // A publish with a TTL wakes this pass early (a stored permit if it
        // lands before the wait starts), so expiry does not lag a rescan.
        tokio::select! {
            _ = inner.janitor_wake.notified() => {}
            _ = tokio::time::sleep_until(Instant::now() + wait) => {}
        }
    }
}

/// Claims every expired ready message, for the caller to dead-letter (or
/// drop); also returns how long until the next one expires.
type Expired = Vec<(String, QueueArguments, Claim)>;

fn claim_expired(inner: &Inner) -> (Expired, Option<Duration>) {
    let mut claims = Vec::new();
    let Ok(snap) = inner.snapshot() else {
        return (claims, None);
    };
    let now = names::now_ms().max(0) as u64;
    let mut next: Option<u64> = None;
    for (queue, rec) in &snap.topo.queues {
        let Ok(listed) = inner.layout.list_messages(&inner.layout.ready(queue)) else {
            continue;
        };
        let mut due: Vec<_> = listed
            .into_iter()
            .filter(|(_, m)| match m.expires_at_ms {
                Some(e) if policy::is_expired(e, now) => true,
                Some(e) => {
                    next = Some(next.map_or(e, |n| n.min(e)));
                    false
                }
                None => false,
            })
            .collect();
        if due.is_empty() {
            continue;
        }
        due.sort_by(|a, b| a.0.cmp(&b.0));
        let args = QueueArguments::from_table(&rec.arguments).unwrap_or_default();
        for claim in inner.claim_files(queue, due).unwrap_or_default() {
            claims.push((queue.clone(), args.clone(), claim));
        }
    }
    (
        claims,
        next.map(|e| Duration::from_millis(e.saturating_sub(now))),
    )
}

/// Finds connections that died (their lock can be taken) and gives their
/// claims back; also finishes the work of a reaper that died half-way
/// (claim folders whose owner has no lock file).
pub(crate) fn reap_dead_owners(inner: &Inner) {
    let fs = &inner.layout.fs;
    for file in inner
        .layout
        .list_names(&inner.layout.owners())
        .unwrap_or_default()
    {
        if file.starts_with('.') {
            continue;
        }
        let Some(owner) = file.strip_suffix(".lock").filter(|o| names::is_owner_id(o)) else {
            continue;
        };
        if owner == inner.owner {
            continue;
        }
        let path = inner.layout.owner_lock(owner);
        if let Ok(Some(lock)) = FileLock::try_lock(fs, &path) {
            tracing::info!(owner, "a connection died; taking back its claims");
            release_owner(inner, owner);
            // Removed while still locked, so nobody can mistake a fresh
            // lock on the same name for a live owner.
            let _ = fs.remove_file(&path);
            drop(lock);
        }
    }
    for queue in layout::list_queue_dirs(&inner.layout) {
        for owner in inner
            .layout
            .list_names(&inner.layout.claims(&queue))
            .unwrap_or_default()
        {
            if !names::is_owner_id(&owner) {
                tracing::warn!(
                    queue,
                    owner,
                    "ignoring a claim folder with an invalid owner name"
                );
                continue;
            }
            if owner != inner.owner && !fs.exists(&inner.layout.owner_lock(&owner)) {
                requeue_claims(inner, &queue, &owner);
            }
        }
        for f in inner
            .layout
            .list_names(&inner.layout.consumers(&queue))
            .unwrap_or_default()
        {
            let Some((owner, _)) = names::consumer_file_owner(&f) else {
                continue;
            };
            if owner != inner.owner && !fs.exists(&inner.layout.owner_lock(owner)) {
                let _ = fs.remove_file(&inner.layout.consumers(&queue).join(&f));
                inner.consumer_left(&queue);
            }
        }
    }
    // Exclusive queues of dead owners go with them.
    if let Ok(snap) = inner.snapshot() {
        let orphans: Vec<String> = snap
            .topo
            .queues
            .iter()
            .filter(|(_, q)| {
                q.exclusive_owner
                    .as_deref()
                    .is_some_and(|o| !inner.owner_alive(o))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for q in orphans {
            let removed = inner.modify(|t| {
                let dead = t
                    .queues
                    .get(&q)
                    .and_then(|r| r.exclusive_owner.as_deref())
                    .is_some_and(|o| !inner.owner_alive(o));
                if dead {
                    t.remove_queue(&q);
                    inner.layout.remove_queue_dir(&q)?;
                }
                Ok((dead, dead))
            });
            if let Ok(true) = removed {
                inner.queue_gone(&q);
            }
        }
    }
}

/// Gives back everything `owner` held: its claims (marked redelivered),
/// its consumer registrations and its temporary files.
pub(crate) fn release_owner(inner: &Inner, owner: &str) {
    for queue in layout::list_queue_dirs(&inner.layout) {
        requeue_claims(inner, &queue, owner);
        let consumers = inner.layout.consumers(&queue);
        let mut left = false;
        for f in inner.layout.list_names(&consumers).unwrap_or_default() {
            if names::consumer_file_owner(&f).is_some_and(|(o, _)| o == owner) {
                let _ = inner.layout.fs.remove_file(&consumers.join(&f));
                left = true;
            }
        }
        if left && owner != inner.owner {
            inner.consumer_left(&queue);
        }
    }
    let prefix = format!("{owner}.");
    for f in inner
        .layout
        .list_names(&inner.layout.tmp())
        .unwrap_or_default()
    {
        if f.starts_with(&prefix) {
            let _ = inner.layout.fs.remove_file(&inner.layout.tmp().join(f));
        }
    }
}

fn requeue_claims(inner: &Inner, queue: &str, owner: &str) {
    let dir = inner.layout.claim_dir(queue, owner);
    let ready = inner.layout.ready(queue);
    let fs = &inner.layout.fs;
    for (file, name) in inner.layout.list_messages(&dir).unwrap_or_default() {
        let back = name.redelivered().file_name();
        match fs.rename(&dir.join(&file), &ready.join(&back)) {
            Ok(()) => inner.announce(queue, &back),
            Err(e) if fsys::is_not_found(&e) => {}
            Err(e) => tracing::warn!(queue, owner, error = %e, "could not take back a claim"),
        }
    }
    let _ = fs.remove_dir(&dir);
}
