//! Talking to the real mail stack as the internet and mail clients do: SMTP submission
//! (RFC 5321) and a minimal IMAP client (RFC 9051: LOGIN, SELECT, UID SEARCH, UID STORE,
//! UID MOVE, EXPUNGE, FETCH of flags and Message-ID). The lab's traffic
//! ([`crate::mail_traffic`]) drives Postfix and Cyrus with them while passes run; the checks
//! read what the target serves with them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

/// An SMTP session (RFC 5321) with a mail server, greeted and EHLO said: messages are
/// submitted one after the other on it.
pub struct Smtp {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

/// A connection to `address` made within `limit`, each read within three times it: its
/// reading and writing halves.
fn connect(
    protocol: &str,
    address: std::net::SocketAddr,
    limit: Duration,
) -> Result<(BufReader<std::net::TcpStream>, std::net::TcpStream), String> {
    let stream = std::net::TcpStream::connect_timeout(&address, limit)
        .map_err(|e| format!("{protocol} {address}: {e}"))?;
    stream
        .set_read_timeout(Some(limit * 3))
        .map_err(|e| e.to_string())?;
    let writer = stream.try_clone().map_err(|e| e.to_string())?;
    Ok((BufReader::new(stream), writer))
}

impl Smtp {
    /// Connects to `address` within `limit` (each reply within three times it).
    pub fn connect(address: std::net::SocketAddr, limit: Duration) -> Result<Smtp, String> {
        let (reader, writer) = connect("SMTP", address, limit)?;
        let mut smtp = Smtp { reader, writer };
        smtp.expect("220")?;
        smtp.say("EHLO generator.sender.lab.example")?;
        smtp.expect("250")?;
        Ok(smtp)
    }

    fn say(&mut self, line: &str) -> Result<(), String> {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| format!("SMTP: {e}"))
    }

    /// Reads one reply (a multi-line reply's last line has a space after its code) and
    /// requires its code.
    fn expect(&mut self, code: &str) -> Result<String, String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("SMTP: {e}"))?
                == 0
            {
                return Err(format!("SMTP closed after {all:?}"));
            }
            all += &line;
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                break;
            }
        }
        if all.starts_with(code) {
            Ok(all)
        } else {
            Err(format!("SMTP: wanted {code}, got {:?}", all.trim()))
        }
    }

    /// Submits `message` from `from` to `to`: Ok once the server took responsibility for it
    /// (its 250 after the data).
    pub fn send(&mut self, from: &str, to: &str, message: &str) -> Result<(), String> {
        self.say(&format!("MAIL FROM:<{from}>"))?;
        self.expect("250")?;
        self.say(&format!("RCPT TO:<{to}>"))?;
        self.expect("250")?;
        self.say("DATA")?;
        self.expect("354")?;
        let body = message.replace("\r\n.", "\r\n..");
        self.say(&format!("{body}\r\n."))?;
        self.expect("250")?;
        Ok(())
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.writer.write_all(b"QUIT\r\n");
    }
}

/// An IMAP session, logged in.
pub struct Imap {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    tag: u32,
}

impl Imap {
    /// Connects to `address` (the banner read) and logs `user` in with `password`.
    pub fn login(
        address: std::net::SocketAddr,
        user: &str,
        password: &str,
    ) -> Result<Imap, String> {
        Self::login_within(address, user, password, Duration::from_secs(5))
    }

    /// As [`Imap::login`], connecting within `limit` and each read within three times it.
    pub fn login_within(
        address: std::net::SocketAddr,
        user: &str,
        password: &str,
        limit: Duration,
    ) -> Result<Imap, String> {
        let (reader, writer) = connect("IMAP", address, limit)?;
        let mut imap = Imap {
            reader,
            writer,
            tag: 0,
        };
        let mut banner = String::new();
        imap.reader
            .read_line(&mut banner)
            .map_err(|e| format!("IMAP {address} banner: {e}"))?;
        if !banner.starts_with("* OK") {
            return Err(format!("IMAP {address} greeted {banner:?}"));
        }
        imap.command(&format!("LOGIN {user} {password}"))?;
        Ok(imap)
    }

    /// Runs one command; returns its untagged responses (literals inlined) or the
    /// server's refusal.
    pub fn command(&mut self, command: &str) -> Result<String, String> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        self.writer
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err(format!("IMAP closed during {command:?}"));
            }
            // A literal {n} at the line's end: n bytes follow, then the line goes on.
            if let Some(n) = line
                .trim_end()
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<usize>().ok())
            {
                out += &line;
                let mut literal = vec![0u8; n];
                self.reader
                    .read_exact(&mut literal)
                    .map_err(|e| e.to_string())?;
                out += &String::from_utf8_lossy(&literal);
                continue;
            }
            if let Some(status) = line.strip_prefix(&format!("{tag} ")) {
                return if status.starts_with("OK") {
                    Ok(out)
                } else {
                    Err(format!("IMAP {command:?}: {}", status.trim_end()))
                };
            }
            out += &line;
        }
    }

    /// The UID of the message with `message_id` in the selected mailbox, if any.
    pub fn uid_of(&mut self, message_id: &str) -> Result<Option<u32>, String> {
        let found = self.command(&format!("UID SEARCH HEADER Message-ID \"{message_id}\""))?;
        Ok(found
            .lines()
            .find_map(|l| l.strip_prefix("* SEARCH"))
            .and_then(|uids| uids.split_whitespace().next()?.parse().ok()))
    }

    /// Every message of `folder`: Message-ID → its flags (sorted, `\Recent` left out), and
    /// how many messages carried each Message-ID.
    pub fn messages(&mut self, folder: &str) -> Result<Vec<(String, Vec<String>)>, String> {
        let selected = self.command(&format!("SELECT {folder}"))?;
        let exists = selected
            .lines()
            .find_map(|l| {
                l.strip_prefix("* ")?
                    .strip_suffix(" EXISTS\r")
                    .or_else(|| l.strip_prefix("* ")?.strip_suffix(" EXISTS"))
            })
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if exists == 0 {
            return Ok(Vec::new());
        }
        let fetched = self.command("FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")?;
        let mut out = Vec::new();
        for item in fetched.split("\r\n* ").map(|i| i.trim_start_matches("* ")) {
            let flags = item
                .split_once("FLAGS (")
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(f, _)| {
                    let mut f: Vec<String> = f
                        .split_whitespace()
                        .filter(|x| *x != "\\Recent")
                        .map(str::to_string)
                        .collect();
                    f.sort();
                    f
                })
                .unwrap_or_default();
            let id = item.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("message-id")
                    .then(|| value.trim().to_string())
            });
            if let Some(id) = id {
                out.push((id, flags));
            }
        }
        Ok(out)
    }
}

impl Drop for Imap {
    fn drop(&mut self) {
        let _ = self.writer.write_all(b"zz LOGOUT\r\n");
    }
}

/// What a user's mailboxes hold: Message-ID → every (folder, flags) it appears as.
pub type Served = BTreeMap<String, Vec<(String, Vec<String>)>>;

/// Reads `user`'s INBOX and Archive at `address`.
pub fn served(address: std::net::SocketAddr, user: &str) -> Result<Served, String> {
    let mut imap = Imap::login(address, user, "lab")?;
    let mut all = Served::new();
    for folder in ["INBOX", "Archive"] {
        for (id, flags) in imap.messages(folder)? {
            all.entry(id).or_default().push((folder.to_string(), flags));
        }
    }
    Ok(all)
}
