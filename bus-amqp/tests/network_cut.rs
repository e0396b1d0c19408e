//! Recovery across a real network cut, without root: the transport talks to
//! RabbitMQ through a TCP proxy run by the test, which can pass bytes, go
//! silent (sockets stay open, nothing gets through either way: only the
//! heartbeat can tell) or reset every connection. Each test is bounded in
//! time and asserts that nothing is lost and nothing is reported done that
//! was not.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_amqp::{AmqpConnection, AmqpOptions, AmqpUrl, BrokerHost, ReconnectPolicy, RecoveryEvent};
use bus_core::rpc::{RpcClient, RpcClientOptions, RpcServer};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Delivery, Error, Message, QueueOptions};
use futures::StreamExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Heartbeat of the connections through the proxy: a silent network is
/// noticed after about two of these.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Bound of each whole test.
const TEST_SECS: u64 = 90;

// ---------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------

/// What the network between the client and the broker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Bytes go through both ways.
    Pass,
    /// Sockets stay open but no byte goes through either way; bytes sent
    /// meanwhile are held, as TCP would deliver them late, not lost. New
    /// connections are accepted and wait for the network too.
    Blackhole,
    /// Every current connection is reset (RST on both sides) and so is
    /// every new one until the mode changes.
    Reset,
}

#[derive(Clone, Copy, Debug)]
struct ProxyState {
    mode: Mode,
    /// Bumped by each switch to `Reset`: connections born under an older
    /// value are cut.
    resets: u64,
    /// Switch to `Reset` when the next bytes from a client arrive, and drop
    /// them: whatever they carry was sent and can never be answered.
    reset_at_next_client_bytes: bool,
}

impl ProxyState {
    fn switch(&mut self, mode: Mode) {
        self.mode = mode;
        if mode == Mode::Reset {
            self.resets += 1;
            self.reset_at_next_client_bytes = false;
        }
    }
}

/// A TCP proxy on 127.0.0.1 to the broker of `AMQP_ADDR`.
struct Proxy {
    port: u16,
    url: AmqpUrl,
    state: Arc<watch::Sender<ProxyState>>,
    accepting: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Dropping the accept task's JoinSet aborts every relay with it.
        self.accepting.abort();
    }
}

impl Proxy {
    async fn start() -> Proxy {
        let url = AmqpUrl::parse(&amqp_addr()).expect("AMQP_ADDR is a valid AMQP URL");
        let broker = url.hosts[0].clone();
        Self::start_to(broker, url).await
    }

    /// A proxy to `target`; `url` is what [`Proxy::connect`] connects with.
    async fn start_to(target: BrokerHost, url: AmqpUrl) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, _) = watch::channel(ProxyState {
            mode: Mode::Pass,
            resets: 0,
            reset_at_next_client_bytes: false,
        });
        let state = Arc::new(state);
        let accepting = tokio::spawn(accept(listener, target, state.clone()));
        Proxy {
            port,
            url,
            state,
            accepting,
        }
    }

    fn set(&self, mode: Mode) {
        self.state.send_modify(|s| s.switch(mode));
    }

    /// Resets every connection (and refuses new ones, as `Reset` does) at
    /// the moment a client next sends something, which is lost: a cut that
    /// surely catches requests in flight.
    fn reset_at_next_client_bytes(&self) {
        self.state
            .send_modify(|s| s.reset_at_next_client_bytes = true);
    }

    /// A transport connection through the proxy, with a short heartbeat and
    /// a fast backoff.
    async fn connect(&self, name: &str) -> Arc<AmqpConnection> {
        let mut url = self.url.clone();
        url.hosts = vec![BrokerHost::new("127.0.0.1", self.port)];
        // The options below must be the ones in force, whatever AMQP_ADDR says.
        url.heartbeat = None;
        url.connection_timeout = None;
        let options = AmqpOptions::default()
            .with_connection_name(name)
            .with_heartbeat(HEARTBEAT)
            .with_connect_timeout(Duration::from_secs(2))
            .with_recovery_wait(Duration::from_secs(5))
            .with_reconnect(ReconnectPolicy {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(500),
                max_attempts: None,
            });
        match AmqpConnection::connect_url(url, options).await {
            Ok(c) => Arc::new(c),
            Err(e) => panic!(
                "RabbitMQ is not reachable through the proxy to {} ({e}); start it (rabbitmq-server -detached) or set AMQP_ADDR",
                bus_amqp::redact_url(&amqp_addr())
            ),
        }
    }
}

async fn accept(listener: TcpListener, broker: BrokerHost, state: Arc<watch::Sender<ProxyState>>) {
    let mut relays = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        while relays.try_join_next().is_some() {}
        relays.spawn(relay(client, broker.clone(), state.clone()));
    }
}

/// Makes the next close of this socket a reset rather than an orderly end.
fn reset_on_close(socket: &TcpStream) {
    let _ = socket.set_zero_linger();
}

/// Resolves once the connection born under `born` is to be cut (or the
/// proxy is gone).
async fn cut(mut state: watch::Receiver<ProxyState>, born: u64) {
    let _ = state.wait_for(|s| s.resets != born).await;
}

async fn relay(client: TcpStream, broker: BrokerHost, switch: Arc<watch::Sender<ProxyState>>) {
    let mut state = switch.subscribe();
    let born = {
        let s = *state.borrow_and_update();
        if s.mode == Mode::Reset {
            reset_on_close(&client);
            return;
        }
        s.resets
    };
    // Reaching the broker needs the network as well.
    let network_back = state
        .wait_for(|s| s.mode == Mode::Pass || s.resets != born)
        .await
        .map(|s| s.resets == born)
        .unwrap_or(false);
    if !network_back {
        reset_on_close(&client);
        return;
    }
    let upstream = match TcpStream::connect((broker.host.as_str(), broker.port)).await {
        Ok(s) => s,
        Err(_) => {
            reset_on_close(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = upstream.into_split();
    let was_cut = tokio::select! {
        _ = async {
            tokio::try_join!(
                pump(&mut client_rx, &mut broker_tx, state.clone(), Some(&switch)),
                pump(&mut broker_rx, &mut client_tx, state.clone(), None),
            )
        } => false,
        () = cut(state.clone(), born) => true,
    };
    if was_cut {
        reset_on_close(client_rx.as_ref());
        reset_on_close(broker_rx.as_ref());
        // Dropping a write half would send FIN first: the peers must see
        // the reset and nothing else.
        client_tx.forget();
        broker_tx.forget();
    }
}

/// Copies one direction, holding what it read while the network is silent.
/// `switch` is given for the client-to-broker direction.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut state: watch::Receiver<ProxyState>,
    switch: Option<&watch::Sender<ProxyState>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // The peer of the other side may already be gone: nothing to do.
            let _ = to.shutdown().await;
            return Ok(());
        }
        if let Some(switch) = switch {
            if switch.borrow().reset_at_next_client_bytes {
                switch.send_modify(|s| s.switch(Mode::Reset));
                // The cut arrives (the relay resets both sides) while this
                // chunk is dropped.
                std::future::pending::<()>().await;
            }
        }
        if state.wait_for(|s| s.mode == Mode::Pass).await.is_err() {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Messages in `queue` as the broker counts them: ready plus delivered but
/// not yet acknowledged.
async fn messages_in(queue: &str) -> u64 {
    let queue = queue.to_owned();
    let vhost = vhost();
    tokio::task::spawn_blocking(move || {
        let out = rabbitmqctl(&[
            "list_queues",
            "-p",
            &vhost,
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ]);
        out.lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, n)| n.trim().parse().expect("a message count"))
            .unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl"))
    })
    .await
    .unwrap()
}

/// Publishes `range` persistently to `queue` with confirms on a connection
/// that never sees the cut: every publish must succeed.
fn publish_batch(
    conn: Arc<AmqpConnection>,
    queue: String,
    range: Range<u32>,
) -> JoinHandle<Result<(), (u32, Error)>> {
    tokio::spawn(async move {
        let results: Vec<(u32, bus_core::Result<()>)> = futures::stream::iter(range)
            .map(|i| {
                let conn = conn.clone();
                let queue = queue.clone();
                async move {
                    let r = conn
                        .send_to_queue(&queue, Message::new(i.to_string()).persistent())
                        .await;
                    (i, r)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (i, r) in results {
            r.map_err(|e| (i, e))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 1. A silent network mid-stream
// ---------------------------------------------------------------------------

/// What the stream consumer has seen, per message number.
#[derive(Default)]
struct Seen {
    times: BTreeMap<u32, u32>,
    redelivered: u32,
    lost_acks: u32,
}

impl Seen {
    /// Records a delivery and acknowledges it.
    async fn take(&mut self, d: Delivery) {
        let n = number(&d.message);
        let times = self.times.entry(n).or_default();
        *times += 1;
        // A message seen again was requeued by the broker and says so.
        assert!(
            *times == 1 || d.redelivered,
            "message {n} delivered {times} times, the last without redelivered"
        );
        if d.redelivered {
            self.redelivered += 1;
        }
        match d.ack().await {
            Ok(()) => {}
            // A delivery of the channel that died with the link: the broker
            // requeued it and delivers it again.
            Err(Error::Closed(_)) => self.lost_acks += 1,
            Err(e) => panic!("ack of message {n} failed: {e}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Streaming,
    Silent,
    Reconnecting,
    Recovered,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_mid_stream_is_noticed_by_heartbeats_and_loses_no_message() {
    const BATCH: u32 = 300;
    const TOTAL: u32 = 3 * BATCH;
    let direct = connect().await;
    let q = fresh("cut-stream");
    let _cleanup = QueueCleanup::new(&[&q]);
    within(TEST_SECS, "the whole test", async {
        let proxy = Proxy::start().await;
        direct
            .declare_queue(&q, QueueOptions::durable())
            .await
            .unwrap();
        let conn = proxy.connect(&fresh("cut-consumer")).await;
        let mut events = conn.events();
        let mut consumer = conn
            .consume(&q, ConsumeOptions::prefetch(10))
            .await
            .unwrap();

        // Batch 0 before the cut, 1 while the network is silent, 2 after the
        // reconnection; all from a connection that does not go through the
        // proxy.
        let mut batches = vec![publish_batch(direct.clone(), q.clone(), 0..BATCH)];
        let mut seen = Seen::default();
        let mut phase = Phase::Streaming;
        let mut silent_since = Instant::now();
        let mut noticed_after = Duration::ZERO;
        let mut after_recovery = 0u32;
        let mut generation_before = 0;
        let mut disconnect_reason = String::new();
        while phase != Phase::Recovered || seen.times.len() < TOTAL as usize {
            tokio::select! {
                item = consumer.next() => {
                    let d = item
                        .expect("the consumer stream ended")
                        .expect("the consumer stream of a durable queue yields no error");
                    seen.take(d).await;
                    match phase {
                        Phase::Streaming if seen.times.len() >= (BATCH / 2) as usize => {
                            generation_before = conn.generation();
                            proxy.set(Mode::Blackhole);
                            silent_since = Instant::now();
                            phase = Phase::Silent;
                            batches.push(publish_batch(direct.clone(), q.clone(), BATCH..2 * BATCH));
                        }
                        Phase::Recovered => after_recovery += 1,
                        _ => {}
                    }
                }
                event = events.recv() => {
                    match (phase, event.expect("the recovery events")) {
                        (Phase::Silent, RecoveryEvent::Disconnected { reason }) => {
                            assert!(
                                reason.contains("heartbeat"),
                                "a silence was reported without naming the heartbeat: {reason}"
                            );
                            disconnect_reason = reason;
                            noticed_after = silent_since.elapsed();
                            proxy.set(Mode::Pass);
                            phase = Phase::Reconnecting;
                        }
                        (Phase::Reconnecting, RecoveryEvent::Reconnected { generation, .. }) => {
                            assert_eq!(generation, generation_before + 1);
                            phase = Phase::Recovered;
                            batches.push(publish_batch(direct.clone(), q.clone(), 2 * BATCH..TOTAL));
                        }
                        (_, RecoveryEvent::GaveUp { reason }) => panic!("recovery gave up: {reason}"),
                        _ => {}
                    }
                }
            }
        }
        for batch in batches {
            if let Err((i, e)) = batch.await.unwrap() {
                panic!("publishing message {i} on the direct connection failed: {e}");
            }
        }
        // Every message was received; now every one must be settled: what
        // the broker counts (ready or unacknowledged) drains to zero while
        // the consumer goes on (acks that were sent into the silence may
        // have been lost, and those messages come again).
        let mut count = Box::pin(messages_in(&q));
        loop {
            tokio::select! {
                item = consumer.next() => {
                    let d = item.expect("the consumer stream ended").unwrap();
                    seen.take(d).await;
                }
                left = &mut count => {
                    if left == 0 {
                        break;
                    }
                    count = Box::pin(messages_in(&q));
                }
            }
        }
        assert_eq!(
            seen.times.keys().copied().collect::<Vec<_>>(),
            (0..TOTAL).collect::<Vec<_>>(),
            "every published message was received"
        );
        assert!(after_recovery > 0, "the stream went on after the reconnection");
        // Sockets stayed open and nothing got through: only the heartbeat
        // could tell, after two intervals of silence.
        assert!(
            noticed_after >= HEARTBEAT && noticed_after < HEARTBEAT * 8,
            "the silence took {noticed_after:?} to notice with a {HEARTBEAT:?} heartbeat"
        );
        assert_eq!(direct.inspect_queue(&q).await.unwrap().message_count, 0);
        eprintln!(
            "silence noticed after {noticed_after:?} ({disconnect_reason}); {} deliveries for {TOTAL} messages, {} redelivered, {} acks lost with the link",
            seen.times.values().sum::<u32>(),
            seen.redelivered,
            seen.lost_acks
        );
        drop(consumer);
        conn.close().await.unwrap();
        delete_queue(&*direct, &q).await;
    })
    .await;
    direct.close().await.unwrap();
}

/// A silent network is noticed by the heartbeat, and
/// `RecoveryEvent::Disconnected` says so every time, even when the
/// supervisor finds the link down through a poke (the consumer's end) or
/// its periodic check before it takes lapin's error event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disconnect_reason_of_a_silent_network_names_the_heartbeat() {
    const SILENCES: usize = 6;
    let direct = connect().await;
    let q = fresh("cut-reason");
    let _cleanup = QueueCleanup::new(&[&q]);
    within(TEST_SECS, "the whole test", async {
        let proxy = Proxy::start().await;
        direct
            .declare_queue(&q, QueueOptions::default())
            .await
            .unwrap();
        let conn = proxy.connect(&fresh("cut-reason")).await;
        let mut events = conn.events();
        // A consumer, as any service has: its end pokes the supervisor.
        let consumer = conn
            .consume(&q, ConsumeOptions::prefetch(10))
            .await
            .unwrap();
        let mut reasons = Vec::new();
        for _ in 0..SILENCES {
            proxy.set(Mode::Blackhole);
            let RecoveryEvent::Disconnected { reason } =
                wait_event(&mut events, "Disconnected", |e| {
                    matches!(e, RecoveryEvent::Disconnected { .. })
                })
                .await
            else {
                unreachable!()
            };
            reasons.push(reason);
            proxy.set(Mode::Pass);
            wait_consumer_resumed(&mut events).await;
        }
        drop(consumer);
        conn.close().await.unwrap();
        delete_queue(&*direct, &q).await;
        let vague: Vec<_> = reasons
            .iter()
            .filter(|r| !r.contains("heartbeat"))
            .collect();
        assert!(
            vague.is_empty(),
            "{} of {SILENCES} silences were reported without naming the heartbeat: {vague:?}",
            vague.len()
        );
    })
    .await;
    direct.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// 2. A cut while publishing with confirms
// ---------------------------------------------------------------------------

/// Publishes with confirms through the proxy while it cuts the link:
/// every publish is confirmed (and then in the queue) or fails with a
/// temporary error.
async fn publishing_across_a_cut(cut_with: Mode) {
    const MAX: u32 = 100_000;
    let direct = connect().await;
    let q = fresh("cut-confirms");
    let _cleanup = QueueCleanup::new(&[&q]);
    within(TEST_SECS, "the whole test", async {
        let proxy = Proxy::start().await;
        direct
            .declare_queue(&q, QueueOptions::durable())
            .await
            .unwrap();
        let conn = proxy.connect(&fresh("cut-publisher")).await;
        let mut events = conn.events();

        let CountingPublisher {
            outcomes: publishing,
            mut confirms,
            stop,
        } = publish_counting_confirms(conn.clone(), q.clone(), MAX, 16);
        confirms.wait_for(|n| *n >= 300).await.unwrap();
        if cut_with == Mode::Reset {
            proxy.reset_at_next_client_bytes();
        } else {
            proxy.set(cut_with);
        }
        wait_disconnected(&mut events).await;
        if cut_with == Mode::Reset {
            // The network refuses for a while: at least one attempt fails.
            wait_event(&mut events, "ReconnectFailed", |e| {
                matches!(e, RecoveryEvent::ReconnectFailed { .. })
            })
            .await;
        }
        proxy.set(Mode::Pass);
        wait_reconnected(&mut events).await;
        let more = *confirms.borrow() + 300;
        confirms.wait_for(|n| *n >= more).await.unwrap();
        stop.store(true, Ordering::Relaxed);
        let outcomes = publishing.await.unwrap();

        let attempted: BTreeSet<u32> = outcomes.iter().map(|(i, _)| *i).collect();
        let mut confirmed = BTreeSet::new();
        let mut failed = 0usize;
        for (i, r) in &outcomes {
            match r {
                Ok(()) => {
                    confirmed.insert(*i);
                }
                Err(e) => {
                    failed += 1;
                    assert!(
                        e.is_temporary(),
                        "message {i} failed with a permanent error: {e}"
                    );
                }
            }
        }
        // What the queue holds, read on the direct connection.
        let total = direct.inspect_queue(&q).await.unwrap().message_count;
        let mut reader = direct
            .consume(&q, ConsumeOptions::prefetch(200))
            .await
            .unwrap();
        let mut found: BTreeMap<u32, u32> = BTreeMap::new();
        for _ in 0..total {
            let d = reader.next().await.unwrap().unwrap();
            *found.entry(number(&d.message)).or_default() += 1;
            d.ack().await.unwrap();
        }
        drop(reader);
        assert!(
            found.values().all(|n| *n == 1),
            "a message published once is in the queue twice"
        );
        let found: BTreeSet<u32> = found.into_keys().collect();
        let missing: Vec<_> = confirmed.difference(&found).collect();
        assert!(
            missing.is_empty(),
            "confirmed but not in the queue: {missing:?}"
        );
        assert!(
            found.is_subset(&attempted),
            "the queue holds messages never published"
        );
        assert!(confirmed.len() <= found.len() && found.len() <= attempted.len());
        assert!(failed > 0, "the cut failed no publish in flight");
        // How they failed: the notes on network cuts discuss these.
        let mut kinds = BTreeMap::<String, usize>::new();
        for (_, r) in &outcomes {
            if let Err(e) = r {
                let text = e.to_string();
                *kinds.entry(text.chars().take(120).collect()).or_default() += 1;
            }
        }
        eprintln!("{cut_with:?}: failures by kind: {kinds:#?}");
        eprintln!(
            "{cut_with:?}: {} attempted, {} confirmed, {failed} failed (temporary), {} in the queue",
            attempted.len(),
            confirmed.len(),
            found.len()
        );
        // Only publishes whose message may have reached the broker fail.
        // One started after the cut waits for the reconnection (well
        // within recovery_wait here) rather than failing at once on the
        // dead link, and one whose message never left is sent again on the
        // next link.
        let not_in_doubt: Vec<String> = outcomes
            .iter()
            .filter_map(|(_, r)| match r {
                Err(Error::ConnectionLost(m)) if m.contains("outcome is unknown") => None,
                Err(e) => Some(e.to_string()),
                Ok(()) => None,
            })
            .collect();
        assert!(
            not_in_doubt.is_empty(),
            "{} publishes failed though nothing of them had been sent, e.g. {:?}",
            not_in_doubt.len(),
            not_in_doubt.first()
        );
        conn.close().await.unwrap();
        delete_queue(&*direct, &q).await;
    })
    .await;
    direct.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_while_publishing_never_reports_a_false_success() {
    publishing_across_a_cut(Mode::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_while_publishing_never_reports_a_false_success() {
    publishing_across_a_cut(Mode::Blackhole).await;
}

// ---------------------------------------------------------------------------
// 3. RPC calls across a cut
// ---------------------------------------------------------------------------

/// Calls in flight when the link is cut fail with `ConnectionLost` long
/// before their timeout; calls after the reconnection are answered.
async fn rpc_calls_across_a_cut(cut_with: Mode) {
    const IN_FLIGHT: usize = 8;
    const CALL_TIMEOUT: Duration = Duration::from_secs(120);
    /// Far below CALL_TIMEOUT, well above a heartbeat-detected silence.
    const FAIL_FAST: Duration = Duration::from_secs(15);
    let direct = connect().await;
    let q = fresh("cut-rpc");
    let _cleanup = QueueCleanup::new(&[&q]);
    within(TEST_SECS, "the whole test", async {
        let proxy = Proxy::start().await;
        // The server, on a connection that does not see the cut, holds the
        // "hold" requests until released so that their calls are in flight.
        let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<()>();
        let (release, released) = watch::channel(false);
        let server = RpcServer::builder(direct.clone() as Arc<dyn Connection>, q.as_str())
            .concurrency(IN_FLIGHT as u16 + 4)
            .serve_raw(move |request: Message| {
                let arrived_tx = arrived_tx.clone();
                let mut released = released.clone();
                async move {
                    if &request.body[..] == b"hold" {
                        let _ = arrived_tx.send(());
                        let _ = released.wait_for(|r| *r).await;
                    }
                    let mut body = b"re: ".to_vec();
                    body.extend_from_slice(&request.body);
                    Ok::<_, Infallible>(Message::new(body))
                }
            })
            .await
            .unwrap();

        let conn = proxy.connect(&fresh("cut-rpc-client")).await;
        let mut events = conn.events();
        let client = RpcClient::with_options(
            conn.clone() as Arc<dyn Connection>,
            RpcClientOptions::default().timeout(CALL_TIMEOUT),
        )
        .await
        .unwrap();
        let reply = client
            .call_raw(&q, Message::new("before"))
            .await
            .expect("a call through the proxy before the cut");
        assert_eq!(&reply.body[..], b"re: before");

        let calls: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let client = client.clone();
                let q = q.clone();
                tokio::spawn(async move {
                    let r = client.call_raw(&q, Message::new("hold")).await;
                    (r, Instant::now())
                })
            })
            .collect();
        for _ in 0..IN_FLIGHT {
            arrived.recv().await.unwrap();
        }
        let cut_at = Instant::now();
        proxy.set(cut_with);
        let outcomes = within(
            FAIL_FAST.as_secs() * 2,
            "the calls in flight to fail",
            futures::future::join_all(calls),
        )
        .await;
        for outcome in outcomes {
            let (r, ended) = outcome.unwrap();
            match r {
                Err(Error::ConnectionLost(_)) => {}
                other => panic!("a call in flight across the cut ended with {other:?}"),
            }
            let after = ended - cut_at;
            assert!(
                after < FAIL_FAST,
                "a call in flight failed {after:?} after the cut (timeout {CALL_TIMEOUT:?})"
            );
        }
        eprintln!(
            "{cut_with:?}: {IN_FLIGHT} calls in flight failed within {:?} of the cut",
            cut_at.elapsed()
        );
        // Their replies go to a reply channel that is gone.
        release.send_replace(true);
        proxy.set(Mode::Pass);
        wait_reconnected(&mut events).await;
        for i in 0..5 {
            let body = format!("after {i}");
            let reply = client
                .call_raw(&q, Message::new(body.clone()))
                .await
                .unwrap_or_else(|e| panic!("call {i} after the reconnection failed: {e}"));
            assert_eq!(reply.body, format!("re: {body}").into_bytes());
        }
        assert_eq!(client.in_flight(), 0);
        drop(client);
        conn.close().await.unwrap();
        server.shutdown().await.unwrap();
        delete_queue(&*direct, &q).await;
    })
    .await;
    direct.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_calls_in_flight_fail_fast_when_the_network_goes_silent() {
    rpc_calls_across_a_cut(Mode::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_calls_in_flight_fail_fast_when_the_connection_is_reset() {
    rpc_calls_across_a_cut(Mode::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_holds_bytes_while_silent_and_resets_on_demand() {
    // The proxy itself, against a plain echo server: what the tests above
    // rely on it doing.
    within(30, "the proxy check", async {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr: SocketAddr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = Proxy::start_to(
            BrokerHost::new(echo_addr.ip().to_string(), echo_addr.port()),
            AmqpUrl::parse(&amqp_addr()).unwrap(),
        )
        .await;
        let port = proxy.port;
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 5];
        s.write_all(b"hello").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        proxy.set(Mode::Blackhole);
        s.write_all(b"later").await.unwrap();
        let silent = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(
            silent.is_err(),
            "a byte got through the silence: {silent:?}"
        );
        proxy.set(Mode::Pass);
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            &buf, b"later",
            "held bytes are delivered when the network is back"
        );

        proxy.set(Mode::Reset);
        let r = s.read(&mut buf).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        // A new connection is reset too: at once, or at its first read.
        let r = match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(mut refused) => refused.read(&mut buf).await,
            Err(e) => Err(e),
        };
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        proxy.set(Mode::Pass);
        let mut again = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        again.write_all(b"again").await.unwrap();
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");

        // Armed, the next bytes from the client reset everything and are
        // never delivered.
        proxy.reset_at_next_client_bytes();
        again.write_all(b"never").await.unwrap();
        let r = again.read(&mut buf).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert_eq!(proxy.state.borrow().mode, Mode::Reset);
    })
    .await;
}
