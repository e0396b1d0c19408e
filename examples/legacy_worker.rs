//! A legacy-style worker over folders: each plain file dropped into IN gets
//! a result in OUT with the same stem (a JSON object with the input's name
//! and byte count), and the consumed input moves to `IN/done/`.
//!
//! ```text
//! cargo run --features file --example legacy_worker -- IN OUT
//! ```
//!
//! A file counts as complete when it was renamed in, or when `<name>.done`
//! appears, or once its size and modification time have not changed for
//! half a second (legacy writers are not trusted to write atomically). It
//! runs until stopped (Ctrl-C).

use std::path::PathBuf;
use std::time::Duration;

use bus_file::legacy::{Consumed, Inbox, Readiness, ResultWriter};
use futures::StreamExt;

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        eprintln!("usage: legacy_worker IN OUT");
        std::process::exit(2);
    };
    let input = PathBuf::from(input);
    let inbox = Inbox::new(&input)
        .with_readiness(Readiness::Stable(Duration::from_millis(500)))
        .with_consumed(Consumed::MoveTo(input.join("done")));
    let results = ResultWriter::new(&output, "json")?;
    let mut requests = inbox.consume(1).await?;
    println!("serving {} -> {output}", input.display());
    while let Some(delivery) = requests.next().await {
        let delivery = delivery?;
        let name = delivery.routing_key.clone();
        let result = format!(
            "{{\"name\":{},\"bytes\":{}}}\n",
            json_string(&name),
            delivery.message.body.len()
        );
        match results.write(&name, result.as_bytes()).await {
            Ok(path) => {
                delivery.ack().await?;
                println!("{name} -> {}", path.display());
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                inbox.fail(&delivery, &e.to_string()).await?;
            }
        }
    }
    Ok(())
}
