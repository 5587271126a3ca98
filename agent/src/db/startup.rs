//! The relay's screen on PostgreSQL's startup packet: the only connection a target may open
//! to this origin's cluster is a replication connection of its own grant's role.
//!
//! The relay reads the client's first packets itself (PostgreSQL's frontend/backend
//! protocol, version 3.0): an SSL or GSS encryption request is answered "no" (the bytes
//! already ride the agents' mutual TLS), a cancel request or any other protocol is refused,
//! and a startup message is let through only when it names the grant's role as `user`, asks
//! for a replication connection (`replication=true`, a physical standby; `replication=
//! database`, a subscriber, into one of BlueMind's databases and only for a grant that
//! published), and carries no other setting than libpq's walreceiver sends. Everything
//! refused gets a PostgreSQL error (the target's log says why) before anything reaches the
//! cluster. Pure: no I/O here.

/// The longest startup packet accepted (PostgreSQL's own limit is 10,000 bytes).
pub const MAX_STARTUP: usize = 10_000;

const PROTOCOL_3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSS_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// What a first packet is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum First {
    /// An SSL or GSS encryption request: answered `N`, the real startup follows.
    Encryption,
    /// A startup message, its parameters in order.
    Startup(Vec<(String, String)>),
}

/// What the grant lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed<'a> {
    /// The grant's replication role.
    pub role: &'a str,
    /// Logical replication (a subscriber) is allowed: the grant published.
    pub logical: bool,
    /// BlueMind's databases (a logical connection must name one).
    pub databases: &'a [String],
}

/// The kind of replication connection admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// `replication=true`: a physical standby's walreceiver.
    Physical,
    /// `replication=database`: a subscription's worker.
    Logical,
}

/// Reads a first packet's body (after its 4-byte length).
pub fn parse(body: &[u8]) -> Result<First, String> {
    let code = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or("a startup packet shorter than its code")?;
    match code {
        SSL_REQUEST | GSS_REQUEST => Ok(First::Encryption),
        CANCEL_REQUEST => Err("a cancel request (only replication connections are relayed)".into()),
        PROTOCOL_3 => {
            let mut params = Vec::new();
            let mut fields = body[4..].split(|b| *b == 0);
            loop {
                let key = fields.next().ok_or("a startup message without its end")?;
                if key.is_empty() {
                    break;
                }
                let value = fields.next().ok_or("a startup parameter without a value")?;
                let text = |b: &[u8]| {
                    String::from_utf8(b.to_vec())
                        .map_err(|_| "a startup parameter that is not UTF-8".to_string())
                };
                params.push((text(key)?, text(value)?));
            }
            if fields.any(|rest| !rest.is_empty()) {
                return Err("bytes after the startup message's end".into());
            }
            Ok(First::Startup(params))
        }
        other => Err(format!(
            "protocol {}.{} (only 3.0 replication connections are relayed)",
            other >> 16,
            other & 0xffff
        )),
    }
}

/// The settings libpq's walreceiver sends on a logical connection (`options`).
const WALRECEIVER_OPTIONS: [&str; 3] = [
    "datestyle=ISO",
    "intervalstyle=postgres",
    "extra_float_digits=3",
];

/// Checks a startup message's parameters against the grant.
pub fn screen(params: &[(String, String)], allowed: &Allowed) -> Result<Admitted, String> {
    let mut user = None;
    let mut replication = None;
    let mut database = None;
    for (key, value) in params {
        match key.as_str() {
            "user" => user = Some(value.as_str()),
            "replication" => replication = Some(value.as_str()),
            "database" => database = Some(value.as_str()),
            "application_name" | "client_encoding" => {}
            "options" => {
                let mut words = value.split_ascii_whitespace();
                while let Some(word) = words.next() {
                    let setting = match word {
                        "-c" => words.next().unwrap_or(""),
                        w => w.strip_prefix("-c").unwrap_or(w),
                    };
                    if !WALRECEIVER_OPTIONS
                        .iter()
                        .any(|o| o.eq_ignore_ascii_case(setting))
                    {
                        return Err(format!(
                            "the startup option {setting:?} (only a walreceiver's are relayed)"
                        ));
                    }
                }
            }
            other => return Err(format!("the startup parameter {other:?}")),
        }
    }
    let user = user.ok_or("a startup message without a user")?;
    if user != allowed.role {
        return Err(format!(
            "a login as {user:?}: only the grant's replication role is relayed"
        ));
    }
    match replication.map(str::to_ascii_lowercase).as_deref() {
        Some("true" | "on" | "yes" | "1") => Ok(Admitted::Physical),
        Some("database") if !allowed.logical => {
            Err("a logical replication connection under a grant that did not publish".into())
        }
        Some("database") => match database {
            Some(db) if allowed.databases.iter().any(|d| d == db) => Ok(Admitted::Logical),
            Some(db) => Err(format!(
                "a connection to {db:?}, not one of BlueMind's databases"
            )),
            None => Err("a logical replication connection without a database".into()),
        },
        _ => Err("a connection that is not a replication connection".into()),
    }
}

/// A startup packet (length included) carrying `params`.
pub fn packet(params: &[(String, String)]) -> Vec<u8> {
    let mut body = PROTOCOL_3.to_be_bytes().to_vec();
    for (key, value) in params {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A FATAL ErrorResponse (SQLSTATE 28000, invalid authorization) saying `why`.
pub fn refusal(why: &str) -> Vec<u8> {
    let message = format!("bmfleet relay: refused {why}");
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "28000")] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(b'M');
    body.extend(message.bytes().filter(|b| *b != 0));
    body.push(0);
    body.push(0);
    let mut out = vec![b'E'];
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn body(packet: &[u8]) -> &[u8] {
        &packet[4..]
    }

    const DBS: [&str; 2] = ["bj", "bj-data"];

    fn allowed(logical: bool, dbs: &[String]) -> Allowed<'_> {
        Allowed {
            role: "bmfleet_repl_abc",
            logical,
            databases: dbs,
        }
    }

    #[test]
    fn a_walreceivers_startup_passes_and_round_trips() {
        let dbs: Vec<String> = DBS.iter().map(|s| s.to_string()).collect();
        let physical = params(&[
            ("user", "bmfleet_repl_abc"),
            ("replication", "true"),
            ("application_name", "bmfleet"),
        ]);
        let First::Startup(read) = parse(body(&packet(&physical))).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(read, physical);
        assert_eq!(screen(&read, &allowed(false, &dbs)), Ok(Admitted::Physical));
        let logical = params(&[
            ("user", "bmfleet_repl_abc"),
            ("database", "bj-data"),
            ("replication", "database"),
            (
                "options",
                "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3",
            ),
            ("application_name", "bmfleet_sub_abc_1"),
            ("client_encoding", "UTF8"),
        ]);
        assert_eq!(
            screen(&logical, &allowed(true, &dbs)),
            Ok(Admitted::Logical)
        );
    }

    #[test]
    fn anything_but_the_grants_replication_connection_is_refused() {
        let dbs: Vec<String> = DBS.iter().map(|s| s.to_string()).collect();
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a str);
        let cases: [Case; 9] = [
            (
                &[("user", "bj"), ("database", "bj")],
                true,
                "only the grant's",
            ),
            (
                &[("user", "bj"), ("replication", "true")],
                true,
                "only the grant's",
            ),
            (
                &[
                    ("user", "postgres"),
                    ("replication", "database"),
                    ("database", "bj"),
                ],
                true,
                "only the grant's",
            ),
            (
                &[("user", "bmfleet_repl_abc"), ("database", "bj")],
                true,
                "not a replication",
            ),
            (
                &[("user", "bmfleet_repl_abc"), ("replication", "false")],
                true,
                "not a replication",
            ),
            (
                &[
                    ("user", "bmfleet_repl_abc"),
                    ("replication", "database"),
                    ("database", "bj"),
                ],
                false,
                "did not publish",
            ),
            (
                &[
                    ("user", "bmfleet_repl_abc"),
                    ("replication", "database"),
                    ("database", "postgres"),
                ],
                true,
                "not one of BlueMind's",
            ),
            (
                &[
                    ("user", "bmfleet_repl_abc"),
                    ("replication", "true"),
                    ("options", "-c session_preload_libraries=/x.so"),
                ],
                true,
                "session_preload_libraries",
            ),
            (
                &[
                    ("user", "bmfleet_repl_abc"),
                    ("replication", "true"),
                    ("_pq_.x", "1"),
                ],
                true,
                "_pq_.x",
            ),
        ];
        for (pairs, logical, why) in cases {
            let error = screen(&params(pairs), &allowed(logical, &dbs)).unwrap_err();
            assert!(error.contains(why), "{pairs:?}: {error}");
        }
    }

    #[test]
    fn other_first_packets_are_told_apart() {
        assert_eq!(parse(&SSL_REQUEST.to_be_bytes()), Ok(First::Encryption));
        assert_eq!(parse(&GSS_REQUEST.to_be_bytes()), Ok(First::Encryption));
        let mut cancel = CANCEL_REQUEST.to_be_bytes().to_vec();
        cancel.extend([0; 8]);
        assert!(parse(&cancel).unwrap_err().contains("cancel"));
        assert!(parse(&(2u32 << 16).to_be_bytes())
            .unwrap_err()
            .contains("protocol 2.0"));
        assert!(parse(&[0, 3]).is_err());
        let mut unterminated = PROTOCOL_3.to_be_bytes().to_vec();
        unterminated.extend(b"user\0bj");
        assert!(parse(&unterminated).is_err());
        let refused = refusal("a login as \"bj\"");
        assert_eq!(refused[0], b'E');
        assert_eq!(
            u32::from_be_bytes([refused[1], refused[2], refused[3], refused[4]]) as usize,
            refused.len() - 1
        );
    }
}
