//! The data plane on real rsync and real PostgreSQL over loopback: a target agent pulls from
//! an origin agent through the grant-scoped mutual-TLS tunnel.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bmfleet_agent::config::{AgentConfig, PostgresConfig};
use bmfleet_agent::plane::tunnel::{self, TunnelError, TunnelRequest};
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{LocalIdentity, TlsFiles};
use bmfleet_proto::v1::agent_client::AgentClient;
use bmfleet_proto::v1::{
    CopyConfigRequest, DumpFormat, EndFollowingRequest, FollowDatabasesReply,
    FollowDatabasesRequest, GrantRequest, MoveDatabasesReply, MoveDatabasesRequest, OriginEndpoint,
    PullEvent, PullRequest,
};
use bmfleet_tests::{
    agent_client, agent_config, free_port, open_tempdir, serve_agent, tool, PgCluster, Served,
    TestPki,
};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

const SPOOL: &str = "/var/spool/cyrus";

struct Pair {
    pki: TestPki,
    dir: tempfile::TempDir,
    origin_config: AgentConfig,
    target_config: AgentConfig,
    target_files: TlsFiles,
    origin: AgentClient<Channel>,
    target: AgentClient<Channel>,
    data_address: String,
    _agents: (Served, Served),
}

impl Pair {
    async fn new(origin_pg: Option<&PgCluster>, target_pg: Option<&PgCluster>) -> Pair {
        Pair::with_settings(
            origin_pg.map(PgCluster::agent_settings),
            target_pg.map(PgCluster::agent_settings),
        )
        .await
    }

    /// A pair whose agents use these PostgreSQL settings.
    async fn with_settings(
        origin_pg: Option<PostgresConfig>,
        target_pg: Option<PostgresConfig>,
    ) -> Pair {
        let pki = TestPki::new();
        let dir = open_tempdir();
        let origin_files = pki.issue("origin-1", Role::Agent);
        let target_files = pki.issue("target-1", Role::Agent);
        let mut origin_config = agent_config(origin_files, &dir.path().join("origin"), vec![]);
        let data_address = format!("127.0.0.1:{}", free_port());
        origin_config.data_listen = Some(data_address.parse().unwrap());
        let mut target_config =
            agent_config(target_files.clone(), &dir.path().join("target"), vec![]);
        if let Some(pg) = origin_pg {
            origin_config.postgresql = pg;
        }
        if let Some(pg) = target_pg {
            target_config.postgresql = pg;
        }
        target_config.config_set.postmap_command = vec![
            "sh".into(),
            "-c".into(),
            "printf 'rebuilt from %s\\n' \"$0\" > \"$0.db\"".into(),
        ];
        for c in [&origin_config, &target_config] {
            std::fs::create_dir_all(&c.data_root).unwrap();
            std::fs::create_dir_all(&c.state_dir).unwrap();
            std::fs::set_permissions(
                c.state_dir.parent().unwrap(),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
        }
        let origin_agent = serve_agent(origin_config.clone()).await;
        let target_agent = serve_agent(target_config.clone()).await;
        let orch = pki.issue("orchestrator", Role::Orchestrator);
        let origin = agent_client(
            &pki.ca_path(),
            Some(&orch),
            Role::Orchestrator,
            origin_agent.addr,
            "origin-1",
        );
        let target = agent_client(
            &pki.ca_path(),
            Some(&orch),
            Role::Orchestrator,
            target_agent.addr,
            "target-1",
        );
        Pair {
            pki,
            dir,
            origin_config,
            target_config,
            target_files,
            origin,
            target,
            data_address,
            _agents: (origin_agent, target_agent),
        }
    }

    fn origin_root(&self) -> PathBuf {
        self.origin_config.data_root.clone()
    }

    fn target_root(&self) -> PathBuf {
        self.target_config.data_root.clone()
    }

    async fn grant(&mut self, id: &str, target: &str, paths: &[&str], expires_in_ms: i64) {
        self.grant_with(GrantRequest {
            grant_id: id.into(),
            target_name: target.into(),
            migration: "m1".into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            config_set: false,
            databases: false,
            replication: false,
            expires_at_unix_ms: bmfleet_agent::plane::grants::now_ms() + expires_in_ms,
        })
        .await;
    }

    async fn grant_with(&mut self, req: GrantRequest) {
        self.origin.grant(req).await.expect("grant");
    }

    fn endpoint(&self, grant: &str) -> OriginEndpoint {
        OriginEndpoint {
            address: self.data_address.clone(),
            name: "origin-1".into(),
            grant_id: grant.into(),
        }
    }

    /// Pulls and returns the final event (and how many progress events came before it).
    async fn pull(&mut self, op: &str, grant: &str, bwlimit_kib: u32) -> (PullEvent, usize) {
        let mut stream = self
            .target
            .pull(PullRequest {
                operation_id: op.into(),
                origin: Some(self.endpoint(grant)),
                path: SPOOL.into(),
                bwlimit_kib,
                paths: vec![],
                compress: false,
                journal_since: String::new(),
                carry_since: String::new(),
                first_pass: false,
            })
            .await
            .expect("pull")
            .into_inner();
        let mut progress = 0;
        while let Some(event) = stream.message().await.expect("pull stream") {
            if event.done {
                return (event, progress);
            }
            progress += 1;
        }
        panic!("the pull stream ended without a final event");
    }

    /// Sends `request` to the target and returns the pull's final event.
    async fn pull_request(&mut self, request: PullRequest) -> PullEvent {
        let mut stream = self.target.pull(request).await.expect("pull").into_inner();
        let mut last = None;
        while let Some(e) = stream.message().await.expect("pull stream") {
            last = Some(e);
        }
        last.expect("a final event")
    }

    /// Opens a tunnel to the origin as `who` (an identity file set and its role).
    async fn tunnel_as(
        &self,
        who: &TlsFiles,
        role: Role,
        request: TunnelRequest,
    ) -> Result<tunnel::Tunnel, TunnelError> {
        let tls = LocalIdentity::load(who, role)
            .unwrap()
            .client_config(Role::Agent)
            .unwrap();
        tunnel::open(
            &self.endpoint("unused"),
            tls,
            &request,
            Duration::from_secs(10),
        )
        .await
    }

    /// A second origin agent serving the origin's host with a configuration of the attacker's
    /// choosing (a compromised host controls its own agent.toml), holding the real origin
    /// certificate; a grant is registered on it for `target-1`.
    async fn hostile_origin(
        &self,
        configure: impl FnOnce(&mut AgentConfig),
        grant: GrantRequest,
    ) -> (Served, OriginEndpoint) {
        let mut hostile = self.origin_config.clone();
        hostile.state_dir = self.dir.path().join("hostile-state");
        std::fs::create_dir_all(&hostile.state_dir).unwrap();
        let data = format!("127.0.0.1:{}", free_port());
        hostile.data_listen = Some(data.parse().unwrap());
        hostile.listen = "127.0.0.1:0".parse().unwrap();
        configure(&mut hostile);
        let agent = serve_agent(hostile).await;
        let orch = self.pki.issue("orchestrator", Role::Orchestrator);
        let mut client = bmfleet_tests::agent_client(
            &self.pki.ca_path(),
            Some(&orch),
            Role::Orchestrator,
            agent.addr,
            "origin-1",
        );
        let grant_id = grant.grant_id.clone();
        client.grant(grant).await.unwrap();
        (
            agent,
            OriginEndpoint {
                address: data,
                name: "origin-1".into(),
                grant_id,
            },
        )
    }

    async fn refused_rsync(&self, grant: &str, argv: &str) -> String {
        let request = TunnelRequest::Rsync {
            grant: grant.into(),
            argv: argv.split(' ').map(str::to_string).collect(),
            journal_since: String::new(),
        };
        match self
            .tunnel_as(&self.target_files, Role::Agent, request)
            .await
        {
            Err(TunnelError::Refused { reason, .. }) => reason,
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("the origin admitted: {argv}"),
        }
    }
}

// ------------------------------------------------------------------ trees

fn write(path: &Path, content: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn nobody() -> (u32, u32) {
    let u = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A cyrus-like spool: hard links across mailboxes, nested folders, odd names, symlinks,
/// empty dirs, files owned by another user.
fn make_spool(root: &Path) {
    let user = root.join("var/spool/cyrus/data/user");
    let msg = |n: usize| {
        format!(
            "From: a@example.net\r\nSubject: {n}\r\n\r\n{}\r\n",
            "x".repeat(n * 37)
        )
        .into_bytes()
    };
    for (i, name) in ["1.", "2.", "3."].iter().enumerate() {
        write(&user.join("alice").join(name), &msg(i + 1), 0o600);
    }
    write(
        &user.join("alice/cyrus.index"),
        &pseudo_random(2048, 1),
        0o600,
    );
    write(&user.join("alice/Sent/1."), &msg(9), 0o600);
    write(&user.join("alice/Archives/2024/1."), &msg(11), 0o640);
    // One message delivered to two mailboxes: a hard link, as cyrus's single-instance store.
    std::fs::create_dir_all(user.join("bob")).unwrap();
    std::fs::hard_link(user.join("alice/1."), user.join("bob/1.")).unwrap();
    std::fs::hard_link(user.join("alice/1."), user.join("bob/Trash-1.")).unwrap();
    write(&user.join("alice/with space/1."), &msg(4), 0o600);
    write(&user.join("alice/new\nline"), &msg(5), 0o600);
    write(
        &user
            .join("alice")
            .join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        &msg(6),
        0o600,
    );
    std::os::unix::fs::symlink("../bob", user.join("alice/to-bob")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", user.join("alice/dangling")).unwrap();
    std::fs::create_dir_all(user.join("carol/Trash")).unwrap();
    let (uid, gid) = nobody();
    write(&user.join("dave/1."), &msg(7), 0o640);
    for p in [user.join("dave"), user.join("dave/1.")] {
        nix::unistd::chown(&p, Some(uid.into()), Some(gid.into())).unwrap();
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<(i64, i64)>,
    content: Vec<u8>,
    links: Vec<Vec<u8>>,
}

/// Everything rsync -aH must keep, keyed by path bytes: kind, mode, owners, file and dir
/// mtimes, contents (sha256) or link targets, and hard-link groups.
fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let mut groups: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        if rel.starts_with(bmfleet_agent::files::pull::PARTIAL_DIR.as_bytes()) {
            continue;
        }
        let m = e.path().symlink_metadata().unwrap();
        let (kind, content, mtime) = if m.file_type().is_symlink() {
            (
                "symlink",
                std::fs::read_link(e.path())
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
                None,
            )
        } else if m.is_dir() {
            ("dir", Vec::new(), Some((m.mtime(), m.mtime_nsec())))
        } else {
            let content = Sha256::digest(std::fs::read(e.path()).unwrap()).to_vec();
            ("file", content, Some((m.mtime(), m.mtime_nsec())))
        };
        if m.is_file() && m.nlink() > 1 {
            groups
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel,
            Entry {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                mtime,
                content,
                links: Vec::new(),
            },
        );
    }
    for group in groups.into_values() {
        for member in &group {
            if let Some(e) = out.get_mut(member) {
                e.links = group.clone();
            }
        }
    }
    out
}

/// The entries where two snapshots differ, named (empty: equal trees).
fn differences(a: &BTreeMap<Vec<u8>, Entry>, b: &BTreeMap<Vec<u8>, Entry>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&Vec<u8>> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{}: {:?} vs {:?}",
                String::from_utf8_lossy(k),
                a.get(k),
                b.get(k)
            )
        })
        .collect()
}

fn spool(root: &Path) -> PathBuf {
    root.join("var/spool/cyrus")
}

// ------------------------------------------------------------------ pulls

#[tokio::test]
async fn a_pull_makes_identical_trees_and_the_next_moves_only_the_changes() {
    let mut p = Pair::new(None, None).await;
    make_spool(&p.origin_root());
    p.grant("grant-0001-hot-sync", "target-1", &[SPOOL], 600_000)
        .await;

    let (first, _) = p.pull("m1/hot/1", "grant-0001-hot-sync", 0).await;
    assert!(first.ok, "{first:?}");
    assert_eq!(
        snapshot(&spool(&p.target_root())),
        snapshot(&spool(&p.origin_root()))
    );
    let stats = first.stats.unwrap();
    assert!(stats.files_scanned >= 20, "{stats:?}");
    assert_eq!(stats.entries_deleted, 0);

    // A second pass with nothing changed moves no file data.
    let (idle, _) = p.pull("m1/hot/2", "grant-0001-hot-sync", 0).await;
    let idle_stats = idle.stats.unwrap();
    assert_eq!(
        (idle_stats.bytes_changed, idle_stats.files_changed),
        (0, 0),
        "{idle_stats:?}"
    );

    // Mail arrives, mail is expunged, flags change (cyrus rewrites its index), a mode changes.
    let user = spool(&p.origin_root()).join("data/user");
    write(&user.join("alice/4."), &pseudo_random(5000, 2), 0o600);
    write(&user.join("bob/2."), &pseudo_random(3000, 3), 0o600);
    std::fs::remove_file(user.join("alice/2.")).unwrap();
    std::fs::remove_dir_all(user.join("alice/with space")).unwrap();
    write(
        &user.join("alice/cyrus.index"),
        &pseudo_random(2048, 4),
        0o600,
    );
    std::fs::set_permissions(
        user.join("alice/3."),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let (second, _) = p.pull("m1/hot/3", "grant-0001-hot-sync", 0).await;
    assert!(second.ok, "{second:?}");
    assert_eq!(
        snapshot(&spool(&p.target_root())),
        snapshot(&spool(&p.origin_root()))
    );
    let stats = second.stats.unwrap();
    assert_eq!(stats.bytes_changed, 5000 + 3000 + 2048, "{stats:?}");
    // alice/2., alice/with space/1. and alice/with space/
    assert_eq!(stats.entries_deleted, 3, "{stats:?}");
    assert!(stats.literal_bytes <= 5000 + 3000 + 2048, "{stats:?}");
    assert!(stats.files_changed <= 10, "{stats:?}");

    // The same operation id again is answered from the journal, not run again.
    let (replayed, _) = p.pull("m1/hot/3", "grant-0001-hot-sync", 0).await;
    assert!(replayed.replayed);
    assert_eq!(replayed.stats, Some(stats));
}

/// A final pass asking for the origin's journal: only the paths changed since the previous
/// full pass began are listed, moved (deletions and new trees included) and verified — a
/// rewrite keeping size and modification time included, which rsync's quick check skips.
/// Rewrites `path` in place keeping its size and modification time (a Cyrus index record
/// rewritten within the second of its copy).
fn rewrite_in_place(path: &Path, seed: u8) {
    let before = std::fs::metadata(path).unwrap();
    let mut content = std::fs::read(path).unwrap();
    content[0] ^= seed;
    std::fs::write(path, &content).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
}

/// A rewrite that keeps size and time escapes a walk's quick check: the next live pass
/// carries what the origin's journal saw change since the last good pass began, and when
/// the journal cannot tell (the agent restarted), walks again comparing contents.
#[tokio::test]
async fn a_same_size_rewrite_between_live_passes_is_carried_by_the_next_pass() {
    let mut p = Pair::new(None, None).await;
    make_spool(&p.origin_root());
    p.grant("grant-0001-hot-pass-1", "target-1", &[SPOOL], 600_000)
        .await;
    let (first, _) = p.pull("m1/hot/1", "grant-0001-hot-pass-1", 0).await;
    assert!(first.ok, "{first:?}");
    let index = spool(&p.origin_root()).join("data/user/alice/cyrus.index");
    let copy = spool(&p.target_root()).join("data/user/alice/cyrus.index");
    rewrite_in_place(&index, 0xff);
    let pass = |op: &str, origin: OriginEndpoint, carry: &str| PullRequest {
        operation_id: op.into(),
        origin: Some(origin),
        path: String::new(),
        bwlimit_kib: 0,
        paths: vec![SPOOL.into()],
        compress: true,
        journal_since: String::new(),
        carry_since: carry.into(),
        first_pass: false,
    };
    // A walk alone misses it.
    p.grant("grant-0002-hot-pass-2", "target-1", &[SPOOL], 600_000)
        .await;
    let req = pass("m1/hot/2", p.endpoint("grant-0002-hot-pass-2"), "");
    let walked = p.pull_request(req).await;
    assert!(walked.ok, "{walked:?}");
    assert_ne!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&index).unwrap()
    );
    // The next live pass carries it.
    p.grant("grant-0003-hot-pass-3", "target-1", &[SPOOL], 600_000)
        .await;
    let req = pass(
        "m1/hot/3",
        p.endpoint("grant-0003-hot-pass-3"),
        "grant-0001-hot-pass-1",
    );
    let carried = p.pull_request(req).await;
    assert!(carried.ok, "{carried:?}");
    let stats = carried.stats.unwrap();
    assert!(
        stats.journal_paths >= 1 && stats.journal_fallback.is_empty(),
        "{stats:?}"
    );
    let diff = differences(
        &snapshot(&spool(&p.target_root())),
        &snapshot(&spool(&p.origin_root())),
    );
    assert!(diff.is_empty(), "{}", diff.join("\n"));
    // The journal cannot tell (as after an agent restart): the pass walks again comparing
    // contents, and says so.
    rewrite_in_place(&index, 0x0f);
    p.grant("grant-0004-hot-pass-4", "target-1", &[SPOOL], 600_000)
        .await;
    let req = pass(
        "m1/hot/4",
        p.endpoint("grant-0004-hot-pass-4"),
        "grant-never-marked",
    );
    let compared = p.pull_request(req).await;
    assert!(compared.ok, "{compared:?}");
    let stats = compared.stats.unwrap();
    assert!(
        stats
            .journal_fallback
            .contains("every file compared by content"),
        "{stats:?}"
    );
    let diff = differences(
        &snapshot(&spool(&p.target_root())),
        &snapshot(&spool(&p.origin_root())),
    );
    assert!(diff.is_empty(), "{}", diff.join("\n"));
}

/// A remigration's first pass finds the previous run's copy on the target: a file the origin
/// rewrote in place since, keeping its size and time, passes a walk's quick check, so the run's
/// first pass into dirs that hold data compares every file's contents, and says so.
#[tokio::test]
async fn a_first_pass_into_an_older_copy_compares_contents() {
    let mut p = Pair::new(None, None).await;
    make_spool(&p.origin_root());
    p.grant("grant-0001-first-run", "target-1", &[SPOOL], 600_000)
        .await;
    let (first, _) = p.pull("m1/hot/1", "grant-0001-first-run", 0).await;
    assert!(first.ok, "{first:?}");
    // Between the runs (the origin served again), a rewrite keeping size and time.
    let index = spool(&p.origin_root()).join("data/user/alice/cyrus.index");
    let copy = spool(&p.target_root()).join("data/user/alice/cyrus.index");
    rewrite_in_place(&index, 0x5a);
    let first_pass = |op: &str, origin: OriginEndpoint, first: bool| PullRequest {
        operation_id: op.into(),
        origin: Some(origin),
        paths: vec![SPOOL.into()],
        first_pass: first,
        ..Default::default()
    };
    // Not flagged as a first pass, a walk misses it (what the flag is for).
    p.grant("grant-0002-second-run", "target-1", &[SPOOL], 600_000)
        .await;
    let walked = p
        .pull_request(first_pass(
            "m2/hot/1",
            p.endpoint("grant-0002-second-run"),
            false,
        ))
        .await;
    assert!(walked.ok, "{walked:?}");
    assert_ne!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&index).unwrap()
    );
    // The run's first pass compares contents.
    let compared = p
        .pull_request(first_pass(
            "m2/hot/1b",
            p.endpoint("grant-0002-second-run"),
            true,
        ))
        .await;
    assert!(compared.ok, "{compared:?}");
    let stats = compared.stats.unwrap();
    assert!(
        stats
            .journal_fallback
            .contains("held data before the run's first pass"),
        "{stats:?}"
    );
    let diff = differences(
        &snapshot(&spool(&p.target_root())),
        &snapshot(&spool(&p.origin_root())),
    );
    assert!(diff.is_empty(), "{}", diff.join("\n"));
}

#[tokio::test]
async fn a_journal_pass_moves_only_what_changed_and_what_the_quick_check_misses() {
    let mut p = Pair::new(None, None).await;
    make_spool(&p.origin_root());
    // A mailbox of 300 old messages nobody touches.
    for m in 0..300 {
        write(
            &spool(&p.origin_root()).join(format!("data/user/dave/{m}.")),
            &pseudo_random(100, m),
            0o600,
        );
    }
    p.grant("grant-0001-pre-window", "target-1", &[SPOOL], 600_000)
        .await;
    let (full, _) = p.pull("m1/pre/1", "grant-0001-pre-window", 0).await;
    assert!(full.ok, "{full:?}");
    let full = full.stats.unwrap();

    // Services run on: mail arrives (one message in two mailboxes, hard-linked), a mailbox
    // and a message go, a mailbox is created whole, an index is rewritten keeping its size
    // and modification time, a mode changes, a message is renamed.
    let user = spool(&p.origin_root()).join("data/user");
    write(&user.join("alice/4."), &pseudo_random(5000, 2), 0o600);
    std::fs::hard_link(user.join("alice/4."), user.join("bob/9.")).unwrap();
    std::fs::remove_file(user.join("alice/2.")).unwrap();
    std::fs::remove_dir_all(user.join("alice/with space")).unwrap();
    std::fs::create_dir_all(user.join("carol/Sent")).unwrap();
    write(&user.join("carol/Sent/1."), &pseudo_random(700, 5), 0o600);
    let index = user.join("alice/cyrus.index");
    let before = std::fs::metadata(&index).unwrap();
    let mut rewritten = std::fs::read(&index).unwrap();
    rewritten[0] ^= 0xff;
    std::fs::write(&index, &rewritten).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&index)
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
    std::fs::set_permissions(
        user.join("alice/3."),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::rename(
        user.join("alice/Archives/2024/1."),
        user.join("alice/Archives/2024/1.old"),
    )
    .unwrap();

    p.grant("grant-0002-final", "target-1", &[SPOOL], 600_000)
        .await;
    let journal_pass = |op: &str, since: &str| PullRequest {
        operation_id: op.into(),
        origin: Some(p.endpoint("grant-0002-final")),
        path: String::new(),
        bwlimit_kib: 0,
        paths: vec![SPOOL.into()],
        compress: false,
        journal_since: since.into(),
        carry_since: String::new(),
        first_pass: false,
    };
    let fallback = journal_pass("m1/final/0", "grant-never-marked");
    let final_pass = journal_pass("m1/final/1", "grant-0001-pre-window");
    let after_walk = journal_pass("m1/final/2", "grant-0002-final");
    let last = p.pull_request(final_pass).await;
    assert!(last.ok, "{last:?}");
    let stats = last.stats.unwrap();
    assert!(
        stats.journal && stats.journal_fallback.is_empty(),
        "{stats:?}"
    );
    assert!(
        stats.journal_paths >= 10 && stats.journal_paths < 30 && full.files_scanned > 300,
        "only the changes are listed: {stats:?} vs a full pass's {full:?}"
    );
    let diff = differences(
        &snapshot(&spool(&p.target_root())),
        &snapshot(&spool(&p.origin_root())),
    );
    assert!(
        diff.is_empty(),
        "equal trees (contents, modes, times, hard links, deletions):\n{}",
        diff.join("\n")
    );

    // A journal that cannot tell (no full pass marked under that grant): the pass walks
    // everything and says why.
    let walked = p.pull_request(fallback).await;
    assert!(walked.ok, "{walked:?}");
    let stats = walked.stats.unwrap();
    assert!(!stats.journal, "{stats:?}");
    assert!(
        stats
            .journal_fallback
            .contains("no full pass was journaled"),
        "{stats:?}"
    );
    assert!(stats.files_scanned >= full.files_scanned / 2, "{stats:?}");

    // One name of a message stored under three is renamed: moving the new name alone would
    // split the link, so the journal says so and the pass walks everything.
    std::fs::rename(user.join("bob/1."), user.join("bob/1.moved")).unwrap();
    let walked = p.pull_request(after_walk).await;
    assert!(walked.ok, "{walked:?}");
    let stats = walked.stats.unwrap();
    assert!(
        !stats.journal && stats.journal_fallback.contains("has 3 names"),
        "{stats:?}"
    );
    let diff = differences(
        &snapshot(&spool(&p.target_root())),
        &snapshot(&spool(&p.origin_root())),
    );
    assert!(diff.is_empty(), "{}", diff.join("\n"));
}

#[tokio::test]
async fn one_run_for_several_dirs_keeps_hard_links_across_them_and_touches_nothing_above() {
    let mut p = Pair::new(None, None).await;
    let (o, t) = (p.origin_root(), p.target_root());
    // cyrus delivers once and links: a message linked from the spool into another data dir.
    write(
        &o.join("var/spool/cyrus/data/user/alice/1."),
        b"one copy",
        0o600,
    );
    std::fs::create_dir_all(o.join("var/lib/cyrus/deliver")).unwrap();
    std::fs::hard_link(
        o.join("var/spool/cyrus/data/user/alice/1."),
        o.join("var/lib/cyrus/deliver/1."),
    )
    .unwrap();
    std::fs::set_permissions(o.join("var/spool"), std::fs::Permissions::from_mode(0o777)).unwrap();
    // The target's own: a sibling of the data dirs, and its /var/spool's mode.
    write(&t.join("var/spool/postfix/keep"), b"the target's", 0o644);
    std::fs::set_permissions(t.join("var/spool"), std::fs::Permissions::from_mode(0o711)).unwrap();
    let lib = "/var/lib/cyrus";
    p.grant("grant-0013-two-dirs", "target-1", &[SPOOL, lib], 600_000)
        .await;
    let endpoint = p.endpoint("grant-0013-two-dirs");
    let two_dirs = || PullRequest {
        operation_id: "m1/hot/two-dirs".into(),
        origin: Some(endpoint.clone()),
        path: String::new(),
        bwlimit_kib: 0,
        paths: vec![SPOOL.into(), lib.into()],
        compress: false,
        journal_since: String::new(),
        carry_since: String::new(),
        first_pass: false,
    };
    let first = two_dirs();
    let event = p.pull_request(first).await;
    assert!(event.ok, "{event:?}");
    let (a, b) = (
        std::fs::metadata(t.join("var/spool/cyrus/data/user/alice/1.")).unwrap(),
        std::fs::metadata(t.join("var/lib/cyrus/deliver/1.")).unwrap(),
    );
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "the link across dirs was split"
    );
    assert_eq!(
        std::fs::read(t.join("var/spool/postfix/keep")).unwrap(),
        b"the target's"
    );
    assert_eq!(
        t.join("var/spool").metadata().unwrap().mode() & 0o7777,
        0o711,
        "the origin set the mode of the target's /var/spool"
    );
    // The same op id is answered from the journal.
    let again = two_dirs();
    assert!(p.pull_request(again).await.replayed);
}

#[tokio::test]
async fn xattrs_acls_and_sparse_files_arrive_and_the_manifest_sees_them() {
    let mut p = Pair::new(None, None).await;
    let user = spool(&p.origin_root()).join("data/user/alice");
    write(&user.join("1."), b"Subject: tagged\r\n\r\nhello\r\n", 0o600);
    let mail = user.join("1.");
    let mail = mail.to_str().unwrap();
    tool("setfattr", &["-n", "user.bmfleet.flag", "-v", "seen", mail]);
    tool("setfacl", &["-m", "u:nobody:r", mail]);
    let shared = spool(&p.origin_root()).join("data/user/shared");
    std::fs::create_dir_all(&shared).unwrap();
    tool(
        "setfacl",
        &["-d", "-m", "u:nobody:rwx", shared.to_str().unwrap()],
    );
    // 64 MiB apparent, 4 KiB of data.
    let sparse = spool(&p.origin_root()).join("data/index.sparse");
    {
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_at(&[1u8; 4096], 32 << 20).unwrap();
    }
    p.grant("grant-0012-attributes", "target-1", &[SPOOL], 600_000)
        .await;
    // A live pass compresses: the sparse file's zeros do not cross the link as 64 MiB.
    let event = p
        .pull_request(PullRequest {
            operation_id: "m1/hot/attributes".into(),
            origin: Some(p.endpoint("grant-0012-attributes")),
            path: SPOOL.into(),
            bwlimit_kib: 0,
            paths: vec![],
            compress: true,
            journal_since: String::new(),
            carry_since: String::new(),
            first_pass: false,
        })
        .await;
    assert!(event.ok, "{event:?}");
    let received = event.stats.unwrap().bytes_received;
    assert!(received < 4 << 20, "{received} bytes crossed the link");
    let (origin_root, target_root) = (p.origin_root(), p.target_root());
    let on_target = |path: &Path| {
        target_root
            .join(path.strip_prefix(&origin_root).unwrap())
            .to_str()
            .unwrap()
            .to_string()
    };
    let t_mail = on_target(Path::new(mail));
    assert_eq!(
        tool(
            "getfattr",
            &["--only-values", "-n", "user.bmfleet.flag", &t_mail]
        ),
        "seen"
    );
    let acl = |path: &str| tool("getfacl", &["-p", "--omit-header", "-n", path]);
    assert_eq!(acl(&t_mail), acl(mail));
    assert!(acl(&t_mail).contains("user:65534:r--"), "{}", acl(&t_mail));
    let t_shared = on_target(&shared);
    assert_eq!(acl(&t_shared), acl(shared.to_str().unwrap()));
    assert!(acl(&t_shared).contains("default:user:65534:rwx"));
    let t_sparse = std::fs::metadata(on_target(&sparse)).unwrap();
    assert_eq!(t_sparse.len(), 64 << 20);
    assert!(
        t_sparse.blocks() * 512 < 1 << 20,
        "the sparse file arrived with {} bytes on disk",
        t_sparse.blocks() * 512
    );
    // The verification manifest covers them: equal now, different without the ACL.
    let manifest = |root: &Path| {
        bmfleet_agent::files::manifest::of_dir(
            SPOOL,
            &spool(root),
            &[bmfleet_agent::files::pull::PARTIAL_DIR],
            false,
            0,
        )
        .unwrap()
        .checksum
    };
    assert_eq!(manifest(&p.origin_root()), manifest(&p.target_root()));
    tool("setfacl", &["-b", &t_mail]);
    assert_ne!(manifest(&p.origin_root()), manifest(&p.target_root()));
}

/// The command lines of every rsync sender running on this machine.
fn sender_command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("--sender"))
        .collect()
}

/// The origin's rsync senders serving its spool: named by their real path, or (a relative
/// pull of several dirs) by the data root and `/./`.
fn origin_rsync_servers(origin_root: &Path) -> usize {
    let real = spool(origin_root)
        .canonicalize()
        .unwrap()
        .display()
        .to_string();
    let relative = format!("{}/./var/spool/cyrus", origin_root.display());
    sender_command_lines()
        .iter()
        .filter(|c| c.contains(&real) || c.contains(&relative))
        .count()
}

#[tokio::test]
async fn an_interrupted_pull_is_stopped_at_both_ends_and_the_next_converges() {
    let mut p = Pair::new(None, None).await;
    make_spool(&p.origin_root());
    let big = spool(&p.origin_root()).join("data/user/erin");
    for i in 0..3 {
        write(
            &big.join(format!("{i}.")),
            &pseudo_random(8 << 20, 10 + i),
            0o600,
        );
    }
    p.grant("grant-0002-interrupt", "target-1", &[SPOOL], 600_000)
        .await;

    // Slow the pull down, then walk away from it after its first progress report.
    let mut stream = p
        .target
        .pull(PullRequest {
            operation_id: "m1/hot/1".into(),
            origin: Some(p.endpoint("grant-0002-interrupt")),
            path: SPOOL.into(),
            bwlimit_kib: 2048,
            paths: vec![],
            compress: false,
            journal_since: String::new(),
            carry_since: String::new(),
            first_pass: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(
        !first.done,
        "the pull finished before it could be interrupted: {first:?}"
    );
    assert!(origin_rsync_servers(&p.origin_root()) > 0);
    drop(stream);

    // Both ends stop: the origin's rsync server goes away.
    let deadline = Instant::now() + Duration::from_secs(20);
    while origin_rsync_servers(&p.origin_root()) > 0 {
        assert!(
            Instant::now() < deadline,
            "the origin's rsync kept running after the cancel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(
        snapshot(&spool(&p.target_root())),
        snapshot(&spool(&p.origin_root()))
    );

    let (event, _) = p.pull("m1/hot/2", "grant-0002-interrupt", 0).await;
    assert!(event.ok, "{event:?}");
    assert_eq!(
        snapshot(&spool(&p.target_root())),
        snapshot(&spool(&p.origin_root()))
    );
}

#[tokio::test]
async fn the_bandwidth_limit_is_honoured() {
    let mut p = Pair::new(None, None).await;
    let size = 6 << 20;
    write(
        &spool(&p.origin_root()).join("big."),
        &pseudo_random(size, 42),
        0o600,
    );
    p.grant("grant-0003-bandwidth", "target-1", &[SPOOL], 600_000)
        .await;
    let limit_kib = 1536;
    let started = Instant::now();
    let (event, progress) = p.pull("m1/hot/1", "grant-0003-bandwidth", limit_kib).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(event.ok, "{event:?}");
    let expected = size as f64 / (f64::from(limit_kib) * 1024.0);
    eprintln!("bwlimit {limit_kib} KiB/s: {size} bytes in {elapsed:.2}s, expected {expected:.2}s (ratio {:.2})", elapsed / expected);
    // The limit acts: the pass cannot be faster than the limit allows (a loaded machine only
    // makes it slower, so this cannot flake). How close to the limit a pass runs is a speed
    // matter, not a correctness one: no upper bound here (speed lives in the benchmarks).
    assert!(
        elapsed >= expected * 0.8,
        "too fast for the limit: {elapsed:.2}s < 0.8 × {expected:.2}s"
    );
    assert!(
        progress >= 2,
        "progress was not streamed while running ({progress} events)"
    );
}

// ------------------------------------------------------------------ refusals

async fn refusal_pair() -> Pair {
    let mut p = Pair::new(None, None).await;
    make_spool(&p.origin_root());
    std::fs::create_dir_all(p.origin_root().join("etc")).unwrap();
    std::fs::write(p.origin_root().join("etc/shadow"), b"root:secret").unwrap();
    std::os::unix::fs::symlink(
        p.origin_root().join("etc"),
        spool(&p.origin_root()).join("escape"),
    )
    .unwrap();
    p.grant("grant-0004-refusals", "target-1", &[SPOOL], 600_000)
        .await;
    p
}

const PULL_ARGS: &str = "rsync --server --sender -lHogDtpre.iLsfxCIvu";

#[tokio::test]
async fn the_origin_refuses_a_pull_without_a_grant() {
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync("", &format!("{PULL_ARGS} . {SPOOL}/"))
        .await;
    assert!(reason.contains("no grant"), "{reason}");
}

#[tokio::test]
async fn the_origin_refuses_a_forged_grant_through_real_rsync() {
    let mut p = refusal_pair().await;
    let (event, _) = p.pull("m1/hot/1", "grant-made-up-by-the-target", 0).await;
    assert!(!event.ok);
    assert!(
        event.error.contains("no grant grant-made-up-by-the-target"),
        "{}",
        event.error
    );
    assert!(!spool(&p.target_root()).join("data").exists());
}

#[tokio::test]
async fn the_origin_refuses_an_expired_grant() {
    let mut p = refusal_pair().await;
    p.grant("grant-0005-expired", "target-1", &[SPOOL], -1000)
        .await;
    let reason = p
        .refused_rsync("grant-0005-expired", &format!("{PULL_ARGS} . {SPOOL}/"))
        .await;
    assert!(reason.contains("expired"), "{reason}");
}

#[tokio::test]
async fn the_origin_refuses_another_targets_certificate() {
    let p = refusal_pair().await;
    let other = p.pki.issue("target-2", Role::Agent);
    let request = TunnelRequest::Rsync {
        grant: "grant-0004-refusals".into(),
        argv: format!("{PULL_ARGS} . {SPOOL}/")
            .split(' ')
            .map(str::to_string)
            .collect(),
        journal_since: String::new(),
    };
    match p.tunnel_as(&other, Role::Agent, request).await {
        Err(TunnelError::Refused { reason, .. }) => {
            assert!(
                reason.contains("issued to 'target-1', not to 'target-2'"),
                "{reason}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("admitted another target"),
    }
}

#[tokio::test]
async fn the_origin_refuses_an_orchestrator_certificate_on_the_data_plane() {
    let p = refusal_pair().await;
    let orch = p.pki.issue("orchestrator", Role::Orchestrator);
    let request = TunnelRequest::DatabaseManifest {
        grant: "grant-0004-refusals".into(),
        names_only: false,
    };
    match p.tunnel_as(&orch, Role::Orchestrator, request).await {
        Err(TunnelError::Refused { reason, .. }) => {
            assert!(reason.contains("not an agent's"), "{reason}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("admitted an orchestrator certificate"),
    }
}

#[tokio::test]
async fn the_origin_refuses_a_path_outside_the_grant() {
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync("grant-0004-refusals", &format!("{PULL_ARGS} . /etc/"))
        .await;
    assert!(reason.contains("does not cover path \"/etc/\""), "{reason}");
}

#[tokio::test]
async fn an_agent_grants_and_receives_only_its_data_dirs() {
    // The agent is the last word on its own disk: whatever the orchestrator asks, an origin
    // grants and a target writes only BlueMind's data dirs and its own extra_data_dirs.
    let mut p = refusal_pair().await;
    for paths in [
        vec!["/"],
        vec![SPOOL, "/etc"],
        vec!["/root/.ssh"],
        vec!["/var/spool"],
    ] {
        let e = p
            .origin
            .grant(GrantRequest {
                grant_id: "grant-0009-system-trees".into(),
                target_name: "target-1".into(),
                migration: "m1".into(),
                paths: paths.iter().map(|s| s.to_string()).collect(),
                config_set: false,
                databases: false,
                replication: false,
                expires_at_unix_ms: bmfleet_agent::plane::grants::now_ms() + 600_000,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{paths:?}");
        assert!(
            e.message().contains("is not a data dir of this host"),
            "{e}"
        );
    }
    let e = p
        .target
        .pull(PullRequest {
            operation_id: "m1/hot/etc".into(),
            origin: Some(p.endpoint("grant-0004-refusals")),
            path: "/etc".into(),
            bwlimit_kib: 0,
            paths: vec![],
            compress: false,
            journal_since: String::new(),
            carry_since: String::new(),
            first_pass: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("/etc is not a data dir"), "{e}");
    assert!(!p.target_root().join("etc").exists());
}

#[tokio::test]
async fn a_target_that_served_refuses_every_sync_until_the_marker_is_cleared() {
    let mut p = refusal_pair().await;
    // Starting the target's services marks it: from then on it may take mail.
    p.target
        .services(bmfleet_proto::v1::ServicesRequest {
            operation_id: "m1/mail-01/start-target/1".into(),
            action: bmfleet_proto::v1::ServiceAction::Start.into(),
            wal_position: false,
        })
        .await
        .unwrap();
    let facts = p
        .target
        .facts(bmfleet_proto::v1::FactsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(facts.served);
    let (event, _) = p.pull("m1/hot/after-start", "grant-0004-refusals", 0).await;
    assert!(!event.ok);
    assert!(
        event.error.contains("this host has served"),
        "{}",
        event.error
    );
    assert!(event.error.contains("start-target/1"), "{}", event.error);
    assert!(!spool(&p.target_root()).join("data").exists());
    let config = p
        .target
        .copy_config(CopyConfigRequest {
            operation_id: "m1/config/after-start".into(),
            origin: Some(p.endpoint("grant-0004-refusals")),
            origin_queue_empty: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !config.ok && config.error.contains("this host has served"),
        "{config:?}"
    );
    let databases = p
        .target
        .move_databases(MoveDatabasesRequest {
            operation_id: "m1/db/after-start".into(),
            origin: Some(p.endpoint("grant-0004-refusals")),
            format: DumpFormat::Streamed.into(),
            jobs: 1,
            promote: false,
            origin_wal_position: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!databases.ok && databases.error.contains("this host has served"));
    // An explicit clear (the orchestrator's re-migration) lets it be synced into again.
    let cleared = p
        .target
        .clear_served(bmfleet_proto::v1::ClearServedRequest {
            operation_id: "m1/mail-01/preflight/2".into(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.was_set);
    assert_eq!(cleared.set_by, "m1/mail-01/start-target/1");
    let (event, _) = p.pull("m1/hot/after-clear", "grant-0004-refusals", 0).await;
    assert!(event.ok, "{event:?}");
}

#[tokio::test]
async fn an_origin_runs_a_bounded_number_of_rsync_children_per_grant() {
    let p = refusal_pair().await;
    let rsync = || TunnelRequest::Rsync {
        grant: "grant-0004-refusals".into(),
        argv: format!("{PULL_ARGS} . {SPOOL}/")
            .split(' ')
            .map(str::to_string)
            .collect(),
        journal_since: String::new(),
    };
    // A target holding transfers open (rsync waits for it): four per grant, then "busy".
    let mut held = Vec::new();
    for _ in 0..bmfleet_proto::admission::Limits::CHILDREN.max_per_peer {
        held.push(
            p.tunnel_as(&p.target_files, Role::Agent, rsync())
                .await
                .expect("admitted"),
        );
    }
    match p.tunnel_as(&p.target_files, Role::Agent, rsync()).await {
        Err(TunnelError::Refused { reason, .. }) => {
            assert!(reason.contains("busy"), "{reason}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a fifth rsync child was started for one grant"),
    }
    // Each child is the origin's own rsync, with its own I/O timeout.
    let children = origin_rsync_servers(&p.origin_root());
    assert_eq!(children, held.len());
    let with_timeout = sender_command_lines()
        .iter()
        .filter(|c| c.contains("--timeout=600"))
        .count();
    assert!(with_timeout >= held.len(), "{with_timeout}");
    drop(held);
}

#[tokio::test]
async fn the_origin_refuses_dot_dot() {
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            &format!("{PULL_ARGS} . {SPOOL}/../../../etc/"),
        )
        .await;
    assert!(reason.contains("'..'"), "{reason}");
}

#[tokio::test]
async fn the_origin_refuses_a_bare_dash_that_would_serve_its_working_directory() {
    // rsync reads "-" as its directory argument and "." as a path: before the fix, this argv
    // under a spool grant handed over the agent's working directory (/ under systemd).
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            &format!("rsync --server --sender -logDtprRe.iLsfxCIvu - . {SPOOL}/"),
        )
        .await;
    assert!(reason.contains("would read \"-\" as a path"), "{reason}");
}

#[tokio::test]
async fn the_origin_refuses_a_symlink_escape() {
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            &format!("{PULL_ARGS} . {SPOOL}/escape/"),
        )
        .await;
    assert!(reason.contains("outside the granted"), "{reason}");
}

#[tokio::test]
async fn the_origin_refuses_a_push() {
    let p = refusal_pair().await;
    let before = snapshot(&spool(&p.origin_root()));
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            &format!("rsync --server -lHogDtpre.iLsfxCIvu . {SPOOL}/"),
        )
        .await;
    assert!(
        reason.contains("without --sender would write into the origin"),
        "{reason}"
    );
    assert_eq!(snapshot(&spool(&p.origin_root())), before);
}

#[tokio::test]
async fn the_origin_refuses_remove_source_files() {
    let p = refusal_pair().await;
    let before = snapshot(&spool(&p.origin_root()));
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            &format!("{PULL_ARGS} --remove-source-files . {SPOOL}/"),
        )
        .await;
    assert!(
        reason.contains("--remove-source-files is not allowed"),
        "{reason}"
    );
    assert_eq!(snapshot(&spool(&p.origin_root())), before);
}

#[tokio::test]
async fn the_origin_refuses_log_file() {
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            &format!("{PULL_ARGS} --log-file=/tmp/x . {SPOOL}/"),
        )
        .await;
    assert!(reason.contains("--log-file is not allowed"), "{reason}");
}

#[tokio::test]
async fn the_origin_refuses_write_batch() {
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            &format!("{PULL_ARGS} --write-batch=/tmp/b . {SPOOL}/"),
        )
        .await;
    assert!(reason.contains("--write-batch is not allowed"), "{reason}");
}

#[tokio::test]
async fn the_origin_refuses_the_config_set_and_databases_outside_the_grant() {
    let p = refusal_pair().await;
    let reason = p
        .refused_rsync(
            "grant-0004-refusals",
            "rsync --server --sender -logDtpRe.LsfxCIvu --files-from bmfleet-config-set --from0 . /",
        )
        .await;
    assert!(
        reason.contains("does not cover the configuration file set"),
        "{reason}"
    );
    let request = TunnelRequest::DumpDatabase {
        grant: "grant-0004-refusals".into(),
        database: "bj".into(),
        schema_only: false,
    };
    match p.tunnel_as(&p.target_files, Role::Agent, request).await {
        Err(TunnelError::Refused { reason, .. }) => {
            assert!(reason.contains("does not cover the databases"), "{reason}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("admitted a dump outside the grant"),
    }
    // Nor a verified point (replication), a subscriber's, the changed blocks or the totals
    // since a point (databases), nor the config set's states, under a data-dirs grant.
    for (request, scope) in [
        (
            TunnelRequest::ConfigManifest {
                grant: "grant-0004-refusals".into(),
            },
            "configuration file set",
        ),
        (
            TunnelRequest::VerifiedPoint {
                grant: "grant-0004-refusals".into(),
                per_block: false,
            },
            "replication",
        ),
        (
            TunnelRequest::VerifiedPoint {
                grant: "grant-0004-refusals".into(),
                per_block: true,
            },
            "replication",
        ),
        (
            TunnelRequest::ChangedTotals {
                grant: "grant-0004-refusals".into(),
                since: "0/0".into(),
            },
            "databases",
        ),
        (
            TunnelRequest::ChangedBlocks {
                grant: "grant-0004-refusals".into(),
                since: "0/0".into(),
                tables: Vec::new(),
            },
            "databases",
        ),
    ] {
        match p.tunnel_as(&p.target_files, Role::Agent, request).await {
            Err(TunnelError::Refused { reason, .. }) => {
                assert!(reason.contains(scope), "{reason}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("admitted outside the grant's {scope}"),
        }
    }
}

// ------------------------------------------------------------------ config set

#[tokio::test]
async fn the_config_set_is_copied_with_modes_and_owners_and_maps_are_rebuilt() {
    config_set_copied(false).await;
}

/// Staged while the service ran, unchanged since: the window installs the staged copy after
/// comparing it path by path with the origin's set, every attribute as a pull gives it.
#[tokio::test]
async fn a_config_set_staged_live_and_unchanged_is_installed_as_a_pull_installs_it() {
    config_set_copied(true).await;
}

/// The config set's copy (`staged`: staged live first, the origin's set unchanged since):
/// contents, modes, owners, times, extended attributes, ACLs and links as the origin's, what
/// lies outside the patterns left out, the maps rebuilt here.
async fn config_set_copied(staged: bool) {
    let mut p = Pair::new(None, None).await;
    let o = p.origin_root();
    let (uid, gid) = nobody();
    write(
        &o.join("etc/bm/bm.ini"),
        b"[global]\npassword = s3cret\n",
        0o640,
    );
    write(&o.join("etc/bm/nodeclient_cert.pem"), b"cert", 0o600);
    write(&o.join("etc/bm-hps/hps.ini"), b"x", 0o644);
    write(
        &o.join("etc/imapd.conf"),
        b"partition-default: /var/spool/cyrus/data\n",
        0o644,
    );
    write(&o.join("etc/cyrus.conf"), b"SERVICES {}\n", 0o644);
    write(
        &o.join("etc/postfix/main.cf"),
        b"mynetworks = 198.18.0.0/24\n",
        0o644,
    );
    write(
        &o.join("etc/postfix/master.cf"),
        b"smtp inet n - y - - smtpd\n",
        0o644,
    );
    write(
        &o.join("etc/postfix/transport-flat"),
        b"example.net smtp:[198.18.0.9]\n",
        0o644,
    );
    write(
        &o.join("etc/postfix/transport.db"),
        b"origin libdb bytes",
        0o644,
    );
    write(
        &o.join("etc/postfix/virtual_domains-flat"),
        b"example.net OK\n",
        0o644,
    );
    write(&o.join("etc/bm-webmail/webmail.conf"), b"w", 0o640);
    nix::unistd::chown(
        &o.join("etc/bm-webmail/webmail.conf"),
        Some(uid.into()),
        Some(gid.into()),
    )
    .unwrap();
    write(&o.join("var/lib/bm-ca/cacert.pem"), b"ca", 0o644);
    write(&o.join("etc/shadow"), b"root:not-part-of-the-set", 0o600);
    // Extended attributes and an ACL arrive; a link arrives as a link.
    let ini = o.join("etc/bm/bm.ini");
    tool(
        "setfattr",
        &["-n", "user.bm.origin", "-v", "kept", ini.to_str().unwrap()],
    );
    tool("setfacl", &["-m", "u:nobody:r", ini.to_str().unwrap()]);
    std::os::unix::fs::symlink("bm.ini", o.join("etc/bm/current.ini")).unwrap();
    // The target's cyrus.conf already holds the origin's content, with a mode and an
    // attribute of its own: the file stays (same inode) and takes the origin's attributes.
    let cyrus_here = p.target_root().join("etc/cyrus.conf");
    write(&cyrus_here, b"SERVICES {}\n", 0o600);
    tool(
        "setfattr",
        &["-n", "user.stale", "-v", "x", cyrus_here.to_str().unwrap()],
    );
    let cyrus_inode = cyrus_here.metadata().unwrap().ino();
    // The target's freshly installed admin0.pw: same size and same mtime as the origin's,
    // other content (rsync's quick check would skip it).
    write(&o.join("etc/bm/admin0.pw"), b"admin-origin-1\n", 0o600);
    write(
        &p.target_root().join("etc/bm/admin0.pw"),
        b"admin-target-1\n",
        0o600,
    );
    let mtime = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000);
    for root in [o.clone(), p.target_root()] {
        std::fs::File::options()
            .write(true)
            .open(root.join("etc/bm/admin0.pw"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
    p.grant_with(config_grant("grant-0006-config")).await;
    let t = p.target_root();
    let staged_place = p.target_config.state_dir.join("config-staged");
    let copy = |operation: &str, stage: bool| {
        let request = CopyConfigRequest {
            operation_id: operation.into(),
            origin: Some(p.endpoint("grant-0006-config")),
            stage,
            ..Default::default()
        };
        let mut target = p.target.clone();
        async move { target.copy_config(request).await.unwrap().into_inner() }
    };
    if staged {
        let reply = copy("m1/pre-window/config-staged", true).await;
        assert!(reply.ok, "{reply:?}");
        // Staged, nothing installed yet.
        assert!(staged_place.join("tree/etc/bm/bm.ini").exists());
        assert!(!t.join("etc/bm/bm.ini").exists());
    }
    let reply = copy("m1/config/1", false).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        reply
            .set_from
            .starts_with("the copy staged before the window"),
        staged,
        "{}",
        reply.set_from
    );
    // The staged copy (the origin's secrets) is gone once installed.
    assert!(!staged_place.exists());
    for f in [
        "etc/bm/bm.ini",
        "etc/bm/admin0.pw",
        "etc/bm/nodeclient_cert.pem",
        "etc/bm-hps/hps.ini",
        "etc/imapd.conf",
        "etc/cyrus.conf",
        "etc/postfix/main.cf",
        "etc/postfix/master.cf",
        "etc/postfix/transport-flat",
        "etc/postfix/virtual_domains-flat",
        "etc/bm-webmail/webmail.conf",
        "var/lib/bm-ca/cacert.pem",
    ] {
        let (a, b) = (o.join(f).metadata().unwrap(), t.join(f).metadata().unwrap());
        assert_eq!(
            std::fs::read(o.join(f)).unwrap(),
            std::fs::read(t.join(f)).unwrap(),
            "{f}"
        );
        assert_eq!(
            (a.mode(), a.uid(), a.gid(), a.mtime()),
            (b.mode(), b.uid(), b.gid(), b.mtime()),
            "{f}"
        );
    }
    assert!(
        !t.join("etc/shadow").exists(),
        "a file outside the config set was copied"
    );
    let attributes = |path: &Path| {
        let out = std::process::Command::new("getfattr")
            .args(["-d", "-m", "-", "--absolute-names"])
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let wanted = attributes(&ini);
    assert!(
        wanted
            .iter()
            .any(|a| a.starts_with("system.posix_acl_access"))
            && wanted.iter().any(|a| a == "user.bm.origin=\"kept\""),
        "{wanted:?}"
    );
    assert_eq!(attributes(&t.join("etc/bm/bm.ini")), wanted);
    assert_eq!(
        std::fs::read_link(t.join("etc/bm/current.ini")).unwrap(),
        Path::new("bm.ini")
    );
    let cyrus = t.join("etc/cyrus.conf").metadata().unwrap();
    assert_eq!((cyrus.ino(), cyrus.mode() & 0o7777), (cyrus_inode, 0o644));
    assert!(attributes(&t.join("etc/cyrus.conf")).is_empty());
    // The maps were rebuilt on the target, not carried over from the origin's libdb.
    let transport = std::fs::read_to_string(t.join("etc/postfix/transport.db")).unwrap();
    assert_eq!(
        transport,
        format!(
            "rebuilt from {}\n",
            t.join("etc/postfix/transport-flat").display()
        )
    );
    assert!(t.join("etc/postfix/virtual_domains.db").exists());
    assert_eq!(reply.maps_rebuilt.len(), 2);
}

/// What changed on the origin after the staging, even a rewrite of the same size and time
/// and a file gone, makes the window pull the set again: the target installs what the
/// origin holds at the stop, never the staged copy.
#[tokio::test]
async fn a_config_set_changed_after_its_staging_is_pulled_again_in_the_window() {
    let mut p = Pair::new(None, None).await;
    let o = p.origin_root();
    let t = p.target_root();
    let mtime = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000);
    let at = |path: &Path, content: &[u8]| {
        write(path, content, 0o640);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    };
    at(&o.join("etc/bm/bm.ini"), b"[global]\npassword = first\n");
    at(&o.join("etc/bm/old.ini"), b"gone before the window\n");
    at(
        &o.join("etc/postfix/main.cf"),
        b"mynetworks = 198.18.0.0/24\n",
    );
    p.grant_with(config_grant("grant-0009-config")).await;
    let copy = |operation: &str, stage: bool| {
        let request = CopyConfigRequest {
            operation_id: operation.into(),
            origin: Some(p.endpoint("grant-0009-config")),
            origin_queue_empty: true,
            stage,
        };
        let mut target = p.target.clone();
        async move { target.copy_config(request).await.unwrap().into_inner() }
    };
    for (k, change) in ["rewritten", "gone", "mode"].iter().enumerate() {
        let staged = copy(&format!("m1/pre-window/{k}/config-staged"), true).await;
        assert!(staged.ok, "{staged:?}");
        let wanted: &[u8] = match *change {
            // Same size, same modification time, other content: a quick check misses it.
            "rewritten" => {
                at(&o.join("etc/bm/bm.ini"), b"[global]\npassword = secnd\n");
                b"[global]\npassword = secnd\n"
            }
            "gone" => {
                std::fs::remove_file(o.join("etc/bm/old.ini")).unwrap();
                b"[global]\npassword = secnd\n"
            }
            _ => {
                std::fs::set_permissions(
                    o.join("etc/bm/bm.ini"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .unwrap();
                b"[global]\npassword = secnd\n"
            }
        };
        let reply = copy(&format!("m1/config/{k}"), false).await;
        assert!(reply.ok, "{change}: {reply:?}");
        assert!(
            reply.set_from.starts_with("pulled in the window"),
            "{change}: {}",
            reply.set_from
        );
        assert_eq!(std::fs::read(t.join("etc/bm/bm.ini")).unwrap(), wanted);
        let (a, b) = (
            o.join("etc/bm/bm.ini").metadata().unwrap(),
            t.join("etc/bm/bm.ini").metadata().unwrap(),
        );
        assert_eq!((a.mode(), a.mtime()), (b.mode(), b.mtime()), "{change}");
    }
    // Nothing changed since the last staging: the staged copy is installed.
    let staged = copy("m1/pre-window/3/config-staged", true).await;
    assert!(staged.ok, "{staged:?}");
    let reply = copy("m1/config/3", false).await;
    assert!(
        reply.ok
            && reply
                .set_from
                .starts_with("the copy staged before the window"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn the_origins_queue_is_pulled_unless_its_stop_found_it_empty() {
    let mut p = Pair::new(None, None).await;
    let o = p.origin_root();
    write(&o.join("etc/bm/bm.ini"), b"[global]\n", 0o640);
    write(
        &o.join("var/spool/postfix/deferred/A/A1B2C3"),
        b"a deferred message\n",
        0o700,
    );
    p.grant_with(config_grant("grant-0008-config")).await;
    let queued = p.target_root().join("var/spool/postfix/deferred/A/A1B2C3");
    let copy = |operation: &str, origin_queue_empty: bool| {
        let request = CopyConfigRequest {
            operation_id: operation.into(),
            origin: Some(p.endpoint("grant-0008-config")),
            origin_queue_empty,
            ..Default::default()
        };
        let mut target = p.target.clone();
        async move { target.copy_config(request).await.unwrap().into_inner() }
    };
    // The stop said the queue was empty: the config set arrives, the queue is not pulled.
    let reply = copy("m1/config/queue-empty", true).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        std::fs::read(p.target_root().join("etc/bm/bm.ini")).unwrap(),
        b"[global]\n"
    );
    assert!(reply.queue_files.is_empty(), "{reply:?}");
    assert!(!queued.exists(), "the queue was pulled");
    // Not said (an orchestrator restarted since the stop, or messages were there): pulled.
    let reply = copy("m1/config/queue-unknown", false).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        reply.queue_files,
        vec!["/var/spool/postfix/deferred/A/A1B2C3".to_string()]
    );
    assert_eq!(std::fs::read(&queued).unwrap(), b"a deferred message\n");
}

#[tokio::test]
async fn a_hostile_origin_cannot_write_outside_the_targets_config_patterns() {
    // The origin's agent.toml is the origin's: a compromised host lists /etc/cron.d and
    // /root/.ssh in its own patterns. The target installs only what its patterns name.
    let mut p = Pair::new(None, None).await;
    let (hostile, endpoint) = p
        .hostile_origin(
            |c| {
                c.config_set.patterns = vec![
                    "/etc/bm".into(),
                    "/etc/cron.d".into(),
                    "/root/.ssh".into(),
                    "/etc".into(),
                ];
                // Its "mail queue" is its whole root: it sends /hold/… and /deferred/….
                c.mail_queue.dir = "/".into();
            },
            config_grant("grant-0007-config"),
        )
        .await;
    let o = p.origin_root();
    write(&o.join("etc/bm/bm.ini"), b"[global]\n", 0o640);
    write(&o.join("etc/bm/bm-tool"), b"#!/bin/sh\n", 0o4755);
    write(&o.join("etc/cron.d/evil"), b"* * * * * root id\n", 0o4755);
    write(
        &o.join("root/.ssh/authorized_keys"),
        b"ssh-ed25519 AAAA evil\n",
        0o600,
    );
    write(&o.join("etc/passwd"), b"evil::0:0::/:/bin/sh\n", 0o644);
    write(&o.join("hold/passwd"), b"evil::0:0::/:/bin/sh\n", 0o644);
    write(&o.join("deferred/A/Q1"), b"a queue file\n", 0o4700);
    let t = p.target_root();
    write(&t.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n", 0o644);
    std::fs::set_permissions(t.join("etc"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(o.join("etc"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let reply = p
        .target
        .copy_config(CopyConfigRequest {
            operation_id: "m1/config/hostile".into(),
            origin: Some(endpoint),
            origin_queue_empty: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.ok, "{reply:?}");
    assert!(!t.join("etc/cron.d").exists(), "etc/cron.d landed");
    assert!(!t.join("root/.ssh").exists(), "root/.ssh landed");
    assert_eq!(
        std::fs::read(t.join("etc/passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    // An ancestor keeps the target's own attributes.
    assert_eq!(t.join("etc").metadata().unwrap().mode() & 0o7777, 0o755);
    // What the patterns name arrives, without its setuid bit.
    assert_eq!(
        std::fs::read(t.join("etc/bm/bm.ini")).unwrap(),
        b"[global]\n"
    );
    assert_eq!(
        t.join("etc/bm/bm-tool").metadata().unwrap().mode() & 0o7777,
        0o755
    );
    // The target's queue is its own queue dir: what the origin calls its queue lands nowhere.
    assert!(!t.join("hold").exists() && !t.join("deferred").exists());
    assert!(reply.queue_files.is_empty(), "{reply:?}");
    for refused in [
        "/etc/cron.d",
        "/etc/passwd",
        "/root",
        "/hold/passwd",
        "/deferred/A/Q1",
    ] {
        assert!(
            reply.refused.iter().any(|r| r == refused),
            "{refused} not reported: {:?}",
            reply.refused
        );
    }
    assert!(
        reply.files.iter().all(|f| f.starts_with("/etc/bm")),
        "{:?}",
        reply.files
    );
    drop(hostile);
}

// ------------------------------------------------------------------ databases

const ORIGIN_SCHEMA: &str = "
CREATE EXTENSION hstore SCHEMA pg_catalog;
SET ROLE bj;
CREATE TABLE t_settings (id int PRIMARY KEY, value pg_catalog.hstore);
INSERT INTO t_settings SELECT i, pg_catalog.hstore('k' || i, 'v' || i) FROM generate_series(1, 50) i;
CREATE TABLE t_domain (id serial PRIMARY KEY, name text NOT NULL, aliases text[]);
CREATE TABLE t_mailbox (id bigserial PRIMARY KEY, domain_id int REFERENCES t_domain(id), login text, quota bigint, settings jsonb, avatar bytea);
CREATE TABLE t_empty (id int);
INSERT INTO t_domain (name, aliases) SELECT 'd' || i || '.example.net', ARRAY['a' || i] FROM generate_series(1, 20) i;
INSERT INTO t_mailbox (domain_id, login, quota, settings, avatar)
  SELECT 1 + i % 20, 'user' || i || E'\\tquote''s', i * 1024, jsonb_build_object('lang', 'fr', 'n', i), decode(md5(i::text), 'hex')
  FROM generate_series(1, 5000 * SCALE) i;
";

const ORIGIN_DATA_SCHEMA: &str = "
SET ROLE bj;
CREATE SCHEMA IF NOT EXISTS data AUTHORIZATION bj;
CREATE TABLE data.t_message_body (guid text PRIMARY KEY, size int, structure jsonb, preview text);
INSERT INTO data.t_message_body SELECT md5(i::text), i % 100000, jsonb_build_object('parts', i % 7), repeat('é', i % 50)
  FROM generate_series(1, 20000 * SCALE) i;
";

/// Rows are multiplied by `BMFLEET_TEST_DB_SCALE` (default 1) to compare the dump formats on
/// a bigger database: `BMFLEET_TEST_DB_SCALE=40 cargo test -p bmfleet-tests --test data_plane
/// both_databases -- --nocapture`.
fn scale() -> u64 {
    std::env::var("BMFLEET_TEST_DB_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn origin_databases(pg: &PgCluster, password: &str) {
    pg.sql(
        "postgres",
        &format!("CREATE ROLE bj LOGIN PASSWORD '{password}'; CREATE DATABASE bj OWNER bj; CREATE DATABASE \"bj-data\" OWNER bj;"),
    );
    let scale = scale().to_string();
    pg.sql("bj", &ORIGIN_SCHEMA.replace("SCALE", &scale));
    pg.sql("bj-data", &ORIGIN_DATA_SCHEMA.replace("SCALE", &scale));
}

/// Every process command line seen while `running` is set, sampled every few milliseconds.
fn watch_command_lines(
    running: Arc<std::sync::atomic::AtomicBool>,
    needle: String,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut hits = Vec::new();
        while running.load(std::sync::atomic::Ordering::SeqCst) {
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
                    let line = String::from_utf8_lossy(&c).replace('\0', " ");
                    if line.contains(&needle) {
                        hits.push(line);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        hits
    })
}

#[tokio::test]
async fn both_databases_move_identically_in_both_formats_and_the_password_stays_hidden() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let password = format!("pw-{}-generated", bmfleet_agent::plane::grants::now_ms());
    origin_databases(&origin_pg, &password);
    // BlueMind's installer makes bj a superuser: the restore runs without that, and bj gets it
    // back after.
    target_pg.sql("postgres", "CREATE ROLE bj LOGIN SUPERUSER;");
    let mut p = Pair::new(Some(&origin_pg), Some(&target_pg)).await;
    write(
        &p.origin_root().join("etc/bm/bm.ini"),
        format!("[global]\nlogin = bj\npassword = {password}\n").as_bytes(),
        0o600,
    );
    p.grant_with(GrantRequest {
        grant_id: "grant-0007-databases".into(),
        target_name: "target-1".into(),
        migration: "m1".into(),
        paths: vec![],
        config_set: false,
        databases: true,
        replication: false,
        expires_at_unix_ms: bmfleet_agent::plane::grants::now_ms() + 600_000,
    })
    .await;

    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = watch_command_lines(running.clone(), password.clone());
    let mut timings = Vec::new();
    for (n, format) in [DumpFormat::Streamed, DumpFormat::Parallel]
        .into_iter()
        .enumerate()
    {
        let started = Instant::now();
        let reply = p
            .target
            .move_databases(MoveDatabasesRequest {
                operation_id: format!("m1/db/{n}"),
                origin: Some(p.endpoint("grant-0007-databases")),
                format: format.into(),
                jobs: 2,
                promote: false,
                origin_wal_position: None,
            })
            .await
            .unwrap()
            .into_inner();
        timings.push((format, started.elapsed()));
        assert!(reply.ok, "{format:?}: {reply:?}");
        assert_eq!(reply.gate, "every table compared (dump and restore)");
        let names: Vec<_> = reply.databases.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["bj", "bj-data"]);
        let tables: Vec<_> = reply
            .databases
            .iter()
            .flat_map(|d| d.tables.iter())
            .collect();
        assert_eq!(tables.len(), 5);
        assert!(tables
            .iter()
            .all(|t| t.equal && t.origin_rows == t.target_rows));
        // Independently of the agent's own comparison: the rows are the same.
        for (db, query) in [
            (
                "bj",
                "SELECT id, domain_id, login, quota, settings, avatar FROM t_mailbox ORDER BY id",
            ),
            ("bj-data", "SELECT * FROM data.t_message_body ORDER BY guid"),
            ("bj", "SELECT * FROM t_settings ORDER BY id"),
        ] {
            assert_eq!(origin_pg.sql(db, query), target_pg.sql(db, query), "{db}");
        }
        // Every object the restore made belongs to bj, and bj is a superuser again.
        assert_eq!(
            target_pg
                .sql(
                    "bj",
                    "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'",
                )
                .trim(),
            "bj"
        );
        assert_eq!(
            target_pg
                .sql(
                    "postgres",
                    "SELECT rolsuper FROM pg_roles WHERE rolname = 'bj'"
                )
                .trim(),
            "t"
        );
        assert_eq!(
            target_pg.sql("bj", "SELECT count(*) FROM t_mailbox").trim(),
            (5000 * scale()).to_string()
        );
    }
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let hits = watcher.join().unwrap();
    assert!(
        hits.is_empty(),
        "the password showed in a command line: {hits:?}"
    );
    let size = origin_pg.sql(
        "postgres",
        "SELECT sum(pg_database_size(datname)) FROM pg_database WHERE datname LIKE 'bj%'",
    );
    for (format, took) in &timings {
        eprintln!(
            "database move {format:?}: {:.2}s ({} bytes of databases)",
            took.as_secs_f64(),
            size.trim()
        );
    }
    // The target's role now has the origin's password (the copied bm.ini will say so).
    let login = std::process::Command::new(
        bmfleet_agent::db::pg::bin_dir(&Default::default()).join("psql"),
    )
    .args([
        "-X",
        "-A",
        "-t",
        "-h",
        "127.0.0.1",
        "-p",
        &target_pg.port.to_string(),
        "-U",
        "bj",
        "-d",
        "bj",
        "-c",
        "SELECT current_user",
    ])
    .env("PGPASSWORD", &password)
    .output()
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&login.stdout).trim(),
        "bj",
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let _ = &p.dir;
}

/// What a hostile origin's databases try on the target, and what the test checks.
struct Attack {
    /// Written by COPY … TO PROGRAM (a shell as the postgres user), never to be created.
    marker: PathBuf,
    _dir: tempfile::TempDir,
}

impl Attack {
    fn new() -> Attack {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        Attack {
            marker: dir.path().join("pwned"),
            _dir: dir,
        }
    }

    /// SQL that, run by a superuser, runs a shell, gives `postgres` a password and grants bj
    /// every power.
    fn payload(&self) -> String {
        format!(
            "COPY (SELECT 1) TO PROGRAM 'touch {m}'; ALTER ROLE postgres PASSWORD 'owned'; \
             ALTER ROLE bj SUPERUSER CREATEROLE;",
            m = self.marker.display()
        )
    }

    /// The target's state the attack must not have changed.
    fn assert_target_untouched(&self, target: &PgCluster) {
        assert!(!self.marker.exists(), "a shell ran on the target");
        assert_eq!(
            target
                .sql(
                    "postgres",
                    "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'postgres'"
                )
                .trim(),
            "t",
            "postgres got a password"
        );
        assert_eq!(
            target.sql("victim", "SELECT secret FROM precious").trim(),
            "still here"
        );
        assert_eq!(
            target
                .sql(
                    "postgres",
                    "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = 'bj'"
                )
                .trim(),
            "f"
        );
    }
}

#[tokio::test]
async fn a_hostile_origin_cannot_run_code_or_touch_other_databases_on_the_target() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let attack = Attack::new();
    let password = "pw-hostile";
    origin_pg.sql(
        "postgres",
        &format!(
            "CREATE ROLE bj LOGIN PASSWORD '{password}'; CREATE DATABASE bj OWNER bj; \
                  CREATE DATABASE victim OWNER bj; ALTER ROLE postgres PASSWORD '{password}';"
        ),
    );
    // A check constraint whose function attacks when it is evaluated on the target's port
    // (restoring the rows evaluates it); on the origin it does nothing.
    origin_pg.sql(
        "bj",
        &format!(
            "CREATE FUNCTION public.evil(x int) RETURNS int LANGUAGE plpgsql AS $f$ \
             BEGIN IF current_setting('port') = '{port}' THEN EXECUTE {payload}; END IF; RETURN x; END $f$; \
             ALTER FUNCTION public.evil(int) OWNER TO bj; \
             SET ROLE bj; CREATE TABLE t (id int CHECK (public.evil(id) > 0)); INSERT INTO t VALUES (1);",
            port = target_pg.port,
            payload = bmfleet_agent::db::pg::literal(&attack.payload()),
        ),
    );
    target_pg.sql("postgres", "CREATE ROLE bj LOGIN; CREATE DATABASE victim; ");
    target_pg.sql(
        "victim",
        "CREATE TABLE precious (secret text); INSERT INTO precious VALUES ('still here');",
    );
    let p = Pair::new(Some(&origin_pg), Some(&target_pg)).await;
    write(
        &p.origin_root().join("etc/bm/bm.ini"),
        format!("[global]\npassword = {password}\n").as_bytes(),
        0o600,
    );
    let grant = |id: &str| GrantRequest {
        grant_id: id.into(),
        target_name: "target-1".into(),
        migration: "m1".into(),
        paths: vec![],
        config_set: false,
        databases: true,
        replication: false,
        expires_at_unix_ms: bmfleet_agent::plane::grants::now_ms() + 600_000,
    };
    let moved = |endpoint: OriginEndpoint, op: &'static str| {
        let mut target = p.target.clone();
        async move {
            target
                .move_databases(MoveDatabasesRequest {
                    operation_id: op.into(),
                    origin: Some(endpoint),
                    format: DumpFormat::Streamed.into(),
                    jobs: 1,
                    promote: false,
                    origin_wal_position: None,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };

    // 1. The origin's manifest names the target's other database and the postgres role; its
    // archive holds an index that attacks when restored.
    let (hostile, endpoint) = p
        .hostile_origin(
            |c| {
                c.postgresql.databases = vec!["bj".into(), "victim".into()];
                c.postgresql.user = "postgres".into();
            },
            grant("grant-0010-hostile-databases"),
        )
        .await;
    let reply = moved(endpoint, "m1/db/hostile").await;
    assert!(!reply.ok, "{reply:?}");
    assert!(
        reply.error.contains("must be superuser")
            && reply.error.contains("pg_execute_server_program"),
        "the attack fails as bj: {}",
        reply.error
    );
    attack.assert_target_untouched(&target_pg);
    drop(hostile);

    // 2. A "pg_dump" of the origin's choosing serves plain SQL with psql meta-commands.
    let bin = p.dir.path().join("hostile-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = bmfleet_agent::db::pg::bin_dir(&Default::default());
    std::os::unix::fs::symlink(real.join("psql"), bin.join("psql")).unwrap();
    write(
        &bin.join("pg_dump"),
        format!(
            "#!/bin/sh\ncat <<'EOF'\n\\! touch {m}\nDROP DATABASE victim;\n{payload}\nEOF\n",
            m = attack.marker.display(),
            payload = attack.payload()
        )
        .as_bytes(),
        0o755,
    );
    let (hostile, endpoint) = p
        .hostile_origin(
            |c| c.postgresql.bin_dir = Some(bin.clone()),
            grant("grant-0011-plain-sql"),
        )
        .await;
    let reply = moved(endpoint, "m1/db/plain").await;
    assert!(!reply.ok, "{reply:?}");
    assert!(reply.error.contains("pg_restore"), "{}", reply.error);
    attack.assert_target_untouched(&target_pg);
    drop(hostile);
}

#[tokio::test]
async fn a_warmed_psql_session_answers_and_one_whose_backend_ended_is_replaced() {
    use bmfleet_agent::db::pg::Connection;
    let pg = PgCluster::start();
    let admin = Connection::admin(&pg.agent_settings());
    admin.warm("postgres", 2).await;
    let others = "SELECT pid FROM pg_catalog.pg_stat_activity \
                  WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid() ORDER BY pid";
    let deadline = Instant::now() + Duration::from_secs(10);
    let warmed: Vec<String> = loop {
        let pids: Vec<String> = pg
            .sql("postgres", others)
            .lines()
            .map(str::to_string)
            .collect();
        if pids.len() == 2 || Instant::now() > deadline {
            break pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(warmed.len(), 2, "two warmed sessions connected: {warmed:?}");
    // Taken for a query: a warmed session answers (its backend is one of them).
    let first = admin
        .psql_warm("postgres", "SELECT pg_catalog.pg_backend_pid();")
        .await
        .unwrap();
    assert!(
        warmed.contains(&first.trim().to_string()),
        "{first} not in {warmed:?}"
    );
    // The other's backend ends (as a server restart ends it): a fresh psql answers instead.
    let other = warmed.iter().find(|p| **p != first.trim()).unwrap();
    pg.sql(
        "postgres",
        &format!("SELECT pg_catalog.pg_terminate_backend({other});"),
    );
    let second = admin
        .psql_warm("postgres", "SELECT pg_catalog.pg_backend_pid();")
        .await
        .unwrap();
    let second = second.trim().to_string();
    assert!(
        !second.is_empty() && !warmed.contains(&second),
        "{second} in {warmed:?}"
    );
    // None is left waiting: one was taken, the other ended.
    assert!(
        pg.sql("postgres", others).trim().is_empty(),
        "no session left waiting"
    );
}

#[tokio::test]
async fn a_wal_position_read_leaves_nothing_unflushed_behind_it() {
    let pg = PgCluster::start();
    let pki = TestPki::new();
    let dir = open_tempdir();
    let mut config = agent_config(pki.issue("origin-1", Role::Agent), dir.path(), vec![]);
    config.postgresql = pg.agent_settings();
    // BlueMind's commits are asynchronous (the lab's cluster runs with synchronous_commit off).
    pg.sql(
        "postgres",
        "CREATE TABLE written (n int); INSERT INTO written SELECT generate_series(1, 1000);",
    );
    let unflushed = || {
        // Read only: no record of its own.
        let out = pg.sql(
            "postgres",
            "SELECT pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.pg_current_wal_flush_lsn();",
        );
        let (insert, flush) = out.trim().split_once('|').expect("two positions");
        let lsn = |t: &str| bmfleet_agent::db::wal::parse_lsn(t).expect("an LSN");
        // A page header the next record would start after is not a record.
        let end = bmfleet_agent::db::wal::caught_up_at(lsn(insert), 16 << 20);
        end.saturating_sub(lsn(flush))
    };
    for read in 1..=3 {
        let position = bmfleet_agent::db::wal::wal_position(&config)
            .await
            .expect("the position");
        // What the read names is flushed, and so is what the read itself wrote: the next read
        // (the gate's, right after the stop's) has nothing to wait for.
        let left = unflushed();
        assert!(
            left == 0,
            "read {read} at {}: {left} bytes of WAL inserted but not flushed after it",
            position.lsn
        );
    }
}

#[tokio::test]
async fn table_checksums_ignore_row_order_and_tell_a_changed_row() {
    use bmfleet_agent::db::pg::{Checksum, Connection};
    let pg = PgCluster::start();
    pg.sql("postgres", "CREATE DATABASE a; CREATE DATABASE b;");
    let table = "CREATE TABLE t (id int, v text, f float8); \
                 INSERT INTO t SELECT i, 'v' || i, i / 3.0 FROM generate_series(1, 20000) i ORDER BY ";
    pg.sql("a", &format!("{table} i;"));
    pg.sql("b", &format!("{table} random();"));
    let admin = Connection::admin(&pg.agent_settings());
    for checksum in [Checksum::Hash64, Checksum::Md5] {
        let sum = |db: &'static str| {
            let admin = admin.clone();
            async move { admin.manifest(db, checksum).await.unwrap().tables[0].clone() }
        };
        let (a, b) = (sum("a").await, sum("b").await);
        assert_eq!(a.rows, 20_000);
        assert_eq!(a, b, "{checksum:?}: same rows in another order");
        pg.sql("b", "UPDATE t SET v = 'changed' WHERE id = 777;");
        let changed = sum("b").await;
        assert_eq!(changed.rows, a.rows);
        assert_ne!(
            changed.checksum, a.checksum,
            "{checksum:?}: one changed row"
        );
        pg.sql("b", "UPDATE t SET v = 'v777' WHERE id = 777;");
    }
    assert_ne!(
        admin.manifest("a", Checksum::Hash64).await.unwrap().tables[0].checksum,
        admin.manifest("a", Checksum::Md5).await.unwrap().tables[0].checksum,
        "two methods never compare equal"
    );
}

/// A config-set grant of the pair's migration.
fn config_grant(id: &str) -> GrantRequest {
    GrantRequest {
        grant_id: id.into(),
        target_name: "target-1".into(),
        migration: "m1".into(),
        config_set: true,
        expires_at_unix_ms: bmfleet_agent::plane::grants::now_ms() + 600_000,
        ..Default::default()
    }
}

/// A databases grant of the pair's migration.
fn databases_grant(id: &str) -> GrantRequest {
    GrantRequest {
        grant_id: id.into(),
        target_name: "target-1".into(),
        migration: "m1".into(),
        databases: true,
        expires_at_unix_ms: bmfleet_agent::plane::grants::now_ms() + 600_000,
        ..Default::default()
    }
}

/// A replication grant of the pair's migration.
fn replication_grant(id: &str) -> GrantRequest {
    GrantRequest {
        grant_id: id.into(),
        target_name: "target-1".into(),
        migration: "m1".into(),
        replication: true,
        expires_at_unix_ms: bmfleet_agent::plane::grants::now_ms() + 600_000,
        ..Default::default()
    }
}

async fn follow(p: &mut Pair, operation: &str, grant: &str) -> FollowDatabasesReply {
    p.target
        .follow_databases(FollowDatabasesRequest {
            operation_id: operation.into(),
            origin: Some(p.endpoint(grant)),
            logical: false,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The origin stopped: the target catches up under a new databases grant `grant`, takes over
/// and compares every table.
async fn promote(p: &mut Pair, operation: &str, grant: &str) -> MoveDatabasesReply {
    p.grant_with(databases_grant(grant)).await;
    p.target
        .move_databases(MoveDatabasesRequest {
            operation_id: operation.into(),
            origin: Some(p.endpoint(grant)),
            promote: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls `sql` on `pg` until it prints `want` (60 s at most: the test binary runs its
/// clusters side by side on the CI's two cores).
fn wait_sql(pg: &PgCluster, db: &str, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = pg.sql(db, sql);
        if got.trim() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {got:?}, not {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// BlueMind writing on `pg`'s bj as its role, batch after batch (`batch(n)`'s SQL) until
/// `stop`: every batch must succeed. Returns how many ran.
fn bluemind_writes(
    pg: &PgCluster,
    stop: Arc<std::sync::atomic::AtomicBool>,
    batch: impl Fn(u32) -> String + Send + 'static,
) -> std::thread::JoinHandle<u32> {
    let socket = pg.socket_dir();
    let port = pg.port;
    std::thread::spawn(move || {
        let mut batches = 0u32;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let out = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--", "psql", "-X", "-q", "-h"])
                .arg(&socket)
                .args(["-p", &port.to_string(), "-d", "bj", "-c", &batch(batches)])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "BlueMind's write failed on the origin: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            batches += 1;
        }
        batches
    })
}

// Multi-threaded: the agents serve while the test waits on blocking SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_follows_writes_up_to_the_stop_and_is_promoted_equal_to_the_origin() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let password = format!("pw-{}-standby", bmfleet_agent::plane::grants::now_ms());
    origin_databases(&origin_pg, &password);
    origin_pg.sql(
        "bj",
        "SET ROLE bj; CREATE TABLE t_nopk (k int, v text); CREATE SEQUENCE s_ids; \
         INSERT INTO t_nopk SELECT i, 'v' || i FROM generate_series(1, 1000) i;",
    );
    // A hostile origin's own settings travel in its data directory: none may reach the target.
    origin_pg.sql(
        "postgres",
        "ALTER SYSTEM SET archive_command = 'touch /tmp/bmfleet-pwned'; \
         ALTER SYSTEM SET shared_preload_libraries = 'pwned';",
    );
    // The target's empty BlueMind database is replaced; its own settings stay.
    target_pg.sql("postgres", "CREATE DATABASE bj;");
    let target_data = target_pg.dir().join("data");
    let own_hba = std::fs::read(target_data.join("pg_hba.conf")).unwrap();
    let mut p = Pair::with_settings(
        Some(origin_pg.agent_settings()),
        Some(target_pg.standby_settings()),
    )
    .await;
    write(
        &p.origin_root().join("etc/bm/bm.ini"),
        format!("[global]\nlogin = bj\npassword = {password}\n").as_bytes(),
        0o600,
    );
    p.grant_with(replication_grant("grant-0100-replication"))
        .await;
    let reply = follow(&mut p, "m1/follow/1", "grant-0100-replication").await;
    assert!(reply.ok, "{}", reply.error);
    assert!(reply.base_backup_bytes > 1_000_000, "{reply:?}");
    assert_eq!(
        origin_pg
            .sql(
                "postgres",
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'bmfleet_slot_%';"
            )
            .trim(),
        "1"
    );
    assert_eq!(
        target_pg
            .sql("postgres", "SELECT pg_is_in_recovery();")
            .trim(),
        "t"
    );
    assert_eq!(
        std::fs::read(target_data.join("pg_hba.conf")).unwrap(),
        own_hba
    );
    let auto = std::fs::read_to_string(target_data.join("postgresql.auto.conf")).unwrap();
    assert!(
        !auto.contains("archive_command") && !auto.contains("pwned"),
        "{auto}"
    );
    // The WAL arrives through the relay (the agents' tunnel), not a direct connection.
    wait_sql(
        &origin_pg,
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'bmfleet' AND state = 'streaming';",
        "1",
    );

    // BlueMind writes while the standby follows, right up to the stop: inserts, updates and
    // deletes on a table without a primary key (a physical standby needs none), sequences.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = bluemind_writes(&origin_pg, stop.clone(), |i| {
        format!(
            "SET ROLE bj; BEGIN; INSERT INTO t_nopk VALUES ({k}, 'new{i}'); \
             UPDATE t_nopk SET v = v || 'u' WHERE k % 13 = {m}; DELETE FROM t_nopk WHERE k = {i}; \
             SELECT nextval('s_ids'); \
             INSERT INTO t_mailbox (domain_id, login, quota) VALUES (1, 'w{i}', {i}); COMMIT;",
            k = 100_000 + i,
            m = i % 13
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let batches = writer.join().unwrap();
    assert!(batches > 3, "{batches} write batches");

    // The stop: catch up, promote, compare.
    let moved = promote(&mut p, "m1/db/promote", "grant-0101-databases").await;
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    let names: Vec<&str> = moved.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["bj", "bj-data"]);
    let tables: usize = moved.databases.iter().map(|d| d.tables.len()).sum();
    assert!(tables >= 5, "{tables} tables compared");
    for sql in [
        "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k, v)) FROM t_nopk;",
        "SELECT count(*) FROM t_mailbox;",
    ] {
        assert_eq!(origin_pg.sql("bj", sql), target_pg.sql("bj", sql), "{sql}");
    }
    // A sequence is WAL-logged ahead of its use (32 values): the promoted copy goes on from
    // at or past the origin's last value, never below it.
    assert_eq!(
        origin_pg.sql("bj", "SELECT last_value FROM s_ids;").trim(),
        batches.to_string()
    );
    let next: u32 = target_pg
        .sql("bj", "SELECT nextval('s_ids');")
        .trim()
        .parse()
        .unwrap();
    assert!(
        next > batches,
        "nextval {next} after {batches} on the origin"
    );
    // Promoted: writable, its own settings back without the replication password.
    assert_eq!(
        target_pg
            .sql("postgres", "SELECT pg_is_in_recovery();")
            .trim(),
        "f"
    );
    target_pg.sql("bj", "INSERT INTO t_nopk VALUES (-1, 'after');");
    let auto = std::fs::read_to_string(target_data.join("postgresql.auto.conf")).unwrap();
    assert!(!auto.contains("primary_conninfo"), "{auto}");
    assert!(!target_pg.dir().join("data.bmfleet-target").exists());
    // The origin's replication role came along in the copy of its catalog: it is gone.
    assert_eq!(
        target_pg
            .sql(
                "postgres",
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%';"
            )
            .trim(),
        "0"
    );

    // The instance ends: its grants go, and with them the slot and the role.
    p.origin
        .revoke_grant(bmfleet_proto::v1::RevokeGrantRequest {
            target_name: "target-1".into(),
            migration: "m1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_sql(
        &origin_pg,
        "postgres",
        "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%');",
        "0",
    );
    // The WAL cap is reset (after the slot and the role: waited for).
    wait_sql(&origin_pg, "postgres", "SHOW max_slot_wal_keep_size;", "-1");
}

async fn verify(p: &mut Pair) -> bmfleet_proto::v1::VerifyFollowingReply {
    p.target
        .verify_following(bmfleet_proto::v1::VerifyFollowingRequest {
            operation_id: "m1/prewindow/verify".into(),
            origin_name: "origin-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Takes a verified point while BlueMind writes `batch`es on `origin_pg`: the point is taken
/// and every batch succeeds (BlueMind's tables are held for a moment, never refused).
async fn verify_while_bluemind_writes(
    p: &mut Pair,
    origin_pg: &PgCluster,
    batch: impl Fn(u32) -> String + Send + 'static,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = bluemind_writes(origin_pg, stop.clone(), batch);
    std::thread::sleep(Duration::from_millis(300));
    let verified = verify(p).await;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let batches = writer.join().unwrap();
    assert!(verified.ok, "{}", verified.error);
    assert!(batches > 2, "{batches} write batches");
    assert!(
        verified.summary.starts_with("verified point at "),
        "{}",
        verified.summary
    );
}

/// A standby following `origin_pg`'s databases (with `t_big`, 100,000 rows, and `t_other`),
/// its relay streaming.
async fn standby_pair(origin_pg: &PgCluster, target_pg: &PgCluster, tag: &str) -> Pair {
    let password = format!("pw-{}-{tag}", bmfleet_agent::plane::grants::now_ms());
    origin_databases(origin_pg, &password);
    origin_pg.sql(
        "bj",
        "SET ROLE bj; CREATE TABLE t_big (k int, v text); CREATE TABLE t_other (k int); \
         INSERT INTO t_big SELECT i, md5(i::text) FROM generate_series(1, 100000) i; \
         INSERT INTO t_other SELECT generate_series(1, 100);",
    );
    target_pg.sql("postgres", "CREATE DATABASE bj;");
    let mut p = Pair::with_settings(
        Some(origin_pg.agent_settings()),
        Some(target_pg.standby_settings()),
    )
    .await;
    write(
        &p.origin_root().join("etc/bm/bm.ini"),
        format!("[global]\nlogin = bj\npassword = {password}\n").as_bytes(),
        0o600,
    );
    p.grant_with(replication_grant("grant-0300-replication"))
        .await;
    let reply = follow(&mut p, "m1/follow/1", "grant-0300-replication").await;
    assert!(reply.ok, "{}", reply.error);
    let streaming = std::panic::catch_unwind(|| {
        wait_sql(
            origin_pg,
            "postgres",
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'bmfleet' AND state = 'streaming';",
            "1",
        )
    });
    if let Err(e) = streaming {
        let tail = |pg: &PgCluster| {
            let log = std::fs::read_to_string(pg.dir().join("log")).unwrap_or_default();
            log.lines().rev().take(15).collect::<Vec<_>>().join("\n")
        };
        eprintln!(
            "the standby never streamed; the target's log (newest first):\n{}\nthe origin's:\n{}\norigin's walsenders: {}\ntarget's walreceiver: {}",
            tail(target_pg),
            tail(origin_pg),
            origin_pg.sql("postgres", "SELECT application_name, state, client_addr, sent_lsn, replay_lsn, pg_current_wal_flush_lsn() FROM pg_stat_replication; SELECT pid, usename, application_name, backend_type, state FROM pg_stat_activity WHERE backend_type <> 'client backend';"),
            target_pg.sql("postgres", "SELECT status, sender_host, sender_port, conninfo FROM pg_stat_wal_receiver;"),
        );
        std::panic::resume_unwind(e);
    }
    p
}

fn table<'a>(moved: &'a MoveDatabasesReply, name: &str) -> &'a bmfleet_proto::v1::TableComparison {
    moved
        .databases
        .iter()
        .flat_map(|d| d.tables.iter())
        .find(|t| t.table == name)
        .unwrap_or_else(|| panic!("{name} not compared: {moved:?}"))
}

// Multi-threaded: the agents serve while the test waits on blocking SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_verified_point_the_downtime_compares_only_the_changed_blocks() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let mut p = standby_pair(&origin_pg, &target_pg, "verified").await;

    // BlueMind keeps writing while the point is taken: its tables are held for a moment,
    // never refused (every batch must succeed).
    verify_while_bluemind_writes(&mut p, &origin_pg, |i| {
        format!(
            "SET ROLE bj; BEGIN; INSERT INTO t_other VALUES ({i}); \
             INSERT INTO t_mailbox (domain_id, login, quota) VALUES (1, 'v{i}', {i}); COMMIT;"
        )
    })
    .await;
    assert_eq!(
        origin_pg
            .sql(
                "postgres",
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'bmfleet_gate_%';"
            )
            .trim(),
        "1",
        "the WAL since the verified point is kept"
    );

    // The day's changes after the point: a few rows of the big table updated, deleted and
    // inserted; a table emptied by TRUNCATE (a new file); a new table.
    origin_pg.sql(
        "bj",
        "SET ROLE bj; UPDATE t_big SET v = 'changed' WHERE k IN (10, 50000, 99999); \
         DELETE FROM t_big WHERE k = 20; INSERT INTO t_big VALUES (-1, 'new'); \
         TRUNCATE t_other; INSERT INTO t_other VALUES (7); \
         CREATE TABLE t_new AS SELECT generate_series(1, 10) AS k;",
    );
    let blocks_of_big: u64 = origin_pg
        .sql("bj", "SELECT pg_relation_size('t_big') / 8192;")
        .trim()
        .parse()
        .unwrap();

    let moved = promote(&mut p, "m1/db/promote", "grant-0301-databases").await;
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    assert!(
        moved.gate.starts_with("changes since the verified point"),
        "{}",
        moved.gate
    );
    // The big table: only the named blocks (those of the changed rows, a handful), not its
    // hundreds; the rewritten and the new table in full.
    let big = table(&moved, "public.t_big");
    assert!(big.equal);
    let compared_blocks: u64 = big
        .origin_checksum
        .strip_prefix("h64 blocks ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{big:?}"));
    assert!(
        (3..=12).contains(&compared_blocks) && blocks_of_big > 500,
        "{compared_blocks} of {blocks_of_big} blocks compared"
    );
    assert!(big.origin_rows >= 4 && big.origin_rows < 2_000, "{big:?}");
    for full in ["public.t_other", "public.t_new"] {
        let t = table(&moved, full);
        assert!(
            t.equal && t.origin_checksum.starts_with("h64 full"),
            "{t:?}"
        );
        assert!(moved.gate.contains(&format!("bj.{full}")), "{}", moved.gate);
    }
    // And what the gate says holds: the databases are equal (counted here, in full).
    for sql in [
        "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k, v)) FROM t_big;",
        "SELECT count(*), sum(k) FROM t_other;",
        "SELECT count(*) FROM t_new;",
        "SELECT count(*) FROM t_mailbox;",
    ] {
        assert_eq!(origin_pg.sql("bj", sql), target_pg.sql("bj", sql), "{sql}");
    }
    // The instance ends: the gate's slot goes with the others.
    p.origin
        .revoke_grant(bmfleet_proto::v1::RevokeGrantRequest {
            target_name: "target-1".into(),
            migration: "m1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_sql(
        &origin_pg,
        "postgres",
        "SELECT count(*) FROM pg_replication_slots;",
        "0",
    );
}

/// An idle origin whose WAL was switched to a new segment right before the stop: its insert
/// position is just past the new segment's header, which nothing flushes until the next
/// record. The gate reads up to the boundary instead of waiting for it (it waited 10 s, then
/// compared every table).
// Multi-threaded: the agents serve while the test waits on blocking SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_origin_after_a_segment_switch_passes_the_gate_without_waiting() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let mut p = standby_pair(&origin_pg, &target_pg, "idle").await;
    let verified = verify(&mut p).await;
    assert!(verified.ok, "{}", verified.error);
    origin_pg.sql(
        "bj",
        "SET ROLE bj; UPDATE t_big SET v = 'before the switch' WHERE k = 3;",
    );
    origin_pg.sql("postgres", "SELECT pg_switch_wal();");
    let moved = promote(&mut p, "m1/db/promote", "grant-0301-databases").await;
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    assert!(
        moved.gate.starts_with("changes since the verified point"),
        "{}",
        moved.gate
    );
    let big = table(&moved, "public.t_big");
    assert!(big.equal, "{big:?}");
    let sql = "SELECT v FROM t_big WHERE k = 3;";
    assert_eq!(target_pg.sql("bj", sql).trim(), "before the switch");
}

// Multi-threaded: the agents serve while the test waits on blocking SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_wal_since_the_verified_point_is_gone_the_downtime_compares_every_table() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let mut p = standby_pair(&origin_pg, &target_pg, "gone").await;
    // No verified point yet: the promotion would compare everything. Take one…
    let verified = verify(&mut p).await;
    assert!(verified.ok, "{}", verified.error);
    // …then lose the WAL it needs: the slot dropped, segments switched and recycled.
    origin_pg.sql(
        "postgres",
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'bmfleet_gate_%';",
    );
    for i in 0..4 {
        origin_pg.sql(
            "bj",
            &format!(
                "SET ROLE bj; UPDATE t_big SET v = 'round{i}' WHERE k = {};",
                1000 * (i + 1)
            ),
        );
        origin_pg.sql("postgres", "SELECT pg_switch_wal();");
    }
    // The standby has it all (it streams); the origin's old segments go at its checkpoints.
    wait_sql(
        &origin_pg,
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE replay_lsn = pg_current_wal_lsn();",
        "1",
    );
    origin_pg.sql("postgres", "CHECKPOINT;");
    origin_pg.sql("postgres", "SELECT pg_switch_wal();");
    origin_pg.sql("postgres", "CHECKPOINT;");

    let moved = promote(&mut p, "m1/db/promote", "grant-0301-databases").await;
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    assert!(
        moved
            .gate
            .starts_with("every table compared: the changes since the verified point could not be"),
        "{}",
        moved.gate
    );
    let big = table(&moved, "public.t_big");
    assert!(big.equal && big.origin_rows == 100_000, "{big:?}");
    let sql = "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k, v)) FROM t_big;";
    assert_eq!(origin_pg.sql("bj", sql), target_pg.sql("bj", sql));
}

/// A PostgreSQL library whose `_PG_init` appends to `bmfleet-planted-loaded` in the
/// backend's working directory (its cluster's data directory), built for `pg`'s major.
fn planted_library(dir: &Path, pg: &PgCluster) -> PathBuf {
    let version: u32 = pg
        .sql("postgres", "SHOW server_version_num;")
        .trim()
        .parse()
        .unwrap();
    let source = dir.join("planted.c");
    std::fs::write(
        &source,
        format!(
            "#include <fcntl.h>\n#include <unistd.h>\n\
             typedef struct {{ int version, funcmaxargs, indexmaxkeys, namedatalen, float8byval; char abi_extra[32]; }} Pg_abi_values;\n\
             typedef struct {{ int len; Pg_abi_values abi_fields; }} Pg_magic_struct;\n\
             const Pg_magic_struct *Pg_magic_func(void) {{\n\
               static const Pg_magic_struct data = {{ sizeof(Pg_magic_struct), {{ {}, 100, 32, 64, 1, \"PostgreSQL\" }} }};\n\
               return &data;\n}}\n\
             void _PG_init(void) {{\n\
               int fd = open(\"bmfleet-planted-loaded\", O_WRONLY | O_CREAT | O_APPEND, 0644);\n\
               if (fd >= 0) {{ if (write(fd, \"x\", 1) < 0) {{}} close(fd); }}\n}}\n",
            version / 100
        ),
    )
    .unwrap();
    let library = dir.join("planted.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .expect("cc (gcc) builds the planted library");
    assert!(built.status.success(), "{built:?}");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o755)).unwrap();
    library
}

/// A plain login as the administrator on `pg`, without the tests' own neutralising options.
fn plain_login(pg: &PgCluster) -> std::process::Output {
    std::process::Command::new("runuser")
        .env_remove("PGOPTIONS")
        .args(["-u", "postgres", "--"])
        .arg(pg.agent_settings().bin_dir.unwrap().join("psql"))
        .arg("-X")
        .arg("-h")
        .arg(pg.socket_dir())
        .args([
            "-p",
            &pg.port.to_string(),
            "-d",
            "postgres",
            "-c",
            "SELECT 1",
        ])
        .output()
        .unwrap()
}

/// A compromised origin plants login-time settings and an operator in what its standby
/// copies: every login as `bj` or `postgres` loads a library it shipped (as a data pass
/// would), BlueMind's database resolves `public` first and its `=` on names writes a row.
/// The target agent's sessions in the copy (the verified point, the catch-up, the promotion
/// and its comparison, the replication role's drop) load nothing and run none of it.
#[tokio::test]
async fn a_hostile_origins_login_settings_and_operators_never_run_in_the_target_agents_sessions() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let mut p = standby_pair(&origin_pg, &target_pg, "planted").await;
    let shipped = tempfile::tempdir().unwrap();
    let library = planted_library(shipped.path(), &origin_pg);
    origin_pg.sql(
        "bj",
        &format!(
            "SET ROLE bj; CREATE TABLE public.pwned (who text); \
             GRANT INSERT ON public.pwned TO PUBLIC; \
             CREATE FUNCTION public.planted_eq(name, name) RETURNS boolean LANGUAGE sql \
               AS $$ INSERT INTO public.pwned (who) VALUES (current_user) RETURNING $1::text = $2::text $$; \
             CREATE OPERATOR public.= (LEFTARG = name, RIGHTARG = name, FUNCTION = public.planted_eq); \
             RESET ROLE; ALTER DATABASE bj SET search_path = public, pg_catalog; \
             ALTER DATABASE postgres SET search_path = public, pg_catalog; \
             ALTER ROLE bj SET session_preload_libraries = '{0}'; \
             ALTER ROLE postgres SET session_preload_libraries = '{0}';",
            library.display()
        ),
    );
    let loaded = |pg: &PgCluster| pg.dir().join("data/bmfleet-planted-loaded").exists();
    // The library works: a plain login on the origin loads it.
    assert!(plain_login(&origin_pg).status.success());
    assert!(loaded(&origin_pg));
    let verified = verify(&mut p).await;
    assert!(verified.ok, "{}", verified.error);
    origin_pg.sql(
        "bj",
        "SET ROLE bj; UPDATE t_big SET v = 'after the point' WHERE k = 7;",
    );
    let moved = promote(&mut p, "m1/db/promote", "grant-0301-databases").await;
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    assert!(table(&moved, "public.t_big").equal);
    // Nothing the origin planted ran in the target agent's sessions: no library loaded in the
    // target's cluster, no row written by the operator, the replication role dropped all the
    // same, the settings still in the copy (not the agent's to change).
    assert!(
        !loaded(&target_pg),
        "the target agent's sessions loaded the planted library"
    );
    assert_eq!(
        target_pg
            .sql("bj", "SELECT count(*) FROM public.pwned;")
            .trim(),
        "0"
    );
    assert_eq!(
        target_pg
            .sql(
                "postgres",
                "SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname LIKE 'bmfleet_repl_%';"
            )
            .trim(),
        "0"
    );
    // The copy does carry the settings: a plain login on the target loads the library.
    assert!(plain_login(&target_pg).status.success());
    assert!(loaded(&target_pg));
}

/// Opens the relay under `grant` as the real target and sends one startup packet with
/// `params`; returns what came back (the relay's or the cluster's first answer) and the
/// connection.
async fn relay_startup(p: &Pair, grant: &str, params: &[(&str, &str)]) -> (String, tunnel::Tunnel) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = LocalIdentity::load(&p.target_files, Role::Agent)
        .unwrap()
        .client_config(Role::Agent)
        .unwrap();
    let mut relayed = tunnel::open(
        &p.endpoint(grant),
        tls,
        &TunnelRequest::Replication {
            grant: grant.into(),
        },
        Duration::from_secs(5),
    )
    .await
    .expect("the relay admits the grant's target");
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    relayed
        .write_all(&bmfleet_agent::db::startup::packet(&params))
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), relayed.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    (String::from_utf8_lossy(&answer[..n]).into_owned(), relayed)
}

/// A compromised target holds BlueMind's password (bm.ini) and its replication grant: through
/// the relay it reaches only its own grant's replication login, never a SQL session as `bj`
/// or `postgres`, and nothing it sends reaches the origin's cluster.
#[tokio::test]
async fn a_hostile_target_gets_only_its_grants_replication_login_through_the_relay() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    let p = standby_pair(&origin_pg, &target_pg, "relay").await;
    let (role, _) = bmfleet_agent::db::wal::names("grant-0300-replication");
    let sessions = |pg: &PgCluster| {
        pg.sql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('bj', 'postgres') AND backend_type = 'client backend' AND pid <> pg_backend_pid();",
        )
        .trim()
        .to_string()
    };
    let before = sessions(&origin_pg);
    for (params, why) in [
        (
            vec![("user", "bj"), ("database", "bj")],
            "only the grant's replication role",
        ),
        (
            vec![
                ("user", "bj"),
                ("database", "bj"),
                ("replication", "database"),
            ],
            "only the grant's replication role",
        ),
        (
            vec![("user", "postgres"), ("database", "postgres")],
            "only the grant's replication role",
        ),
        (
            vec![("user", role.as_str()), ("database", "bj")],
            "not a replication connection",
        ),
        (
            vec![
                ("user", role.as_str()),
                ("database", "bj"),
                ("replication", "database"),
            ],
            "did not publish",
        ),
        (
            vec![
                ("user", role.as_str()),
                ("replication", "true"),
                ("options", "-c session_preload_libraries=/tmp/x.so"),
            ],
            "session_preload_libraries",
        ),
    ] {
        let (answer, _) = relay_startup(&p, "grant-0300-replication", &params).await;
        assert!(
            answer.starts_with('E')
                && answer.contains("bmfleet relay: refused")
                && answer.contains(why),
            "{params:?}: {answer:?}"
        );
    }
    // Nothing reached the cluster: no session as bj or postgres, the table as it was, the
    // standby still streaming.
    assert_eq!(sessions(&origin_pg), before);
    assert_eq!(
        origin_pg.sql("bj", "SELECT count(*) FROM t_big;").trim(),
        "100000"
    );
    wait_sql(
        &origin_pg,
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'bmfleet' AND state = 'streaming';",
        "1",
    );
    // The grant's own replication login does reach the cluster (its password is the
    // standby's): the cluster itself answers, asking for authentication.
    let (answer, mut relayed) = relay_startup(
        &p,
        "grant-0300-replication",
        &[("user", role.as_str()), ("replication", "true")],
    )
    .await;
    assert!(answer.starts_with('R'), "{answer:?}");
    // The grant revoked, the relay ends (the cluster would wait a minute for the password).
    let mut p = p;
    p.origin
        .revoke_grant(bmfleet_proto::v1::RevokeGrantRequest {
            target_name: "target-1".into(),
            migration: "m1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut relayed, &mut rest),
    )
    .await;
    assert!(ended.is_ok(), "the relay outlived its grant");
}

#[tokio::test]
async fn following_is_refused_out_of_scope_and_a_failed_follow_leaves_the_cluster_as_it_was() {
    let (origin_pg, target_pg) = (PgCluster::start(), PgCluster::start());
    origin_databases(&origin_pg, "pw");
    target_pg.sql("postgres", "CREATE DATABASE bj;");
    target_pg.sql(
        "bj",
        "CREATE TABLE kept (n int); INSERT INTO kept VALUES (42);",
    );
    let mut p = Pair::with_settings(
        Some(origin_pg.agent_settings()),
        Some(target_pg.standby_settings()),
    )
    .await;
    write(
        &p.origin_root().join("etc/bm/bm.ini"),
        b"[global]\nlogin = bj\npassword = pw\n",
        0o600,
    );
    let untouched = |target_pg: &PgCluster| {
        assert_eq!(
            target_pg
                .sql("postgres", "SELECT pg_is_in_recovery();")
                .trim(),
            "f"
        );
        assert_eq!(target_pg.sql("bj", "SELECT n FROM kept;").trim(), "42");
        assert!(!target_pg.dir().join("data.bmfleet-target").exists());
    };
    // A databases grant does not let the target follow, nor reach PostgreSQL through a relay.
    p.grant_with(databases_grant("grant-0200-databases")).await;
    let reply = follow(&mut p, "m1/follow/1", "grant-0200-databases").await;
    assert!(
        !reply.ok && reply.error.contains("does not cover"),
        "{}",
        reply.error
    );
    let identity = LocalIdentity::load(&p.target_files, Role::Agent).unwrap();
    let tls = identity.client_config(Role::Agent).unwrap();
    let relayed = tunnel::open(
        &p.endpoint("grant-0200-databases"),
        tls,
        &TunnelRequest::Replication {
            grant: "grant-0200-databases".into(),
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(&relayed, Err(TunnelError::Refused { reason, .. }) if reason.contains("does not cover")),
        "{:?}",
        relayed.err()
    );
    untouched(&target_pg);
    // A cluster holding other databases than BlueMind's is not replaced.
    target_pg.sql("postgres", "CREATE DATABASE customer_crm;");
    p.grant_with(replication_grant("grant-0201-replication"))
        .await;
    let reply = follow(&mut p, "m1/follow/2", "grant-0201-replication").await;
    assert!(
        !reply.ok && reply.error.contains("customer_crm"),
        "{}",
        reply.error
    );
    untouched(&target_pg);
    // A follow that fails half-way (the origin has a tablespace: its backup cannot be
    // unpacked inside the data dir) puts the target's cluster back and starts it.
    target_pg.sql("postgres", "DROP DATABASE customer_crm;");
    let space = p.dir.path().join("tablespace");
    std::fs::create_dir(&space).unwrap();
    let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    nix::unistd::chown(&space, Some(postgres.uid), Some(postgres.gid)).unwrap();
    origin_pg.sql(
        "postgres",
        &format!(
            "CREATE TABLESPACE elsewhere LOCATION '{}';",
            space.display()
        ),
    );
    let reply = follow(&mut p, "m1/follow/3", "grant-0201-replication").await;
    assert!(!reply.ok, "{reply:?}");
    assert!(reply.error.contains("back as it was"), "{}", reply.error);
    untouched(&target_pg);
    // An instance that ends without a promotion (aborted, rolled back before its cutover):
    // the standby stops following and the target's own cluster comes back.
    origin_pg.sql("postgres", "DROP TABLESPACE elsewhere;");
    let reply = follow(&mut p, "m1/follow/4", "grant-0201-replication").await;
    assert!(reply.ok, "{}", reply.error);
    assert_eq!(
        target_pg
            .sql("postgres", "SELECT pg_is_in_recovery();")
            .trim(),
        "t"
    );
    let target_agent = p.target.clone();
    let end = |origin: &str| {
        let mut target = target_agent.clone();
        let request = EndFollowingRequest {
            origin_name: origin.to_string(),
        };
        async move { target.end_following(request).await.unwrap().into_inner() }
    };
    let other = end("origin-9").await;
    assert!(!other.ended && other.error.is_empty(), "{other:?}");
    assert_eq!(
        target_pg
            .sql("postgres", "SELECT pg_is_in_recovery();")
            .trim(),
        "t"
    );
    let reply = end("origin-1").await;
    assert!(reply.ended, "{reply:?}");
    untouched(&target_pg);
    assert!(!end("origin-1").await.ended, "idempotent");
    // Without the set-aside cluster, the data dir may be the only copy: never deleted.
    let reply = follow(&mut p, "m1/follow/5", "grant-0201-replication").await;
    assert!(reply.ok, "{}", reply.error);
    let aside = target_pg.dir().join("data.bmfleet-target");
    let elsewhere = target_pg.dir().join("moved-away");
    std::fs::rename(&aside, &elsewhere).unwrap();
    let refused = end("origin-1").await;
    assert!(
        !refused.ended && refused.error.contains("is missing"),
        "{refused:?}"
    );
    assert_eq!(
        target_pg
            .sql("postgres", "SELECT pg_is_in_recovery();")
            .trim(),
        "t"
    );
    std::fs::rename(&elsewhere, &aside).unwrap();
    assert!(end("origin-1").await.ended);
    untouched(&target_pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_majors_no_standby_is_made_and_the_dump_moves_the_databases() {
    // PostgreSQL 15 (Debian's) on the origin, 16 on the target.
    let origin_pg = PgCluster::start();
    let target_pg = PgCluster::start_from(bmfleet_tests::PG16_BIN.into());
    origin_pg.sql(
        "postgres",
        "CREATE ROLE bj LOGIN PASSWORD 'pw'; CREATE DATABASE bj OWNER bj; \
         CREATE DATABASE \"bj-data\" OWNER bj;",
    );
    // No extension: the second major's binaries ship none.
    origin_pg.sql(
        "bj",
        "SET ROLE bj; CREATE TABLE t_nopk (k int, v text); \
         INSERT INTO t_nopk SELECT i, 'v' || i FROM generate_series(1, 5000) i; \
         CREATE TABLE t_mailbox (id serial PRIMARY KEY, login text); \
         INSERT INTO t_mailbox (login) SELECT 'user' || i FROM generate_series(1, 2000) i;",
    );
    origin_pg.sql(
        "bj-data",
        "SET ROLE bj; CREATE TABLE t_message_body (guid text PRIMARY KEY, size int); \
         INSERT INTO t_message_body SELECT md5(i::text), i FROM generate_series(1, 10000) i;",
    );
    target_pg.sql("postgres", "CREATE DATABASE bj;");
    let mut p = Pair::with_settings(
        Some(origin_pg.agent_settings()),
        Some(PostgresConfig {
            extensions: Vec::new(),
            ..target_pg.standby_settings()
        }),
    )
    .await;
    write(
        &p.origin_root().join("etc/bm/bm.ini"),
        b"[global]\nlogin = bj\npassword = pw\n",
        0o600,
    );
    // The preflight's choice, from both agents' facts.
    let facts = |mut c: AgentClient<Channel>| async move {
        c.facts(bmfleet_proto::v1::FactsRequest::default())
            .await
            .unwrap()
            .into_inner()
    };
    let (o, t) = (facts(p.origin.clone()).await, facts(p.target.clone()).await);
    assert_eq!(
        (
            o.postgresql_version_num / 10_000,
            t.postgresql_version_num / 10_000
        ),
        (15, 16)
    );
    assert!(
        t.standby_unavailable.is_empty(),
        "{}",
        t.standby_unavailable
    );
    use bmfleet_orchestrator::db_sync::choose;
    use bmfleet_orchestrator::fleet::DbSync;
    let plan = choose(DbSync::Auto, &o, &t).unwrap();
    assert!(!plan.stream, "{plan:?}");
    assert!(
        plan.why
            .contains("PostgreSQL 15 on the origin, 16 on the target"),
        "{}",
        plan.why
    );
    let refused = choose(DbSync::Stream, &o, &t).unwrap_err();
    assert!(refused.contains("same major"), "{refused}");
    // Asked anyway, the target refuses by itself and keeps its cluster.
    p.grant_with(replication_grant("grant-0300-replication"))
        .await;
    let reply = follow(&mut p, "m1/follow/x", "grant-0300-replication").await;
    assert!(
        !reply.ok && reply.error.contains("same major"),
        "{}",
        reply.error
    );
    assert_eq!(
        target_pg
            .sql("postgres", "SELECT pg_is_in_recovery();")
            .trim(),
        "f"
    );
    // The dump path moves both databases across the majors, every table compared.
    p.grant_with(databases_grant("grant-0301-databases")).await;
    let moved = p
        .target
        .move_databases(MoveDatabasesRequest {
            operation_id: "m1/db/across".into(),
            origin: Some(p.endpoint("grant-0301-databases")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    let tables: usize = moved.databases.iter().map(|d| d.tables.len()).sum();
    assert_eq!(tables, 3);
    for (db, sql) in [
        (
            "bj",
            "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k)) FROM t_nopk;",
        ),
        ("bj-data", "SELECT count(*), sum(size) FROM t_message_body;"),
    ] {
        assert_eq!(origin_pg.sql(db, sql), target_pg.sql(db, sql), "{sql}");
    }
    assert!(target_pg
        .sql("postgres", "SHOW server_version;")
        .starts_with("16."));
}

/// An origin for logical replication (`wal_level = logical`, so restarted): BlueMind's two
/// databases with what makes publishing hard — tables without a primary key (one with a
/// unique index on non-null columns), a hash-partitioned table, sequences — and a hostile
/// `ENABLE ALWAYS` trigger, which fires on the subscriber too: it tries to become a superuser
/// and to run a program there, and says nothing when refused.
fn logical_origin(password: &str) -> PgCluster {
    let origin_pg = PgCluster::start();
    origin_pg.sql("postgres", "ALTER SYSTEM SET wal_level = logical;");
    origin_pg.restart();
    origin_pg.sql(
        "postgres",
        &format!(
            "CREATE ROLE bj LOGIN PASSWORD '{password}'; CREATE DATABASE bj OWNER bj; \
             CREATE DATABASE \"bj-data\" OWNER bj;"
        ),
    );
    origin_pg.sql(
        "bj",
        "SET ROLE bj; \
         CREATE TABLE t_nopk (k int, v text); \
         INSERT INTO t_nopk SELECT i, 'v' || i FROM generate_series(1, 3000) i; \
         CREATE TABLE t_uniq (k int NOT NULL, v text); CREATE UNIQUE INDEX t_uniq_k ON t_uniq (k); \
         INSERT INTO t_uniq SELECT i, 'u' || i FROM generate_series(1, 500) i; \
         CREATE TABLE t_mailbox (id bigserial PRIMARY KEY, login text, quota bigint); \
         INSERT INTO t_mailbox (login, quota) SELECT 'user' || i, i FROM generate_series(1, 2000) i; \
         CREATE TABLE t_changeset (id bigint NOT NULL, item text) PARTITION BY HASH (id); \
         CREATE TABLE t_changeset_0 PARTITION OF t_changeset FOR VALUES WITH (MODULUS 2, REMAINDER 0); \
         CREATE TABLE t_changeset_1 PARTITION OF t_changeset FOR VALUES WITH (MODULUS 2, REMAINDER 1); \
         INSERT INTO t_changeset SELECT i, 'c' || i FROM generate_series(1, 1000) i; \
         CREATE SEQUENCE s_ids; \
         CREATE FUNCTION grab() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN \
           BEGIN EXECUTE 'ALTER ROLE bj SUPERUSER'; EXCEPTION WHEN others THEN NULL; END; \
           BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch /tmp/bmfleet-logical-pwned'''; \
             EXCEPTION WHEN others THEN NULL; END; \
           RETURN NEW; END $f$; \
         CREATE TRIGGER grab BEFORE INSERT ON t_mailbox FOR EACH ROW EXECUTE FUNCTION grab(); \
         ALTER TABLE t_mailbox ENABLE ALWAYS TRIGGER grab;",
    );
    origin_pg.sql(
        "bj-data",
        "SET ROLE bj; CREATE TABLE t_message_body (guid text PRIMARY KEY, size int); \
         INSERT INTO t_message_body SELECT md5(i::text), i FROM generate_series(1, 5000) i;",
    );
    origin_pg
}

/// A pair for logical replication: the origin's bm.ini holds BlueMind's password; the target
/// has an empty BlueMind database of its own with a marker table, and no extension list (the
/// second major's binaries ship none).
async fn logical_pair(origin_pg: &PgCluster, target_pg: &PgCluster, password: &str) -> Pair {
    target_pg.sql(
        "postgres",
        "CREATE ROLE bj LOGIN; CREATE DATABASE bj OWNER bj;",
    );
    target_pg.sql(
        "bj",
        "CREATE TABLE target_own (n int); INSERT INTO target_own VALUES (42);",
    );
    let p = Pair::with_settings(
        Some(origin_pg.agent_settings()),
        Some(PostgresConfig {
            extensions: Vec::new(),
            ..target_pg.standby_settings()
        }),
    )
    .await;
    write(
        &p.origin_root().join("etc/bm/bm.ini"),
        format!("[global]\nlogin = bj\npassword = {password}\n").as_bytes(),
        0o600,
    );
    p
}

async fn follow_logically(p: &mut Pair, operation: &str, grant: &str) -> FollowDatabasesReply {
    p.target
        .follow_databases(FollowDatabasesRequest {
            operation_id: operation.into(),
            origin: Some(p.endpoint(grant)),
            logical: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The origin is clean once the grants are gone: no slot, publication or bmfleet role, every
/// replica identity as it was, the WAL cap reset.
async fn revoke_and_check_origin_clean(p: &mut Pair, origin_pg: &PgCluster) {
    p.origin
        .revoke_grant(bmfleet_proto::v1::RevokeGrantRequest {
            target_name: "target-1".into(),
            migration: "m1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_sql(
        origin_pg,
        "postgres",
        "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%');",
        "0",
    );
    for db in ["bj", "bj-data"] {
        assert_eq!(
            origin_pg
                .sql(db, "SELECT count(*) FROM pg_publication;")
                .trim(),
            "0",
            "{db}"
        );
    }
    assert_eq!(
        origin_pg
            .sql(
                "bj",
                "SELECT string_agg(relname || '=' || relreplident::text, ',' ORDER BY relname) FROM pg_class \
                 WHERE relname IN ('t_nopk', 't_uniq', 't_mailbox', 't_changeset_0');"
            )
            .trim(),
        "t_changeset_0=d,t_mailbox=d,t_nopk=d,t_uniq=d"
    );
    assert_eq!(
        origin_pg
            .sql("postgres", "SHOW max_slot_wal_keep_size;")
            .trim(),
        "-1"
    );
}

// Multi-threaded: the agents serve while the test waits on blocking SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_across_majors_follows_writes_up_to_the_stop_and_takes_over_equal() {
    let _ = std::fs::remove_file("/tmp/bmfleet-logical-pwned");
    let password = format!("pw-{}-logical", bmfleet_agent::plane::grants::now_ms());
    let origin_pg = logical_origin(&password);
    let target_pg = PgCluster::start_from(bmfleet_tests::PG16_BIN.into());
    let mut p = logical_pair(&origin_pg, &target_pg, &password).await;
    p.grant_with(replication_grant("grant-0400-replication"))
        .await;
    let reply = follow_logically(&mut p, "m1/follow/l1", "grant-0400-replication").await;
    assert!(
        reply.ok,
        "{}\n{}",
        reply.error,
        std::fs::read_to_string(target_pg.dir().join("log")).unwrap_or_default()
    );

    // The origin publishes both databases; tables without a usable identity got one (a unique
    // index on non-null columns when there is one), or BlueMind's updates would fail there.
    assert_eq!(
        origin_pg
            .sql(
                "postgres",
                "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical' AND slot_name LIKE 'bmfleet_slot_%';"
            )
            .trim(),
        "2"
    );
    assert_eq!(
        origin_pg
            .sql(
                "bj",
                "SELECT string_agg(relname || '=' || relreplident::text, ',' ORDER BY relname) FROM pg_class \
                 WHERE relname IN ('t_nopk', 't_uniq', 't_mailbox', 't_changeset_0');"
            )
            .trim(),
        "t_changeset_0=f,t_mailbox=d,t_nopk=f,t_uniq=i"
    );
    // The target subscribes through a role that is no superuser; its own databases are aside.
    assert_eq!(
        target_pg
            .sql(
                "postgres",
                "SELECT count(*), bool_or(r.rolsuper) FROM pg_subscription s JOIN pg_roles r ON r.oid = s.subowner;"
            )
            .trim(),
        "2|f"
    );
    assert_eq!(
        target_pg
            .sql("bj.bmfleet-target", "SELECT n FROM target_own;")
            .trim(),
        "42"
    );
    // The initial copy is there.
    assert_eq!(
        target_pg.sql("bj", "SELECT count(*) FROM t_nopk;").trim(),
        "3000"
    );

    // BlueMind writes right up to the stop: updates and deletes on tables without a primary
    // key (they must not fail on the origin), a partitioned table, sequences, the trigger.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = bluemind_writes(&origin_pg, stop.clone(), |i| {
        format!(
            "SET ROLE bj; BEGIN; INSERT INTO t_nopk VALUES ({k}, 'new{i}'); \
             UPDATE t_nopk SET v = v || 'u' WHERE k % 97 = {m}; DELETE FROM t_nopk WHERE k = {d}; \
             UPDATE t_uniq SET v = v || 'x' WHERE k = {u}; DELETE FROM t_uniq WHERE k = {u2}; \
             INSERT INTO t_changeset VALUES ({k}, 'n{i}'); UPDATE t_changeset SET item = item || '!' WHERE id = {d}; \
             SELECT nextval('s_ids'); \
             INSERT INTO t_mailbox (login, quota) VALUES ('w{i}', {i}); COMMIT;",
            k = 100_000 + i,
            m = i % 97,
            d = i + 1,
            u = 1 + i % 400,
            u2 = 401 + i % 100,
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let batches = writer.join().unwrap();
    assert!(batches > 3, "{batches} write batches");

    // The stop: catch up, take the sequences, stop subscribing, compare.
    let moved = promote(&mut p, "m1/db/logical", "grant-0401-databases").await;
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    let tables: usize = moved.databases.iter().map(|d| d.tables.len()).sum();
    assert_eq!(tables, 6, "{:?}", moved.databases);
    for (db, sql) in [
        (
            "bj",
            "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k, v)) FROM t_nopk;",
        ),
        (
            "bj",
            "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k)) FROM t_uniq;",
        ),
        (
            "bj",
            "SELECT count(*), md5(string_agg(id || item, ',' ORDER BY id)) FROM t_changeset;",
        ),
        ("bj", "SELECT count(*), max(id) FROM t_mailbox;"),
        ("bj-data", "SELECT count(*), sum(size) FROM t_message_body;"),
        // Sequences exactly at the origin's values.
        ("bj", "SELECT last_value, is_called FROM s_ids;"),
        ("bj", "SELECT last_value FROM t_mailbox_id_seq;"),
    ] {
        assert_eq!(origin_pg.sql(db, sql), target_pg.sql(db, sql), "{sql}");
    }
    assert_eq!(
        origin_pg.sql("bj", "SELECT last_value FROM s_ids;").trim(),
        batches.to_string()
    );
    // The hostile trigger ran on the target as BlueMind's role: refused both times.
    assert!(!Path::new("/tmp/bmfleet-logical-pwned").exists());
    assert_eq!(
        target_pg
            .sql(
                "postgres",
                "SELECT rolsuper FROM pg_roles WHERE rolname = 'bj';"
            )
            .trim(),
        "f"
    );
    // Standing alone: no subscription, role or set-aside database left; writable, and the
    // next id follows the origin's.
    assert_eq!(
        target_pg
            .sql(
                "postgres",
                "SELECT (SELECT count(*) FROM pg_subscription) + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%') \
                 + (SELECT count(*) FROM pg_database WHERE datname LIKE '%bmfleet-target');"
            )
            .trim(),
        "0"
    );
    let next = target_pg.sql(
        "bj",
        "INSERT INTO t_mailbox (login) VALUES ('after') RETURNING id;",
    );
    let last: i64 = origin_pg
        .sql("bj", "SELECT max(id) FROM t_mailbox;")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(next.trim(), (last + 1).to_string());
    assert!(target_pg
        .sql("postgres", "SHOW server_version;")
        .starts_with("16."));

    revoke_and_check_origin_clean(&mut p, &origin_pg).await;
}

/// A logical origin (with `t_big`, 100,000 rows without a primary key, besides its other
/// tables) and a subscriber following it across majors.
async fn subscriber_with_a_big_table(tag: &str) -> (PgCluster, PgCluster, Pair) {
    let password = format!("pw-{}-{tag}", bmfleet_agent::plane::grants::now_ms());
    let origin_pg = logical_origin(&password);
    origin_pg.sql(
        "bj",
        "SET ROLE bj; CREATE TABLE t_big (k int, v text); \
         INSERT INTO t_big SELECT i, md5(i::text) FROM generate_series(1, 100000) i;",
    );
    let target_pg = PgCluster::start_from(bmfleet_tests::PG16_BIN.into());
    let mut p = logical_pair(&origin_pg, &target_pg, &password).await;
    p.grant_with(replication_grant("grant-0500-replication"))
        .await;
    let reply = follow_logically(&mut p, "m1/follow/l1", "grant-0500-replication").await;
    assert!(reply.ok, "{}", reply.error);
    (origin_pg, target_pg, p)
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> u64 {
    text.split(label)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {text}"))
}

// Multi-threaded: the agents serve while the test waits on blocking SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_subscribers_verified_point_each_side_sums_only_the_blocks_its_own_wal_names() {
    let (origin_pg, target_pg, mut p) = subscriber_with_a_big_table("lpoint").await;

    // BlueMind keeps writing while the point is taken: its tables are held for a moment,
    // never refused (every batch must succeed).
    verify_while_bluemind_writes(&mut p, &origin_pg, |i| {
        format!(
            "SET ROLE bj; BEGIN; INSERT INTO t_nopk VALUES ({k}, 'p{i}'); \
             INSERT INTO t_mailbox (login, quota) VALUES ('p{i}', {i}); COMMIT;",
            k = 200_000 + i
        )
    })
    .await;
    // Each side keeps its own WAL from its point on.
    for pg in [&origin_pg, &target_pg] {
        assert_eq!(
            pg.sql(
                "postgres",
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'bmfleet_gate_%';"
            )
            .trim(),
            "1"
        );
    }

    // Vacuum runs on both sides after the point: it names every block of the freshly copied
    // tables, yet changes no row (left out of the gate).
    for pg in [&origin_pg, &target_pg] {
        for db in ["bj", "bj-data"] {
            pg.sql(db, "VACUUM (FREEZE);");
        }
    }
    // The day's changes after the point: a few rows of the big table updated, deleted and
    // inserted (the apply writes them on the target: its own WAL names its own blocks); a
    // table emptied by TRUNCATE (new files on both sides).
    origin_pg.sql(
        "bj",
        "SET ROLE bj; UPDATE t_big SET v = 'changed' WHERE k IN (10, 50000, 99999); \
         DELETE FROM t_big WHERE k = 20; INSERT INTO t_big VALUES (-1, 'new'); \
         TRUNCATE t_uniq; INSERT INTO t_uniq VALUES (7, 'seven');",
    );
    let blocks_of_big: u64 = origin_pg
        .sql("bj", "SELECT pg_relation_size('t_big') / 8192;")
        .trim()
        .parse()
        .unwrap();

    let moved = promote(&mut p, "m1/db/logical", "grant-0501-databases").await;
    assert!(moved.ok, "{}: {:?}", moved.error, moved.databases);
    assert!(
        moved
            .gate
            .starts_with("changes since the verified point: on the origin "),
        "{}",
        moved.gate
    );
    // Each side summed again a handful of blocks, not the big table's hundreds; the
    // truncated table in full.
    let on_origin = number_after(&moved.gate, "on the origin ");
    let here = number_after(&moved.gate, "; here ");
    assert!(
        (3..=40).contains(&on_origin) && (3..=40).contains(&here) && blocks_of_big > 500,
        "{on_origin} and {here} of {blocks_of_big} blocks: {}",
        moved.gate
    );
    assert!(
        moved.gate.contains("in full: bj.public.t_uniq"),
        "{}",
        moved.gate
    );
    let big = table(&moved, "public.t_big");
    assert!(big.equal && big.origin_rows == 100_000 - 1 + 1, "{big:?}");
    // And what the gate says holds: the databases are equal (counted here, in full).
    for (db, sql) in [
        (
            "bj",
            "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k, v)) FROM t_big;",
        ),
        (
            "bj",
            "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k)) FROM t_uniq;",
        ),
        (
            "bj",
            "SELECT count(*), md5(string_agg(k || v, ',' ORDER BY k, v)) FROM t_nopk;",
        ),
        ("bj", "SELECT count(*), max(id) FROM t_mailbox;"),
        ("bj-data", "SELECT count(*), sum(size) FROM t_message_body;"),
        // The sequences, from the origin's names-only manifest.
        ("bj", "SELECT last_value FROM t_mailbox_id_seq;"),
    ] {
        assert_eq!(origin_pg.sql(db, sql), target_pg.sql(db, sql), "{sql}");
    }
    // The target keeps no WAL for a gate any more; the origin's slot goes with the grants.
    assert_eq!(
        target_pg
            .sql("postgres", "SELECT count(*) FROM pg_replication_slots;")
            .trim(),
        "0"
    );
    revoke_and_check_origin_clean(&mut p, &origin_pg).await;
}

// Multi-threaded: the agents serve while the test waits on blocking SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_on_the_subscriber_alone_after_the_point_fails_the_gate() {
    let (origin_pg, target_pg, mut p) = subscriber_with_a_big_table("ltamper").await;
    let verified = verify(&mut p).await;
    assert!(verified.ok, "{}", verified.error);
    // One row rewritten on the target only, in a block the origin never touches again; and
    // an ordinary change on the origin.
    target_pg.sql("bj", "UPDATE t_big SET v = 'tampered' WHERE k = 77;");
    origin_pg.sql(
        "bj",
        "SET ROLE bj; UPDATE t_big SET v = 'changed' WHERE k = 90000;",
    );

    let moved = promote(&mut p, "m1/db/logical", "grant-0501-databases").await;
    assert!(
        moved.gate.starts_with("changes since the verified point"),
        "{}",
        moved.gate
    );
    let big = table(&moved, "public.t_big");
    assert!(!big.equal, "{big:?}");
    assert!(!moved.ok, "{:?}", moved.databases);
    revoke_and_check_origin_clean(&mut p, &origin_pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ended_without_takeover_gives_the_target_its_own_databases_back() {
    // The same major on both sides (PostgreSQL 15: its subscriptions are made by a superuser,
    // which the role stops being before they are enabled).
    let password = format!("pw-{}-logical15", bmfleet_agent::plane::grants::now_ms());
    let origin_pg = logical_origin(&password);
    let target_pg = PgCluster::start();
    let mut p = logical_pair(&origin_pg, &target_pg, &password).await;
    p.grant_with(replication_grant("grant-0500-replication"))
        .await;
    let reply = follow_logically(&mut p, "m1/follow/l2", "grant-0500-replication").await;
    assert!(reply.ok, "{}", reply.error);
    assert_eq!(
        target_pg
            .sql(
                "postgres",
                "SELECT count(*), bool_or(r.rolsuper) FROM pg_subscription s JOIN pg_roles r ON r.oid = s.subowner;"
            )
            .trim(),
        "2|f"
    );
    origin_pg.sql("bj", "SET ROLE bj; INSERT INTO t_nopk VALUES (-5, 'late'); UPDATE t_nopk SET v = 'changed' WHERE k = 7;");
    wait_sql(
        &target_pg,
        "bj",
        "SELECT v FROM t_nopk WHERE k IN (-5, 7) ORDER BY k;",
        "late\nchanged",
    );
    // A physical standby cannot be asked meanwhile.
    p.grant_with(replication_grant("grant-0501-replication"))
        .await;
    let refused = follow(&mut p, "m1/follow/l2b", "grant-0501-replication").await;
    assert!(
        !refused.ok && refused.error.contains("subscribe"),
        "{}",
        refused.error
    );
    // A retried step (another attempt: another grant, another role) replaces the first
    // attempt's subscriptions and its role (a chaos campaign found the first role left).
    let first_role = target_pg
        .sql(
            "postgres",
            "SELECT string_agg(rolname, ',') FROM pg_roles WHERE rolname LIKE 'bmfleet_%';",
        )
        .trim()
        .to_string();
    p.grant_with(replication_grant("grant-0502-replication"))
        .await;
    let again = follow_logically(&mut p, "m1/follow/l2c", "grant-0502-replication").await;
    assert!(again.ok, "{}", again.error);
    let roles = target_pg
        .sql(
            "postgres",
            "SELECT count(*) || ' ' || string_agg(rolname, ',') FROM pg_roles WHERE rolname LIKE 'bmfleet_%';",
        )
        .trim()
        .to_string();
    assert!(
        roles.starts_with("1 ") && !roles.contains(&first_role),
        "{roles} (first attempt's: {first_role})"
    );
    origin_pg.sql(
        "bj",
        "SET ROLE bj; INSERT INTO t_nopk VALUES (-6, 'after the retry');",
    );
    wait_sql(
        &target_pg,
        "bj",
        "SELECT v FROM t_nopk WHERE k = -6;",
        "after the retry",
    );

    // The instance ends (rolled back, aborted): the target's own databases come back.
    let ended = p
        .target
        .end_following(EndFollowingRequest {
            origin_name: "origin-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ended.ended, "{}", ended.error);
    assert_eq!(
        target_pg.sql("bj", "SELECT n FROM target_own;").trim(),
        "42"
    );
    assert_eq!(
        target_pg
            .sql(
                "postgres",
                "SELECT (SELECT count(*) FROM pg_subscription) + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%') \
                 + (SELECT count(*) FROM pg_database WHERE datname LIKE '%bmfleet-target');"
            )
            .trim(),
        "0"
    );
    // "bj-data" did not exist on the target: the copy stays (nothing of the target's was there).
    revoke_and_check_origin_clean(&mut p, &origin_pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_is_refused_without_wal_level_logical_and_changes_nothing() {
    let origin_pg = PgCluster::start();
    origin_databases(&origin_pg, "pw");
    let target_pg = PgCluster::start();
    let mut p = logical_pair(&origin_pg, &target_pg, "pw").await;
    p.grant_with(replication_grant("grant-0600-replication"))
        .await;
    let reply = follow_logically(&mut p, "m1/follow/l3", "grant-0600-replication").await;
    assert!(
        !reply.ok && reply.error.contains("wal_level is replica"),
        "{}",
        reply.error
    );
    assert_eq!(
        target_pg.sql("bj", "SELECT n FROM target_own;").trim(),
        "42"
    );
    assert_eq!(
        origin_pg
            .sql(
                "bj",
                "SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%') \
                 + (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' AND relreplident <> 'd');"
            )
            .trim(),
        "0"
    );
}
