//! Fuzzing on stable Rust: every parser that reads input from outside its process, driven by a
//! mutational fuzzer of our own (no nightly toolchain can be installed here, so no libFuzzer
//! or sanitizers): a checked-in corpus per target (`tests/fuzz/corpus/TARGET/`), mutated by
//! bit flips, byte writes, insertions, deletions, duplications, splices between corpus entries
//! and each target's dictionary of tokens; a seed replays a campaign exactly. A panic, or an
//! input taking longer than [`SLOW`], is a finding: the input is written to
//! `target/fuzz-findings/TARGET/` and the campaign stops. It has no coverage feedback: it
//! explores around the corpus, which is why the corpus holds real, varied inputs.
//!
//! `bmfleet-fuzz [TARGET…] --secs N --seed S` runs a campaign (BENCHMARKS.md); the test suite
//! runs each target for a few seconds (`tests/tests/fuzz.rs`).

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bmfleet_agent::plane::tunnel::TunnelRequest;

/// An input that computes longer than this is a finding (a hang in the making).
pub const SLOW: Duration = Duration::from_secs(2);

/// The CPU time this thread has used so far.
fn thread_cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| {
            let (user, system) = (u.user_time(), u.system_time());
            Duration::from_micros(
                (user.tv_sec() + system.tv_sec()) as u64 * 1_000_000
                    + (user.tv_usec() + system.tv_usec()) as u64,
            )
        })
        .unwrap_or_default()
}

/// How long `run` computes on `input`, in this thread's CPU time: an input that took long on
/// the clock is timed again this way, so a busy machine (another campaign, a build) that
/// only delayed it is not a finding.
fn cpu_time_of(run: fn(&[u8]), input: &[u8]) -> Duration {
    let before = thread_cpu_time();
    run(input);
    thread_cpu_time().saturating_sub(before)
}

/// One fuzz target: a name, its dictionary, and what it does with an input.
pub struct Target {
    /// Its name (and corpus directory).
    pub name: &'static str,
    /// Tokens the mutator inserts.
    pub dictionary: &'static [&'static str],
    /// Feeds one input to the code under test (must not panic, whatever the input).
    pub run: fn(&[u8]),
}

fn text(input: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(input)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fn fleet_ca() -> &'static bmfleet_proto::pki::FleetCa {
    static CA: OnceLock<bmfleet_proto::pki::FleetCa> = OnceLock::new();
    CA.get_or_init(|| bmfleet_proto::pki::FleetCa::generate("fuzz CA").expect("a CA"))
}

const TOML_WORDS: &[&str] = &[
    "[fleet]",
    "[[instance]]",
    "[[fleet.windows]]",
    "[[agent]]",
    "[tls]",
    "[enrollment]",
    "[postgresql]",
    "[facts]",
    "[[services.service]]",
    "[network]",
    "[bluemind_api]",
    "=",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "name",
    "origin",
    "target",
    "service_ip",
    "interface",
    "windows",
    "days",
    "start",
    "end",
    "timezone",
    "\"00:00\"",
    "\"23:59\"",
    "\"Europe/Paris\"",
    "\"mon\"",
    "198.18.0.100/24",
    "data_address",
    "address",
    "listen",
    "\"0.0.0.0:7443\"",
    "extra_dirs",
    "data_dirs",
    "extra_data_dirs",
    "\"/\"",
    "\"/etc\"",
    "\"/var/spool/cyrus\"",
    "18446744073709551615",
    "-1",
    "1e309",
    "true",
    "false",
    "\\u0000",
    "bluemind",
    "\"5.x\"",
    "mynetworks",
    "downtime_budget_secs",
    "final_pass_journal",
];

const JSON_WORDS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e999",
    "\"kind\"",
    "\"rsync\"",
    "\"changes\"",
    "\"dump_database\"",
    "\"database_manifest\"",
    "\"grant\"",
    "\"argv\"",
    "\"since\"",
    "\"manifest\"",
    "\"journal_since\"",
    "\"database\"",
    "\"path\"",
    "\"attributes\"",
    "\"mtime\"",
    "\"digest\"",
    "\"dir\"",
    "\"databases\"",
    "\"tables\"",
    "\"password\"",
    "\\u0000",
    "\\ud800",
];

const ARGV_WORDS: &[&str] = &[
    "rsync",
    "--server",
    "--sender",
    "-lHogDtpre.iLsfxCIvu",
    "-R",
    "-L",
    "-s",
    "-e.",
    ".",
    "/",
    "/var/spool/cyrus/",
    "/../",
    "/./",
    "--files-from",
    "bmfleet-journal",
    "bmfleet-config-set",
    "--from0",
    "--bwlimit=",
    "--timeout",
    "--log-file",
    "--",
    "-",
    "--delete-missing-args",
    "--remove-source-files",
    "=",
    " ",
    "\0",
];

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "fleet_file",
            dictionary: TOML_WORDS,
            run: |input| {
                let _ = bmfleet_orchestrator::fleet::FleetFile::parse(&text(input), "fuzz.toml");
            },
        },
        Target {
            name: "agent_config",
            dictionary: TOML_WORDS,
            run: |input| {
                if let Ok(c) =
                    bmfleet_agent::config::AgentConfig::parse(&text(input), Path::new("agent.toml"))
                {
                    // What the agent derives from it at once.
                    for dir in c.facts.extra_data_dirs.iter().chain(&c.facts.data_dirs) {
                        let _ = c.refuse_data_path(dir);
                    }
                }
            },
        },
        Target {
            name: "orchestrator_config",
            dictionary: TOML_WORDS,
            run: |input| {
                let _ = bmfleet_orchestrator::config::OrchestratorConfig::parse(
                    &text(input),
                    Path::new("orchestrator.toml"),
                );
            },
        },
        Target {
            name: "tunnel_request",
            dictionary: JSON_WORDS,
            run: |input| {
                if let Ok(TunnelRequest::Rsync { argv, .. }) =
                    serde_json::from_slice::<TunnelRequest>(input)
                {
                    check_argv(&argv);
                }
            },
        },
        Target {
            name: "rsync_argv",
            dictionary: ARGV_WORDS,
            run: |input| {
                let argv: Vec<String> = text(input)
                    .split([' ', '\0', '\n'])
                    .map(str::to_string)
                    .collect();
                check_argv(&argv);
            },
        },
        Target {
            name: "tunnel_framing",
            dictionary: &["\0", "\u{1}", "\0\0\0\0", "\0\0\u{4}\0", "{\"ok\":true}"],
            run: |input| {
                runtime().block_on(async {
                    let mut source = input;
                    let mut sink = Vec::new();
                    let _ =
                        bmfleet_agent::plane::tunnel::receive_framed(&mut source, &mut sink).await;
                });
            },
        },
        Target {
            name: "manifests",
            dictionary: JSON_WORDS,
            run: |input| {
                let _ = serde_json::from_slice::<bmfleet_agent::files::manifest::PathState>(input);
                let _ = serde_json::from_slice::<bmfleet_agent::db::compare::ManifestReply>(input);
            },
        },
        Target {
            name: "mynetworks",
            dictionary: &[
                ",",
                " ",
                "!",
                "/32",
                "/24",
                "198.18.0.2",
                "198.18.0.3",
                "127.0.0.0/8",
                "\n",
                "::1/128",
                "[",
                "]",
            ],
            run: |input| {
                let text = text(input);
                let mut parts = text.splitn(3, '\n');
                let (value, origin, target) = (
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                );
                let _ = bmfleet_agent::bluemind::post_migration::networks(value);
                let _ =
                    bmfleet_agent::bluemind::post_migration::replace_address(value, origin, target);
            },
        },
        Target {
            name: "bluemind_api",
            dictionary: JSON_WORDS,
            run: |input| {
                // What the agent reads in BlueMind's answers: a LoginResponse, a TaskRef, a
                // SystemConf (then its mynetworks value, as the "mynetworks" target does).
                if let Ok(answer) = serde_json::from_slice::<serde_json::Value>(input) {
                    let _ = bmfleet_agent::bluemind::post_migration::login_key(&answer);
                    let _ = bmfleet_agent::bluemind::post_migration::task_id("/api/x", &answer);
                    if let Ok(value) =
                        bmfleet_agent::bluemind::post_migration::mynetworks_of(&answer)
                    {
                        let _ = bmfleet_agent::bluemind::post_migration::networks(&value);
                    }
                }
            },
        },
        Target {
            name: "join_token",
            dictionary: &["bmj1", ".", "0", "f", "g", "\n", " "],
            run: |input| {
                let _ = bmfleet_orchestrator::enrollment::parse_token(&text(input));
            },
        },
        Target {
            name: "signing_request",
            dictionary: &[
                "-----BEGIN CERTIFICATE REQUEST-----\n",
                "-----END CERTIFICATE REQUEST-----\n",
                "MII",
                "A",
                "=",
                "\n",
            ],
            run: |input| {
                let req = bmfleet_proto::pki::IssueRequest::new(
                    "origin-1",
                    bmfleet_proto::identity::Role::Agent,
                    1,
                );
                let _ = fleet_ca().sign_request(&text(input), &req);
            },
        },
    ]
}

/// The origin's argv check, and what it must guarantee when it accepts: rebuilt, the paths are
/// the clean absolute ones it checked.
fn check_argv(argv: &[String]) {
    if let Ok(args) = bmfleet_agent::files::rsync_args::parse_sender(argv) {
        for p in &args.paths {
            assert!(
                bmfleet_agent::files::rsync_args::clean_absolute(p).is_ok(),
                "accepted an unclean path {p:?}"
            );
        }
        let rebuilt = args.server_argv(&args.paths, Some(Path::new("/list")));
        assert_eq!(rebuilt.first().map(String::as_str), Some("rsync"));
    }
}

/// The campaign's generator, on `usize` ranges.
struct Rng(crate::SeededRng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
}

/// The largest input the mutator makes.
const MAX_INPUT: usize = 64 * 1024;

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], dictionary: &[&str], input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = rng.next() as u8;
            }
            2 => {
                let at = rng.below(len + 1);
                let bytes: Vec<u8> = (0..=rng.below(8)).map(|_| rng.next() as u8).collect();
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(16)).min(len);
                input.drain(at..end);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(64)).min(len);
                let copy = input[at..end].to_vec();
                let to = rng.below(input.len() + 1);
                input.splice(to..to, copy);
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let end = (from + 1 + rng.below(256)).min(other.len());
                    let at = rng.below(len + 1);
                    input.splice(at..at, other[from..end].iter().copied());
                }
            }
            _ if !dictionary.is_empty() => {
                let word = dictionary[rng.below(dictionary.len())].as_bytes();
                let at = rng.below(len + 1);
                input.splice(at..at, word.iter().copied());
            }
            _ => {}
        }
    }
    input.truncate(MAX_INPUT);
}

/// What a campaign found.
#[derive(Debug)]
pub struct Finding {
    /// Panic message, or "slow: N ms".
    pub what: String,
    /// Where the input was written.
    pub input: PathBuf,
}

/// How a campaign went.
#[derive(Debug)]
pub struct Report {
    /// The target.
    pub target: &'static str,
    /// Inputs run.
    pub executions: u64,
    /// Corpus entries read.
    pub corpus: usize,
    /// The first finding, if any (the campaign stops there).
    pub finding: Option<Finding>,
}

/// The corpus of `target` under `dir` (every file, sorted by name).
pub fn corpus(dir: &Path, target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(target))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

/// The checked-in corpus directory.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// Runs `target` for `duration` from `seed`: first every corpus entry as is, then mutations.
/// Findings are written under `findings`.
pub fn campaign(
    target: &Target,
    corpus: &[Vec<u8>],
    duration: Duration,
    seed: u64,
    findings: &Path,
) -> Report {
    let mut rng = Rng(crate::SeededRng::new(seed));
    let started = Instant::now();
    let mut executions = 0u64;
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut finding = None;
    let mut next = 0usize;
    while started.elapsed() < duration || next < corpus.len() {
        let input = if next < corpus.len() {
            next += 1;
            corpus[next - 1].clone()
        } else {
            let mut input = if corpus.is_empty() {
                Vec::new()
            } else {
                corpus[rng.below(corpus.len())].clone()
            };
            mutate(&mut rng, corpus, target.dictionary, &mut input);
            input
        };
        let one = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        executions += 1;
        let took = one.elapsed();
        let what = match outcome {
            Err(panic) => Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into()),
            ),
            Ok(()) if took > SLOW => {
                let cpu = cpu_time_of(target.run, &input);
                (cpu > SLOW).then(|| {
                    format!(
                        "slow: {} ms ({} ms of CPU time)",
                        took.as_millis(),
                        cpu.as_millis()
                    )
                })
            }
            Ok(()) => None,
        };
        if let Some(what) = what {
            let dir = findings.join(target.name);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("seed-{seed}-exec-{executions}"));
            let _ = std::fs::write(&path, &input);
            finding = Some(Finding { what, input: path });
            break;
        }
    }
    std::panic::set_hook(quiet);
    Report {
        target: target.name,
        executions,
        corpus: corpus.len(),
        finding,
    }
}
