//! What every transport and the facade share about URLs: hiding their
//! credentials before they are shown.

/// The URL with everything between `SCHEME://` and the last `@` replaced
/// by `***`, so that no part of a user name or password is ever shown,
/// whatever characters it holds (`amqp://guest:S3CR3T/x@host/` gives
/// `amqp://***@host/`), in every scheme (`file://user:pw@host/p` too). A
/// string without a scheme is treated the same way (`u:p@h` gives `***@h`).
///
/// It errs on the side of hiding: an `@` later in the URL (in a path or a
/// query) hides what comes before it as well. Use it before a URL goes
/// into a log line, an error message or a `Debug` output.
#[must_use]
pub fn redact_url(url: &str) -> String {
    let (prefix, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    match rest.rfind('@') {
        Some(at) => format!("{prefix}***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_are_hidden_whatever_they_hold() {
        for (url, shown) in [
            ("amqp://u:p@h:5672/%2f", "amqp://***@h:5672/%2f"),
            ("amqp://guest:S3CR3T/x@host/", "amqp://***@host/"),
            ("amqp://guest:a?b#c@host/v", "amqp://***@host/v"),
            ("amqp://a:b@c@h/x?y", "amqp://***@h/x?y"),
            (
                "file://user:pw@localhost/srv/bus",
                "file://***@localhost/srv/bus",
            ),
            ("amqps://u:p@h1,h2/vh", "amqps://***@h1,h2/vh"),
            ("u:p@h", "***@h"),
            ("memory://x", "memory://x"),
            ("amqp://h/x", "amqp://h/x"),
            ("no url", "no url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        for secret in ["S3CR3T", "pw", "guest"] {
            assert!(!redact_url(&format!("amqp://guest:{secret}/..@h/")).contains(secret));
        }
    }
}
