//! Topic and fanout routing: which queue receives which event.
//!
//! ```text
//! cargo run --example topics
//! ```

use std::collections::BTreeMap;

use bus::{
    ConnectionExt, DeleteExchangeOptions, ExchangeKind, ExchangeOptions, FieldTable, Message,
    PublishOptions, QueueOptions,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("BUS_URL").unwrap_or_else(|_| "memory://topics".into());
    let conn = bus::connect(&url).await?;
    let tag = std::process::id();

    // Topic routing: speech events are keyed `<service>.<language>.<outcome>`.
    let events = format!("speech.events-{tag}");
    conn.declare_exchange(&events, ExchangeKind::Topic, ExchangeOptions::default())
        .await?;
    let bindings = [
        ("asr-done", "asr.*.done"),
        ("all-errors", "#.error"),
        ("everything-tts", "tts.#"),
        ("english", "*.en.*"),
    ];
    let mut queues = Vec::new();
    for (queue, pattern) in bindings {
        let name = format!("{queue}-{tag}");
        conn.declare_queue(&name, QueueOptions::exclusive()).await?;
        conn.bind_queue(&name, &events, pattern, FieldTable::new())
            .await?;
        println!("bind {queue:<15} to {events} with {pattern:?}");
        queues.push((queue, name));
    }

    let keys = [
        "asr.en.done",
        "asr.fr.done",
        "asr.en.error",
        "tts.de.done",
        "tts",
        "diarize.en.started",
        "diarize.fr.started",
    ];
    for key in keys {
        let outcome = conn
            .publish(
                &events,
                key,
                Message::new(key.as_bytes().to_vec()),
                PublishOptions::mandatory(),
            )
            .await;
        match outcome {
            Ok(()) => println!("publish {key:<20} routed"),
            Err(bus::Error::Unroutable { .. }) => {
                println!("publish {key:<20} unroutable (mandatory: returned to the publisher)")
            }
            Err(e) => return Err(e.into()),
        }
    }

    let mut received: BTreeMap<&str, u32> = BTreeMap::new();
    for (queue, name) in &queues {
        let depth = conn.inspect_queue(name).await?.message_count;
        received.insert(queue, depth);
        println!("queue {queue:<15} holds {depth} message(s)");
    }
    let expected: BTreeMap<&str, u32> = [
        ("asr-done", 2),
        ("all-errors", 1),
        ("everything-tts", 2),
        ("english", 3),
    ]
    .into();
    if received != expected {
        return Err(format!("topic routing gave {received:?}, expected {expected:?}").into());
    }

    // Fanout: every bound queue gets its own copy, the routing key is ignored.
    let broadcast = format!("broadcast-{tag}");
    conn.declare_exchange(&broadcast, ExchangeKind::Fanout, ExchangeOptions::default())
        .await?;
    let mut fans = Vec::new();
    for i in 1..=3 {
        let name = format!("listener-{i}-{tag}");
        conn.declare_queue(&name, QueueOptions::exclusive()).await?;
        conn.bind_queue(&name, &broadcast, "", FieldTable::new())
            .await?;
        fans.push(name);
    }
    conn.publish(
        &broadcast,
        "ignored",
        Message::new(&b"model reloaded"[..]),
        PublishOptions::default(),
    )
    .await?;
    for name in &fans {
        let depth = conn.inspect_queue(name).await?.message_count;
        println!("fanout: {name} holds {depth} copy");
        if depth != 1 {
            return Err(format!("{name} should hold exactly one copy").into());
        }
    }

    conn.delete_exchange(&events, DeleteExchangeOptions::default())
        .await?;
    conn.delete_exchange(&broadcast, DeleteExchangeOptions::default())
        .await?;
    conn.close().await?;
    println!("topic and fanout routing behaved as bound");
    Ok(())
}
