//! Request/reply: the RPC layer over the transport, and its wire protocol
//! with the legacy peers (docs/LEGACY.md in the repository, contract 1).
//!
//! Servers and clients run on connections of their own, as separate
//! processes would. Cases that stop a server mid-request hold the request in
//! the handler until the case says so, so that what happens is decided by
//! the case, not by timing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Barrier};
use tokio::time::Instant;

use super::support::{
    cleanup, consume, exchange, expect_bodies, expect_err, not_applicable, publish, queue, recv,
    WAIT,
};
use super::{fresh_name, Harness};
use crate::rpc::blocking::{BlockingRpcClient, BlockingRpcServer};
use crate::rpc::{
    decode_message, CallOptions, Format, RpcClient, RpcClientOptions, RpcServer, ERROR_HEADER,
};
use crate::{ConsumeOptions, Delivery, Error, ExchangeKind, FieldValue, Message, QueueOptions};

/// A speech job as a backend would send it: audio bytes (the msgpack bin
/// type) and parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u64,
    #[serde(with = "serde_bytes")]
    audio: Vec<u8>,
    language: String,
    params: BTreeMap<String, f64>,
}

impl Job {
    fn new(id: u64, language: &str) -> Job {
        Job {
            id,
            audio: vec![0x52, 0x49, 0x46, 0x46, 0x00, 0xff, id as u8],
            language: language.to_owned(),
            params: [("beam".to_owned(), 4.0), ("temperature".to_owned(), 0.5)].into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Transcript {
    id: u64,
    text: String,
    audio_len: usize,
    served_by: String,
}

fn transcribe(job: &Job, served_by: &str) -> Transcript {
    Transcript {
        id: job.id,
        text: format!("{} speech, beam {}", job.language, job.params["beam"]),
        audio_len: job.audio.len(),
        served_by: served_by.to_owned(),
    }
}

/// Awaits `future` for at most [`WAIT`], failing the case otherwise.
async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing happened within {WAIT:?}"))
}

async fn client(conn: Arc<dyn crate::Connection>) -> RpcClient {
    RpcClient::new(conn)
        .await
        .unwrap_or_else(|e| panic!("open an RPC client: {e:?}"))
}

/// Replies to a request by hand, as the legacy server does: only
/// `correlation_id` set, a msgpack body.
async fn reply_by_hand<T: Serialize>(conn: &dyn crate::Connection, request: &Delivery, body: &T) {
    let reply_to = request
        .message
        .properties
        .reply_to
        .clone()
        .expect("an RPC request carries reply_to");
    let mut reply = Message::new(rmp_serde::to_vec_named(body).expect("encode a reply"));
    reply.properties.correlation_id = request.message.properties.correlation_id.clone();
    publish(conn, "", &reply_to, reply).await;
}

/// A gate that handlers wait at until the case opens it.
fn gate() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn pass(gate: &mut watch::Receiver<bool>) {
    let _ = gate.wait_for(|open| *open).await;
}

/// A server of `q` whose handler reports each job's id on the returned
/// receiver as it takes it, then holds it until the returned gate opens,
/// and answers as `worker`.
async fn holding_server(
    conn: Arc<dyn crate::Connection>,
    q: &str,
    concurrency: u16,
    worker: &'static str,
) -> (RpcServer, mpsc::UnboundedReceiver<u64>, watch::Sender<bool>) {
    let (held_tx, held) = mpsc::unbounded_channel();
    let (release, released) = gate();
    let server = RpcServer::builder(conn, q)
        .concurrency(concurrency)
        .serve(move |job: Job| {
            let (held_tx, mut released) = (held_tx.clone(), released.clone());
            async move {
                let _ = held_tx.send(job.id);
                pass(&mut released).await;
                Ok::<_, String>(transcribe(&job, worker))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    (server, held, release)
}

/// A typed call goes to the service's queue and its reply comes back
/// decoded: bytes, strings, nested maps, in msgpack and in JSON.
pub async fn round_trip(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let client_conn = h.connect().await;
    let q = fresh_name("rpc-round-trip");
    let server = RpcServer::builder(server_conn.clone(), &q)
        .serve(|job: Job| async move { Ok::<_, String>(transcribe(&job, "asr-1")) })
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    assert_eq!(
        server.queue(),
        q,
        "the server serves the queue it was given"
    );
    let client = client(client_conn.clone()).await;

    let job = Job::new(1, "en");
    let reply: Transcript = within("msgpack call", client.call(&q, &job))
        .await
        .unwrap_or_else(|e| panic!("call {q:?}: {e:?}"));
    assert_eq!(reply, transcribe(&job, "asr-1"), "the msgpack reply");

    let job = Job::new(2, "fr");
    let reply: Transcript = within(
        "JSON call",
        client.call_with(&q, &job, CallOptions::new().format(Format::Json)),
    )
    .await
    .unwrap_or_else(|e| panic!("JSON call {q:?}: {e:?}"));
    assert_eq!(reply, transcribe(&job, "asr-1"), "the JSON reply");

    let raw = within(
        "raw call",
        client.call_raw(&q, Format::Json.to_message(&Job::new(3, "de")).unwrap()),
    )
    .await
    .unwrap_or_else(|e| panic!("raw call {q:?}: {e:?}"));
    assert_eq!(
        raw.properties.content_type.as_deref(),
        Some("application/json"),
        "a JSON request gets a JSON reply"
    );
    assert_eq!(client.in_flight(), 0, "no call is left in flight");

    server.shutdown().await.expect("shut the server down");
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// 1,000 calls in flight at once from four clients, each on its own
/// connection: every call gets its own reply.
pub async fn concurrent_calls_are_matched(h: &dyn Harness) {
    const CLIENTS: u64 = 4;
    const CALLS: u64 = 250;
    let server_conn = h.connect().await;
    let q = fresh_name("rpc-concurrent");
    let server = RpcServer::builder(server_conn.clone(), &q)
        .concurrency(16)
        .serve(|job: Job| async move {
            tokio::task::yield_now().await;
            Ok::<_, String>(transcribe(&job, "asr"))
        })
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(client(h.connect().await).await);
    }
    let calls = clients.iter().enumerate().flat_map(|(c, client)| {
        let q = &q;
        (0..CALLS).map(move |n| {
            let job = Job::new(c as u64 * 1_000 + n, &format!("lang-{c}-{n}"));
            async move {
                let reply: crate::Result<Transcript> = client.call(q, &job).await;
                (job, reply)
            }
        })
    });
    let results = within("1,000 concurrent calls", futures::future::join_all(calls)).await;
    assert_eq!(results.len(), (CLIENTS * CALLS) as usize);
    for (job, reply) in results {
        let reply = reply.unwrap_or_else(|e| panic!("call for job {}: {e:?}", job.id));
        assert_eq!(
            reply,
            transcribe(&job, "asr"),
            "job {} got another's reply",
            job.id
        );
    }
    for client in &clients {
        assert_eq!(client.in_flight(), 0, "no call is left in flight");
        assert_eq!(client.late_replies(), 0, "no reply went astray");
    }
    server.shutdown().await.expect("shut the server down");
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// A call nobody answers fails with `Timeout` at its timeout exactly (under
/// a paused clock; at or after it on a real one), frees its slot, and the
/// request carried the timeout as its `expiration`. A call whose future is
/// dropped frees its slot too.
pub async fn timeout_at_configured_time(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "rpc-timeout").await;
    let client = client(h.connect().await).await;
    let timeout = Duration::from_millis(750);

    let started = Instant::now();
    let wall = std::time::Instant::now();
    let result = client
        .call_raw_with(
            &q,
            Message::new("anyone?"),
            CallOptions::new().timeout(timeout),
        )
        .await;
    let elapsed = started.elapsed();
    let e = expect_err!("a call nobody answers", result, Error::Timeout(_));
    assert!(
        matches!(e, Error::Timeout(t) if t == timeout),
        "the timeout error names the timeout: {e:?}"
    );
    assert!(
        elapsed >= timeout,
        "timed out after {elapsed:?}, before {timeout:?}"
    );
    // Only a paused clock can reach the timeout before as much real time has
    // passed, and there it must be reached exactly.
    if wall.elapsed() < timeout {
        assert_eq!(
            elapsed, timeout,
            "under a paused clock the call times out exactly"
        );
    }
    assert_eq!(client.in_flight(), 0, "a timed-out call frees its slot");

    // The request is still there, carrying the legacy protocol's properties.
    let mut requests = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let cancelled = client.call_raw(&q, Message::new("never mind"));
    let request = tokio::select! {
        biased;
        _ = cancelled => panic!("a call nobody answers returned"),
        d = async {
            loop {
                let d = recv(&mut requests, "the request of a call in flight").await;
                // The timed-out request may or may not have expired yet.
                if &d.message.body[..] != b"anyone?" {
                    break d;
                }
            }
        } => d,
    };
    assert_eq!(
        request.message.properties.expiration.as_deref(),
        Some("180000"),
        "the request's expiration is the call's timeout, 180 s by default"
    );
    assert_eq!(
        client.in_flight(),
        0,
        "a call whose future is dropped frees its slot"
    );
    drop(requests);
    cleanup(&*conn, &[&q], &[]).await;
}

/// A reply arriving after its call timed out is dropped and counted, and is
/// never handed to the call in flight at that moment.
pub async fn late_reply_is_dropped_and_counted(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let q = queue(&*server_conn, "rpc-late").await;
    let mut requests = consume(&*server_conn, &q, ConsumeOptions::auto_ack()).await;
    let client = client(h.connect().await).await;

    let first = client
        .call_raw_with(
            &q,
            Message::new("first"),
            CallOptions::new().timeout(Duration::from_millis(500)),
        )
        .await;
    expect_err!("the first call, unanswered", first, Error::Timeout(_));
    let first = recv(&mut requests, "the first request").await;

    let second = tokio::spawn({
        let (client, q) = (client.clone(), q.clone());
        async move { client.call_raw(&q, Message::new("second")).await }
    });
    let second_request = recv(&mut requests, "the second request").await;
    // The late reply comes first, while the second call waits.
    reply_by_hand(&*server_conn, &first, &"for the first call").await;
    reply_by_hand(&*server_conn, &second_request, &"for the second call").await;
    let reply = within("the second call", second)
        .await
        .expect("the second call's task")
        .unwrap_or_else(|e| panic!("the second call: {e:?}"));
    let text: String = decode_message(&reply).expect("decode the second reply");
    assert_eq!(
        text, "for the second call",
        "the second call gets its own reply"
    );
    assert_eq!(client.late_replies(), 1, "the late reply is counted");
    assert_eq!(client.in_flight(), 0);
    drop(requests);
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// A handler that fails or panics answers with an error reply the client
/// reports as `Remote`, with the handler's message; the request is acked,
/// not redelivered, and the server goes on serving.
pub async fn remote_error(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let q = fresh_name("rpc-remote-error");
    let handled = Arc::new(AtomicUsize::new(0));
    let server = RpcServer::builder(server_conn.clone(), &q)
        .serve({
            let handled = handled.clone();
            move |job: Job| {
                handled.fetch_add(1, Ordering::SeqCst);
                async move {
                    match job.language.as_str() {
                        "boom" => Err(format!("model exploded on job {}", job.id)),
                        "panic" => panic!(
                            "tensor shape mismatch in job {} (a deliberate panic)",
                            job.id
                        ),
                        _ => Ok(transcribe(&job, "asr")),
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    let client = client(h.connect().await).await;

    let failed = within(
        "a failing call",
        client.call::<_, Transcript>(&q, &Job::new(1, "boom")),
    )
    .await;
    let e = expect_err!("a handler error", failed, Error::Remote { .. });
    assert!(
        e.to_string().contains("model exploded on job 1"),
        "the remote error carries the handler's message: {e}"
    );
    let panicked = within(
        "a panicking call",
        client.call::<_, Transcript>(&q, &Job::new(2, "panic")),
    )
    .await;
    let e = expect_err!("a handler panic", panicked, Error::Remote { .. });
    assert!(
        e.to_string().contains("tensor shape mismatch in job 2"),
        "the remote error carries the panic's message: {e}"
    );

    // The error reply stays readable by a legacy client: a msgpack map.
    let raw = within(
        "a raw failing call",
        client.call_raw(
            &q,
            Format::MsgPack.to_message(&Job::new(3, "boom")).unwrap(),
        ),
    )
    .await;
    expect_err!("a raw call to a failing handler", raw, Error::Remote { .. });

    let ok: Transcript = within("a good call", client.call(&q, &Job::new(4, "en")))
        .await
        .unwrap_or_else(|e| panic!("a good call after failures: {e:?}"));
    assert_eq!(ok.id, 4);
    // With prefetch 1, a failed request put back would come again before
    // the good one: exactly four handler runs means none was.
    assert_eq!(
        handled.load(Ordering::SeqCst),
        4,
        "failed requests are not redelivered"
    );
    server.shutdown().await.expect("shut the server down");
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// The error reply a legacy client reads: the request's correlation id, the
/// error header, and the msgpack map `{"error": text}`.
pub async fn error_reply_is_readable_by_legacy_clients(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let legacy_conn = h.connect().await;
    let q = fresh_name("rpc-error-legacy");
    let server = RpcServer::builder(server_conn.clone(), &q)
        .serve(|_: Job| async move { Err::<Transcript, _>("no speech detected") })
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    let reply_queue = legacy_conn
        .declare_queue("", QueueOptions::default().with_exclusive(true))
        .await
        .expect("declare a callback queue");
    let mut replies = consume(&*legacy_conn, &reply_queue.name, ConsumeOptions::auto_ack()).await;
    let id = uuid::Uuid::new_v4().to_string();
    let request = Message::new(rmp_serde::to_vec_named(&Job::new(1, "en")).unwrap())
        .with_reply_to(&reply_queue.name)
        .with_correlation_id(&id);
    publish(&*legacy_conn, "", &q, request).await;
    let reply = recv(&mut replies, "the error reply").await;
    assert_eq!(
        reply.message.properties.correlation_id.as_deref(),
        Some(id.as_str())
    );
    assert_eq!(
        reply.message.properties.headers.get(ERROR_HEADER),
        Some(&FieldValue::from("no speech detected"))
    );
    assert_eq!(
        reply.message.properties.content_type, None,
        "msgpack, as legacy peers send it"
    );
    let body: BTreeMap<String, String> =
        rmp_serde::from_slice(&reply.message.body).expect("the error body is a msgpack map");
    assert_eq!(
        body,
        [("error".to_owned(), "no speech detected".to_owned())].into()
    );
    server.shutdown().await.expect("shut the server down");
    drop(replies);
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// A request whose body does not decode gets an error reply, and is acked;
/// on a queue with a dead-letter exchange it is dead-lettered instead.
pub async fn undecodable_request(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let q = fresh_name("rpc-undecodable");
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let handled = handled.clone();
        move |job: Job| {
            handled.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>(transcribe(&job, "asr")) }
        }
    };
    let server = RpcServer::builder(server_conn.clone(), &q)
        .serve(handler.clone())
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    let client = client(h.connect().await).await;

    // 0xc1 is the one byte msgpack never uses.
    let garbage = within(
        "a call with garbage",
        client.call_raw(&q, Message::new(vec![0xc1])),
    )
    .await;
    let e = expect_err!(
        "an undecodable msgpack request",
        garbage,
        Error::Remote { .. }
    );
    assert!(
        e.to_string().contains("decode"),
        "the error says what failed: {e}"
    );
    let wrong_shape = Format::MsgPack.to_message(&"not a job").unwrap();
    let wrong_shape = within(
        "a call with the wrong shape",
        client.call_raw(&q, wrong_shape),
    )
    .await;
    expect_err!(
        "a request of the wrong shape",
        wrong_shape,
        Error::Remote { .. }
    );
    let bad_json = Message::new("{\"id\":").with_content_type("application/json");
    let bad_json = within("a call with broken JSON", client.call_raw(&q, bad_json)).await;
    let e = expect_err!(
        "an undecodable JSON request",
        bad_json,
        Error::Remote { .. }
    );
    assert!(
        e.to_string().contains("JSON"),
        "the error names the format: {e}"
    );
    let ok: Transcript = within("a good call", client.call(&q, &Job::new(1, "en")))
        .await
        .unwrap_or_else(|e| panic!("a good call after garbage: {e:?}"));
    assert_eq!(ok.id, 1);
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "the handler saw only the good request"
    );
    server.shutdown().await.expect("shut the server down");
    cleanup(&*server_conn, &[&q], &[]).await;

    if not_applicable(
        h,
        h.capabilities().dead_lettering,
        "rpc undecodable request dead-lettered",
        "no dead-letter exchanges",
    ) {
        return;
    }
    let dlx = exchange(&*server_conn, "rpc-dlx", ExchangeKind::Fanout).await;
    let dead = queue(&*server_conn, "rpc-dead").await;
    super::support::bind(&*server_conn, &dead, &dlx, "").await;
    let q = fresh_name("rpc-undecodable-dlx");
    let options = QueueOptions::default().dead_letter_to(dlx.clone());
    let server = RpcServer::builder(server_conn.clone(), &q)
        .queue_options(options)
        .serve(handler)
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?} with a dead-letter exchange: {e:?}"));
    publish(&*server_conn, "", &q, Message::new(vec![0xc1])).await;
    let mut dead_letters = consume(&*server_conn, &dead, ConsumeOptions::auto_ack()).await;
    let d = recv(&mut dead_letters, "the undecodable request, dead-lettered").await;
    assert_eq!(
        &d.message.body[..],
        &[0xc1],
        "the request is dead-lettered as it was"
    );
    assert!(
        d.message.properties.headers.contains_key("x-death"),
        "a dead-lettered request carries x-death"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "the handler never saw it"
    );
    server.shutdown().await.expect("shut the server down");
    drop(dead_letters);
    cleanup(&*server_conn, &[&q, &dead], &[&dlx]).await;
}

/// A server whose connection goes away while it holds a request leaves it
/// to be redelivered: another instance serves it and the call succeeds.
pub async fn server_killed_mid_request_is_served_by_another(h: &dyn Harness) {
    let doomed_conn = h.connect().await;
    let q = fresh_name("rpc-failover");
    let (doomed, mut held, release) = holding_server(doomed_conn.clone(), &q, 1, "doomed").await;
    let client = client(h.connect().await).await;
    let call = tokio::spawn({
        let (client, q) = (client.clone(), q.clone());
        async move { client.call::<_, Transcript>(&q, &Job::new(7, "en")).await }
    });
    let id = within("the first server takes the job", held.recv()).await;
    assert_eq!(id, Some(7));

    let survivor_conn = h.connect().await;
    let survivor = RpcServer::builder(survivor_conn.clone(), &q)
        .serve(|job: Job| async move { Ok::<_, String>(transcribe(&job, "survivor")) })
        .await
        .unwrap_or_else(|e| panic!("start the second server on {q:?}: {e:?}"));
    doomed_conn
        .close()
        .await
        .expect("close the first server's connection");

    let reply = within("the call, after failover", call)
        .await
        .expect("the call's task")
        .unwrap_or_else(|e| panic!("the call after failover: {e:?}"));
    assert_eq!(
        reply,
        transcribe(&Job::new(7, "en"), "survivor"),
        "the survivor served the job"
    );

    // The doomed handler finishes, but its reply cannot go out any more.
    release.send_replace(true);
    let stopped = within("the doomed server stops", doomed.wait()).await;
    assert!(
        stopped.is_err(),
        "a server whose connection closed reports it: {stopped:?}"
    );
    assert_eq!(
        client.late_replies(),
        0,
        "no second reply reached the client"
    );
    survivor.shutdown().await.expect("shut the survivor down");
    cleanup(&*survivor_conn, &[&q], &[]).await;
}

/// Two server instances on one queue share the load: with prefetch 1, a
/// busy instance takes no second request, so concurrent calls are spread.
pub async fn two_servers_share_the_load(h: &dyn Harness) {
    const ROUNDS: usize = 4;
    let q = fresh_name("rpc-share");
    let both_busy = Arc::new(Barrier::new(2));
    let mut servers = Vec::new();
    let mut conns = Vec::new();
    for name in ["asr-1", "asr-2"] {
        let conn = h.connect().await;
        let both_busy = both_busy.clone();
        let server = RpcServer::builder(conn.clone(), &q)
            .serve(move |job: Job| {
                let both_busy = both_busy.clone();
                async move {
                    // Each round completes only when both instances hold a
                    // request at once.
                    both_busy.wait().await;
                    Ok::<_, String>(transcribe(&job, name))
                }
            })
            .await
            .unwrap_or_else(|e| panic!("start server {name} on {q:?}: {e:?}"));
        servers.push(server);
        conns.push(conn);
    }
    let client = client(h.connect().await).await;
    let mut served: HashMap<String, usize> = HashMap::new();
    for round in 0..ROUNDS {
        let (a, b) = within(
            "two concurrent calls",
            futures::future::join(
                client.call::<_, Transcript>(&q, &Job::new(2 * round as u64, "en")),
                client.call::<_, Transcript>(&q, &Job::new(2 * round as u64 + 1, "en")),
            ),
        )
        .await;
        for reply in [a, b] {
            let reply = reply.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            *served.entry(reply.served_by).or_default() += 1;
        }
    }
    assert_eq!(
        served,
        [("asr-1".to_owned(), ROUNDS), ("asr-2".to_owned(), ROUNDS)].into(),
        "each instance served one call of every round"
    );
    for server in servers {
        server.shutdown().await.expect("shut a server down");
    }
    cleanup(&*conns[0], &[&q], &[]).await;
}

/// A call to a queue nobody declared fails with `Unroutable` (the request
/// is published mandatory) instead of waiting out its timeout.
pub async fn no_server_is_unroutable(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().mandatory,
        "rpc no server is unroutable",
        "mandatory publishes are not reported",
    ) {
        return;
    }
    let client = client(h.connect().await).await;
    let q = fresh_name("rpc-nobody");
    let result = within(
        "a call to nobody",
        client.call::<_, Transcript>(&q, &Job::new(1, "en")),
    )
    .await;
    let e = expect_err!(
        "a call to a queue nobody declared",
        result,
        Error::Unroutable { .. }
    );
    assert!(
        matches!(&e, Error::Unroutable { routing_key, .. } if *routing_key == q),
        "the error names the queue: {e:?}"
    );
    assert_eq!(client.in_flight(), 0, "an unroutable call frees its slot");
}

/// When the client's connection goes away, its calls in flight fail at once
/// with `ConnectionLost`, not at their timeouts; later calls fail clearly.
pub async fn connection_lost_fails_calls_in_flight(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let q = fresh_name("rpc-conn-lost");
    let (server, mut held, release) = holding_server(server_conn.clone(), &q, 1, "asr").await;
    let client_conn = h.connect().await;
    let client = client(client_conn.clone()).await;
    let started = Instant::now();
    let call = tokio::spawn({
        let (client, q) = (client.clone(), q.clone());
        async move { client.call::<_, Transcript>(&q, &Job::new(1, "en")).await }
    });
    within("the server takes the job", held.recv()).await;
    client_conn
        .close()
        .await
        .expect("close the client's connection");
    let result = within("the call in flight", call)
        .await
        .expect("the call's task");
    expect_err!(
        "a call whose connection closed",
        result,
        Error::ConnectionLost(_)
    );
    assert!(
        started.elapsed() < crate::rpc::DEFAULT_TIMEOUT,
        "the call failed fast, not at its timeout"
    );
    assert_eq!(client.in_flight(), 0);
    let later = within(
        "a later call",
        client.call::<_, Transcript>(&q, &Job::new(2, "en")),
    )
    .await;
    match later {
        Err(Error::Timeout(_)) | Ok(_) => {
            panic!("a call on a closed connection must fail clearly: {later:?}")
        }
        Err(_) => {}
    }
    release.send_replace(true);
    server.shutdown().await.expect("shut the server down");
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// Shutdown stops taking requests, lets those in hand finish (replied and
/// acked) and only then returns; requests sent afterwards stay queued.
pub async fn graceful_shutdown_finishes_in_flight(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let q = fresh_name("rpc-shutdown");
    let (server, mut held, release) = holding_server(server_conn.clone(), &q, 2, "asr").await;
    let client = client(h.connect().await).await;
    let calls: Vec<_> = (1..=2)
        .map(|id| {
            let (client, q) = (client.clone(), q.clone());
            tokio::spawn(async move { client.call::<_, Transcript>(&q, &Job::new(id, "en")).await })
        })
        .collect();
    for _ in 0..2 {
        within("the server takes both jobs", held.recv()).await;
    }
    let shutdown = tokio::spawn(server.shutdown());
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the requests in hand"
    );
    release.send_replace(true);
    within("shutdown", shutdown)
        .await
        .expect("the shutdown task")
        .expect("a graceful shutdown succeeds");
    for (call, id) in calls.into_iter().zip(1..) {
        let reply = within("a call in flight at shutdown", call)
            .await
            .expect("the call's task")
            .unwrap_or_else(|e| panic!("call {id} in flight at shutdown: {e:?}"));
        assert_eq!(reply.id, id);
    }
    // Both requests were acked and the server consumes no more: what is
    // sent now stays in the queue.
    publish(&*server_conn, "", &q, Message::new("after shutdown")).await;
    expect_bodies(&*server_conn, &q, &["after shutdown"]).await;
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// A request without `reply_to` is handled and acked, with no reply.
pub async fn request_without_reply_to_is_handled(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let q = fresh_name("rpc-no-reply-to");
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = RpcServer::builder(server_conn.clone(), &q)
        .serve(move |job: Job| {
            let _ = seen_tx.send(job.id);
            async move { Ok::<_, String>(transcribe(&job, "asr")) }
        })
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    let message = Format::MsgPack.to_message(&Job::new(1, "en")).unwrap();
    publish(&*server_conn, "", &q, message).await;
    assert_eq!(within("the handler runs", seen.recv()).await, Some(1));
    // Prefetch 1: the next request is taken only once the first is acked.
    let client = client(h.connect().await).await;
    let reply: Transcript = within("a call after it", client.call(&q, &Job::new(2, "en")))
        .await
        .unwrap_or_else(|e| panic!("a call after a request without reply_to: {e:?}"));
    assert_eq!(reply.id, 2);
    assert_eq!(
        seen.try_recv().ok(),
        Some(2),
        "the first request was not redelivered"
    );
    assert_eq!(client.late_replies(), 0);
    server.shutdown().await.expect("shut the server down");
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// A legacy server (pika + msgpack) as the Rust client meets it: the
/// request is a msgpack map with string keys and bin bytes, with `reply_to`,
/// a UUID4 `correlation_id` and the timeout as `expiration`; the reply
/// carries only `correlation_id` and is msgpack without a content type.
pub async fn legacy_server_is_callable(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let q = queue(&*server_conn, "rpc-legacy-server").await;
    let mut requests = consume(&*server_conn, &q, ConsumeOptions::prefetch(1)).await;
    let client = RpcClient::with_options(
        h.connect().await,
        RpcClientOptions::default().classic_reply_queue(true),
    )
    .await
    .expect("open a client with a classic reply queue");
    let call = tokio::spawn({
        let (client, q) = (client.clone(), q.clone());
        async move {
            client
                .call_with::<_, BTreeMap<String, String>>(
                    &q,
                    &Job::new(12, "en"),
                    CallOptions::new().timeout(Duration::from_secs(30)),
                )
                .await
        }
    });
    let request = recv(&mut requests, "the request").await;
    let props = &request.message.properties;
    let id = props.correlation_id.clone().expect("a correlation id");
    assert_eq!(id.len(), 36, "a UUID4 string with dashes: {id:?}");
    assert!(uuid::Uuid::parse_str(&id).is_ok_and(|u| u.get_version_num() == 4));
    assert!(props.reply_to.as_deref().is_some_and(|r| !r.is_empty()));
    assert_eq!(props.expiration.as_deref(), Some("30000"));
    assert_eq!(
        props.content_type, None,
        "legacy peers send msgpack without a content type"
    );
    // Checked on the bytes: a fixmap of four entries with str keys, the
    // audio as bin 8, the parameters as a nested map.
    let body = &request.message.body[..];
    assert_eq!(
        body[0], 0x84,
        "the request is a map of 4 entries: {body:x?}"
    );
    let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(&[0xa2, b'i', b'd', 0x0c]),
        "\"id\": 12 with a str key: {body:x?}"
    );
    assert!(
        contains(b"\xa8language\xa2en"),
        "\"language\": \"en\": {body:x?}"
    );
    let mut audio = vec![0xa5, b'a', b'u', b'd', b'i', b'o', 0xc4, 7];
    audio.extend_from_slice(&Job::new(12, "en").audio);
    assert!(
        contains(&audio),
        "the audio bytes are the bin type: {body:x?}"
    );
    assert!(
        contains(b"\xa6params\x82"),
        "the parameters are a nested map: {body:x?}"
    );

    reply_by_hand(
        &*server_conn,
        &request,
        &BTreeMap::from([("msg", "hello from service")]),
    )
    .await;
    request.ack().await.expect("ack the request");
    let reply = within("the call", call)
        .await
        .expect("the call's task")
        .expect("the call");
    assert_eq!(reply["msg"], "hello from service");
    drop(requests);
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// A legacy client (pika + msgpack) as the Rust server meets it: a
/// server-named exclusive callback queue, a UUID4 correlation id, a msgpack
/// map with no content type; the reply carries the correlation id and a
/// msgpack map, and no content type.
pub async fn legacy_client_is_served(h: &dyn Harness) {
    #[derive(Deserialize)]
    struct Demo {
        x: i64,
    }
    let server_conn = h.connect().await;
    let legacy_conn = h.connect().await;
    let q = fresh_name("rpc-legacy-client");
    let server = RpcServer::builder(server_conn.clone(), &q)
        .serve(|demo: Demo| async move {
            Ok::<_, String>(BTreeMap::from([(
                "msg".to_owned(),
                format!("hello from service, x = {}", demo.x),
            )]))
        })
        .await
        .unwrap_or_else(|e| panic!("start a server on {q:?}: {e:?}"));
    let callback = legacy_conn
        .declare_queue("", QueueOptions::default().with_exclusive(true))
        .await
        .expect("declare a callback queue");
    let mut replies = consume(&*legacy_conn, &callback.name, ConsumeOptions::auto_ack()).await;
    let id = uuid::Uuid::new_v4().to_string();
    // {"x": 12} as msgpack.packb writes it.
    let request = Message::new(vec![0x81, 0xa1, b'x', 0x0c])
        .with_reply_to(&callback.name)
        .with_correlation_id(&id);
    publish(&*legacy_conn, "", &q, request).await;
    let reply = recv(&mut replies, "the reply").await;
    let props = &reply.message.properties;
    assert_eq!(props.correlation_id.as_deref(), Some(id.as_str()));
    assert_eq!(props.content_type, None);
    assert!(
        props.headers.is_empty(),
        "a good reply carries no headers: {:?}",
        props.headers
    );
    // {"msg": "..."} exactly as msgpack.packb writes it.
    let text = b"hello from service, x = 12";
    let mut expected = vec![0x81, 0xa3, b'm', b's', b'g', 0xa0 | text.len() as u8];
    expected.extend_from_slice(text);
    assert_eq!(&reply.message.body[..], &expected[..], "the reply body");
    server.shutdown().await.expect("shut the server down");
    drop(replies);
    cleanup(&*server_conn, &[&q], &[]).await;
}

/// The blocking client and server, on threads of their own, with the same
/// replies and errors as the async ones.
pub async fn blocking_client_and_server(h: &dyn Harness) {
    let server_conn = h.connect().await;
    let client_conn = h.connect().await;
    let q = fresh_name("rpc-blocking");
    let scenario = {
        let (server_conn, q) = (server_conn.clone(), q.clone());
        move || {
            let server = BlockingRpcServer::builder(&q)
                .concurrency(2)
                .start(server_conn)
                .unwrap_or_else(|e| panic!("start a blocking server on {q:?}: {e:?}"));
            let client =
                BlockingRpcClient::new(client_conn, RpcClientOptions::default().timeout(WAIT))
                    .unwrap_or_else(|e| panic!("open a blocking client: {e:?}"));
            std::thread::scope(|s| {
                // Two worker threads, each with its own handler.
                let workers: Vec<_> = ["gpu-0", "gpu-1"]
                    .into_iter()
                    .map(|worker| {
                        let server = &server;
                        s.spawn(move || {
                            server.serve(|job: Job| match job.language.as_str() {
                                "boom" => Err(format!("model exploded on job {}", job.id)),
                                _ => Ok(transcribe(&job, worker)),
                            })
                        })
                    })
                    .collect();
                let replies: Vec<crate::Result<Transcript>> = std::thread::scope(|calls| {
                    let handles: Vec<_> = (0..8)
                        .map(|id| {
                            let client = &client;
                            let q = &q;
                            calls.spawn(move || client.call(q, &Job::new(id, "en")))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|t| t.join().expect("a calling thread"))
                        .collect()
                });
                for (id, reply) in replies.into_iter().enumerate() {
                    let reply = reply.unwrap_or_else(|e| panic!("blocking call {id}: {e:?}"));
                    assert_eq!(reply.id, id as u64, "each blocking call gets its own reply");
                }
                let failed = client.call::<_, Transcript>(&q, &Job::new(99, "boom"));
                let e = expect_err!("a failing blocking handler", failed, Error::Remote { .. });
                assert!(e.to_string().contains("model exploded on job 99"), "{e}");
                let timeout = client.call_with::<_, Transcript>(
                    &fresh_name("rpc-blocking-nobody"),
                    &Job::new(1, "en"),
                    CallOptions::new().timeout(Duration::from_millis(200)),
                );
                assert!(
                    matches!(timeout, Err(Error::Timeout(_) | Error::Unroutable { .. })),
                    "a blocking call nobody answers fails as the async one: {timeout:?}"
                );
                server.shutdown().expect("shut the blocking server down");
                for worker in workers {
                    let served = worker.join().expect("a serving thread");
                    assert!(
                        served.is_ok(),
                        "serve returns Ok after a shutdown: {served:?}"
                    );
                }
            });
            assert_eq!(client.in_flight(), 0);
        }
    };
    // The scenario blocks its threads; the transport's own tasks, if any,
    // keep running on this runtime meanwhile.
    within(
        "the blocking scenario",
        tokio::task::spawn_blocking(scenario),
    )
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    cleanup(&*server_conn, &[&q], &[]).await;
}
