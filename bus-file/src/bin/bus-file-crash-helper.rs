//! A process for the crash tests of the folder transport to start and kill.
//!
//! ```text
//! bus-file-crash-helper publish ROOT QUEUE COUNT BODY_BYTES
//!     publishes persistent messages "<i>:<filler>" and prints "P <i>" once
//!     each is confirmed
//! bus-file-crash-helper hold ROOT QUEUE
//!     takes one delivery, prints "GOT <body>", and waits to be killed
//! bus-file-crash-helper compete ROOT QUEUE
//!     acks deliveries, printing "A <body>" for each, until the queue is
//!     empty and quiet
//! ```

use std::io::Write;
use std::time::Duration;

use bus_core::{Connection, ConnectionExt, ConsumeOptions, Message, QueueOptions};
use bus_file::{FileConnection, FileOptions};
use futures::StreamExt;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = rt.block_on(run(&args)) {
        eprintln!("bus-file-crash-helper: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> bus_core::Result<()> {
    let usage = || bus_core::Error::InvalidArgument(format!("usage: see the source; got {args:?}"));
    let mode = args.get(1).ok_or_else(usage)?;
    let root = args.get(2).ok_or_else(usage)?;
    let queue = args.get(3).ok_or_else(usage)?;
    // Quick rescans for the small cases; the default for the big queue,
    // where each rescan lists thousands of files.
    let options = if mode == "compete" {
        FileOptions::default()
    } else {
        FileOptions::default().with_rescan_interval(Duration::from_millis(100))
    };
    let conn = FileConnection::open_with(root, options).await?;
    let mut out = std::io::stdout().lock();
    match mode.as_str() {
        "publish" => {
            let count: u64 = args.get(4).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            let size: usize = args.get(5).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            conn.declare_queue(queue, QueueOptions::durable()).await?;
            for i in 0..count {
                let mut body = format!("{i}:").into_bytes();
                body.resize(size.max(body.len()), b'x');
                conn.send_to_queue(queue, Message::new(body).persistent())
                    .await?;
                writeln!(out, "P {i}")?;
                out.flush()?;
            }
        }
        "hold" => {
            let mut c = conn.consume(queue, ConsumeOptions::prefetch(1)).await?;
            if let Some(d) = c.next().await {
                let d = d?;
                writeln!(out, "GOT {}", String::from_utf8_lossy(&d.message.body))?;
                out.flush()?;
                // Held unacked until the test kills this process.
                std::future::pending::<()>().await;
            }
        }
        "compete" => {
            let mut c = conn.consume(queue, ConsumeOptions::prefetch(50)).await?;
            loop {
                match tokio::time::timeout(Duration::from_millis(500), c.next()).await {
                    Ok(Some(d)) => {
                        let d = d?;
                        d.ack().await?;
                        writeln!(out, "A {}", String::from_utf8_lossy(&d.message.body))?;
                    }
                    Ok(None) => break,
                    // Quiet: done once nothing is left to take.
                    Err(_) => {
                        if conn.inspect_queue(queue).await?.message_count == 0 {
                            break;
                        }
                    }
                }
            }
            out.flush()?;
            conn.close().await?;
        }
        _ => return Err(usage()),
    }
    Ok(())
}
