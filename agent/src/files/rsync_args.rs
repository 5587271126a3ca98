//! What the origin lets a target's rsync ask for: the argv of `rsync --server --sender`,
//! parsed and checked against an allow-list, then rebuilt by the origin itself. Pure.
//!
//! rsync runs its remote half as `rsync --server [--sender] <flags> [long options] . <paths>`.
//! Only the sender (a pull from this host) is served; every option that could write to the
//! origin, read files outside the grant, or hide the paths from this check is refused.

use std::path::{Path, PathBuf};

/// Short flags the sender may receive (before `e.` in the flag cluster).
/// Refused among others: `L` and `k` (follow symlinks out of the tree), `s` (paths sent
/// inside the protocol stream, out of this check's sight).
/// `I` (`--ignore-times`) only makes the sender send every listed file.
const ALLOWED_FLAGS: &str = "lHogDtprRvcdzxnOJAXSWNI";
/// Protocol capability letters (after `e.`).
const ALLOWED_CAPABILITIES: &str = "iLsfxCIvu";
/// Long options the sender may receive, with whether they take a value.
const ALLOWED_LONG: &[(&str, bool)] = &[
    ("--bwlimit", true),
    ("--timeout", true),
    ("--numeric-ids", false),
    ("--files-from", true),
    ("--from0", false),
    ("--size-only", false),
    ("--ignore-times", false),
    ("--compress-level", true),
    ("--checksum-choice", true),
    ("--compress-choice", true),
    ("--no-implied-dirs", false),
    ("--delete-missing-args", false),
];

/// rsync's I/O timeout on both ends of a transfer, seconds: a peer that stops sending for this
/// long ends the transfer (and frees its child) instead of holding it forever.
pub const IO_TIMEOUT_SECS: u32 = 600;

/// rsync's `--timeout` option with [`IO_TIMEOUT_SECS`].
pub fn timeout_option() -> String {
    format!("--timeout={IO_TIMEOUT_SECS}")
}

/// The `--files-from` value that asks for the BlueMind configuration file set, which the
/// origin lists itself (the target never names an origin file).
pub const CONFIG_SET_TOKEN: &str = "bmfleet-config-set";

/// The `--files-from` value that asks for the paths the origin's change journal recorded
/// since a full pass (the origin lists them itself, from its own journal).
pub const JOURNAL_TOKEN: &str = "bmfleet-journal";

/// The `--files-from` value that asks for the origin's Postfix queue files (listed by the
/// origin from its own queue directory; served under a config-set grant, at cold sync).
pub const MAIL_QUEUE_TOKEN: &str = "bmfleet-mail-queue";
/// Why a sender invocation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// Not an rsync server command at all.
    #[error("not an rsync server command: {0}")]
    NotRsync(String),
    /// `--server` without `--sender`: the client would push into the origin.
    #[error("refused: rsync --server without --sender would write into the origin; only pulls are served")]
    NotSender,
    /// An option outside the allow-list.
    #[error("refused: rsync option {0} is not allowed by the origin")]
    Option(String),
    /// A short flag outside the allow-list.
    #[error("refused: rsync flag -{0} is not allowed by the origin")]
    Flag(char),
    /// A malformed option value.
    #[error("refused: invalid value for {option}: {value}")]
    Value {
        /// The option.
        option: String,
        /// The value.
        value: String,
    },
    /// No `.` separator or no path after it.
    #[error("refused: no source path in the rsync command")]
    NoPath,
    /// A word rsync would read as a path where this parser expects an option: a bare `-`
    /// (popt's name for "not an option") or `--` (the end of options).
    #[error("refused: rsync would read {0:?} as a path (rsync then serves its working directory); only absolute paths after '.' are served")]
    Positional(String),
    /// A path that is not a clean absolute path.
    #[error("refused: path {0:?} must be absolute, without '.', '..', '\\\\' or NUL")]
    Path(String),
}

/// A checked sender invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderArgs {
    /// The flag cluster and long options, as the origin will pass them.
    pub options: Vec<String>,
    /// The requested BlueMind paths, with the trailing slash kept as asked.
    pub paths: Vec<String>,
    /// `--files-from` named the configuration file set.
    pub config_set: bool,
    /// `--files-from` named the change journal's paths.
    pub journal: bool,
    /// `--files-from` named the Postfix queue's files.
    pub mail_queue: bool,
    /// `-R`: the paths are sent relative (with their directories), so the origin passes
    /// them as `ROOT/./PATH`.
    pub relative: bool,
}

impl SenderArgs {
    /// The full argv of the origin's `rsync --server --sender`, with `paths` replaced by
    /// the host paths and the `--files-from` token by the origin's own list file.
    pub fn server_argv(&self, host_paths: &[String], list: Option<&Path>) -> Vec<String> {
        let mut argv = vec!["rsync".into(), "--server".into(), "--sender".into()];
        let mut options = self.options.iter();
        while let Some(opt) = options.next() {
            // The origin sets its own I/O timeout, whatever the target asked.
            if opt.starts_with("--timeout=") {
                continue;
            }
            argv.push(opt.clone());
            if opt == "--files-from" {
                options.next();
                argv.push(list.map(|p| p.display().to_string()).unwrap_or_default());
            }
        }
        argv.push(timeout_option());
        argv.push(".".into());
        argv.extend(host_paths.iter().cloned());
        argv
    }
}

/// Parses and checks the remote command rsync gave its remote shell.
pub fn parse_sender(argv: &[String]) -> Result<SenderArgs, ArgError> {
    let words: Vec<&str> = argv.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["rsync", "--server", "--sender", rest @ ..] => parse_rest(rest),
        ["rsync", "--server", ..] => Err(ArgError::NotSender),
        _ => Err(ArgError::NotRsync(argv.join(" "))),
    }
}

fn parse_rest(rest: &[&str]) -> Result<SenderArgs, ArgError> {
    let mut options = Vec::new();
    let mut config_set = false;
    let mut journal = false;
    let mut mail_queue = false;
    let mut relative = false;
    let mut i = 0;
    while i < rest.len() && rest[i] != "." {
        let word = rest[i];
        if word == "-" || word == "--" {
            return Err(ArgError::Positional(word.to_string()));
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (format!("--{n}"), Some(v)),
                None => (word.to_string(), None),
            };
            let takes_value = ALLOWED_LONG
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| ArgError::Option(name.clone()))?;
            let value = match (takes_value, inline) {
                (false, None) => None,
                (false, Some(_)) => return Err(ArgError::Option(word.to_string())),
                (true, Some(v)) => Some(v.to_string()),
                (true, None) => {
                    i += 1;
                    Some(rest.get(i).ok_or(ArgError::NoPath)?.to_string())
                }
            };
            if name == "--files-from" {
                // One list per transfer.
                let first = !(config_set || journal || mail_queue);
                let token = match value.as_deref() {
                    Some(CONFIG_SET_TOKEN) if first => {
                        config_set = true;
                        CONFIG_SET_TOKEN
                    }
                    Some(JOURNAL_TOKEN) if first => {
                        journal = true;
                        JOURNAL_TOKEN
                    }
                    Some(MAIL_QUEUE_TOKEN) if first => {
                        mail_queue = true;
                        MAIL_QUEUE_TOKEN
                    }
                    _ => {
                        return Err(ArgError::Value {
                            option: name,
                            value: value.unwrap_or_default(),
                        })
                    }
                };
                options.push(name);
                options.push(token.to_string());
            } else {
                if let Some(v) = &value {
                    if !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".,-_".contains(c))
                    {
                        return Err(ArgError::Value {
                            option: name,
                            value: v.clone(),
                        });
                    }
                }
                options.push(match value {
                    Some(v) => format!("{name}={v}"),
                    None => name,
                });
            }
        } else if let Some(cluster) = word.strip_prefix('-') {
            let (flags, capabilities) = match cluster.split_once("e.") {
                Some((f, c)) => (f, Some(c)),
                None => (cluster, None),
            };
            if let Some(bad) = flags.chars().find(|c| !ALLOWED_FLAGS.contains(*c)) {
                return Err(ArgError::Flag(bad));
            }
            relative |= flags.contains('R');
            if let Some(bad) = capabilities
                .unwrap_or("")
                .chars()
                .find(|c| !ALLOWED_CAPABILITIES.contains(*c))
            {
                return Err(ArgError::Option(format!("-e.{bad} (protocol capability)")));
            }
            options.push(word.to_string());
        } else {
            return Err(ArgError::Option(word.to_string()));
        }
        i += 1;
    }
    let paths: Vec<String> = rest
        .get(i + 1..)
        .unwrap_or(&[])
        .iter()
        .map(|p| p.to_string())
        .collect();
    if i >= rest.len() || paths.is_empty() {
        return Err(ArgError::NoPath);
    }
    for p in &paths {
        clean_absolute(p)?;
    }
    Ok(SenderArgs {
        options,
        paths,
        config_set,
        journal,
        mail_queue,
        relative,
    })
}

/// [`crate::plane::grants::clean_absolute`], refused as an rsync argument.
pub fn clean_absolute(p: &str) -> Result<PathBuf, ArgError> {
    crate::plane::grants::clean_absolute(p).map_err(|_| ArgError::Path(p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn a_journal_pass_names_the_token_and_the_origin_lists_the_paths() {
        let parsed = parse_sender(&argv(
            "rsync --server --sender -lHogDtpAXIRSe.LsfxCIvu --delete-missing-args --files-from bmfleet-journal --from0 --no-implied-dirs . /",
        ))
        .unwrap();
        assert!(parsed.journal && !parsed.config_set);
        assert_eq!(
            parsed.server_argv(&["/lab/o1/".into()], Some(Path::new("/run/list"))),
            argv("rsync --server --sender -lHogDtpAXIRSe.LsfxCIvu --delete-missing-args --files-from /run/list --from0 --no-implied-dirs --timeout=600 . /lab/o1/")
        );
        // One list per run: a second --files-from is refused.
        assert!(parse_sender(&argv(
            "rsync --server --sender -Re.LsfxCIvu --files-from bmfleet-journal --files-from bmfleet-config-set . /",
        ))
        .is_err());
    }

    #[test]
    fn a_pull_as_rsync_sends_it_is_accepted_and_rebuilt() {
        let parsed = parse_sender(&argv(
            "rsync --server --sender -lHogDtpre.iLsfxCIvu --bwlimit=1000 . /var/spool/cyrus/",
        ))
        .unwrap();
        assert_eq!(parsed.paths, ["/var/spool/cyrus/"]);
        assert!(!parsed.config_set);
        assert_eq!(
            parsed.server_argv(&["/lab/o1/var/spool/cyrus/".into()], None),
            argv("rsync --server --sender -lHogDtpre.iLsfxCIvu --bwlimit=1000 --timeout=600 . /lab/o1/var/spool/cyrus/")
        );
    }

    #[test]
    fn the_config_set_is_named_by_token_and_replaced_by_the_origin_list() {
        let parsed = parse_sender(&argv(
            "rsync --server --sender -logDtpRe.LsfxCIvu --files-from bmfleet-config-set . /",
        ))
        .unwrap();
        assert!(parsed.config_set && !parsed.mail_queue);
        let queue = parse_sender(&argv(
            "rsync --server --sender -logDtpRe.LsfxCIvu --files-from bmfleet-mail-queue --from0 . /",
        ))
        .unwrap();
        assert!(queue.mail_queue && !queue.config_set && !queue.journal);
        assert_eq!(
            parsed.server_argv(&["/lab/o1/".into()], Some(Path::new("/run/list"))),
            argv("rsync --server --sender -logDtpRe.LsfxCIvu --files-from /run/list --timeout=600 . /lab/o1/")
        );
    }

    #[test]
    fn a_bare_dash_is_refused_by_name() {
        // rsync reads "-" as its directory argument and "." as a path: the agent's cwd.
        assert_eq!(
            parse_sender(&argv(
                "rsync --server --sender -logDtprRe.iLsfxCIvu - . /var/spool/cyrus/"
            ))
            .unwrap_err(),
            ArgError::Positional("-".into())
        );
        assert_eq!(
            parse_sender(&argv("rsync --server --sender -lr -- . /var/spool/cyrus/")).unwrap_err(),
            ArgError::Positional("--".into())
        );
    }

    /// What rsync itself reads as paths from a server argv, modelled on popt as rsync uses it,
    /// independently of the parser: `--` ends options; `-` alone and words not starting with
    /// `-` are arguments; a long option's value is inline (`=`) or the next word; in a short
    /// cluster, a letter taking a value (`e`, `B`, `T`, `f`, `M`, `@`) takes the cluster's
    /// rest or the next word. The first argument is a directory (rsync chdirs into it without
    /// -R), the others the paths sent; with none, rsync sends ".".
    fn rsync_reads(argv: &[String]) -> Vec<String> {
        const LONG_WITH_VALUE: &[&str] = &[
            "--bwlimit",
            "--timeout",
            "--files-from",
            "--compress-level",
            "--checksum-choice",
            "--compress-choice",
            "--log-file",
            "--write-batch",
        ];
        let mut positional = Vec::new();
        let mut words = argv.iter().skip(1);
        while let Some(w) = words.next() {
            if w == "--" {
                positional.extend(words.by_ref().cloned());
            } else if let Some(long) = w.strip_prefix("--") {
                if !long.contains('=') && LONG_WITH_VALUE.contains(&w.as_str()) {
                    words.next();
                }
            } else if w.len() > 1 && w.starts_with('-') {
                let cluster: Vec<char> = w[1..].chars().collect();
                for (k, c) in cluster.iter().enumerate() {
                    if "eBTfM@".contains(*c) {
                        if k + 1 == cluster.len() {
                            words.next();
                        }
                        break;
                    }
                }
            } else {
                positional.push(w.clone());
            }
        }
        let mut reads: Vec<String> = positional.into_iter().collect();
        if reads.len() == 1 {
            reads.push(".".into());
        }
        reads
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// Random and hostile argv: whatever the parser accepts, rsync reads "." as its
        /// directory and, as paths, exactly the clean absolute paths the parser checked.
        #[test]
        fn accepted_argv_lists_only_checked_paths(
            options in proptest::collection::vec(proptest::sample::select(vec![
                "-", "--", "-lHogDtprRe.iLsfxCIvu", "-lre", "-e.iLsfxCIvu", "-e", "-lr", "-R",
                "-L", "-ve.", "--bwlimit", "--bwlimit=100", "--timeout", "--timeout=30",
                "--files-from", "--files-from=bmfleet-config-set", "bmfleet-config-set",
                "--files-from=bmfleet-journal", "bmfleet-journal", "--delete-missing-args",
                "-I", "-lHIe.iLsfxCIvu",
                "--from0", "--numeric-ids", "--numeric-ids=1", "--log-file", "100", ".",
            ]), 0..6),
            separator in proptest::sample::select(vec![".", "-", "--", "/etc", "x"]),
            paths in proptest::collection::vec(proptest::sample::select(vec![
                "/var/spool/cyrus/", "/var/spool/cyrus/sub", "/etc", "/", ".", "-", "--",
                "/var/spool/cyrus/../../etc", "x", "-lr", "--bwlimit", "--files-from",
            ]), 0..4),
        ) {
            let mut full = argv("rsync --server --sender");
            full.extend(options.iter().map(|w| w.to_string()));
            full.push(separator.to_string());
            full.extend(paths.iter().map(|w| w.to_string()));
            if let Ok(args) = parse_sender(&full) {
                let server = args.server_argv(&args.paths, None);
                let reads = rsync_reads(&server[..]);
                proptest::prop_assert_eq!(&reads[0], ".");
                proptest::prop_assert_eq!(
                    server.iter().filter(|w| w.starts_with("--timeout")).collect::<Vec<_>>(),
                    vec!["--timeout=600"]
                );
                proptest::prop_assert_eq!(&reads[1..], &args.paths[..]);
                for p in &args.paths {
                    proptest::prop_assert!(clean_absolute(p).is_ok(), "{}", p);
                }
                // And what the target sent reads the same paths, whatever rsync made of it.
                let sent = rsync_reads(&full[..]);
                proptest::prop_assert_eq!(&sent[1..], &args.paths[..]);
            }
        }
    }

    #[test]
    fn refusals_name_what_was_refused() {
        let cases: &[(&str, ArgError)] = &[
            (
                "rsync --server -lHogDtpre.iLsfxCIvu . /var/spool/cyrus/",
                ArgError::NotSender,
            ),
            ("sh -c id", ArgError::NotRsync("sh -c id".into())),
            (
                "rsync --server --sender --remove-source-files -lr . /var/spool/cyrus/",
                ArgError::Option("--remove-source-files".into()),
            ),
            (
                "rsync --server --sender --log-file=/etc/passwd -lr . /x",
                ArgError::Option("--log-file".into()),
            ),
            (
                "rsync --server --sender --write-batch=/tmp/b -lr . /x",
                ArgError::Option("--write-batch".into()),
            ),
            (
                "rsync --server --sender -slHogDtpre.iLsfxCIvu",
                ArgError::Flag('s'),
            ),
            (
                "rsync --server --sender -Lre.iLsfxCIvu . /x",
                ArgError::Flag('L'),
            ),
            (
                "rsync --server --sender -kre.iLsfxCIvu . /x",
                ArgError::Flag('k'),
            ),
            (
                "rsync --server --sender -lre.iLsfxCIvu --files-from /etc/shadow . /",
                ArgError::Value {
                    option: "--files-from".into(),
                    value: "/etc/shadow".into(),
                },
            ),
            ("rsync --server --sender -lre.iLsfxCIvu .", ArgError::NoPath),
            (
                "rsync --server --sender -lre.iLsfxCIvu . /var/spool/cyrus/../../etc",
                ArgError::Path("/var/spool/cyrus/../../etc".into()),
            ),
            (
                "rsync --server --sender -lre.iLsfxCIvu . var/spool",
                ArgError::Path("var/spool".into()),
            ),
            (
                "rsync --server --sender -lre.iLsfxCIvu --timeout=1;id . /x",
                ArgError::Value {
                    option: "--timeout".into(),
                    value: "1;id".into(),
                },
            ),
        ];
        for (cmd, expected) in cases {
            assert_eq!(parse_sender(&argv(cmd)).unwrap_err(), *expected, "{cmd}");
        }
    }
}
