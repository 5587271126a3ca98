//! The origin's change journal: every path created, written, renamed, deleted or whose
//! attributes changed under an instance's data dirs, recorded with inotify from the first hot
//! pass on, so that the final pass moves and verifies only those paths instead of walking the
//! whole tree.
//!
//! inotify, not fanotify: fanotify's directory-entry events (FAN_CREATE, FAN_DELETE,
//! FAN_MOVED_*) need Linux 5.1 and CAP_SYS_ADMIN and report file handles to resolve; inotify
//! works on every kernel BlueMind runs on and names the entry. Its limits: one watch per
//! directory (`fs.inotify.max_user_watches`; the spool's dirs, not its files, count), a
//! bounded event queue (`fs.inotify.max_queued_events`), no events from other mount
//! namespaces' writes… which a mail server does not do. Whenever the journal cannot prove it
//! is complete — the queue overflowed, a watch could not be added, a data dir itself moved,
//! the agent restarted (the journal lives in memory), a changed file has other hard links —
//! it says why, and the pass walks everything instead.
//!
//! Cuts: a full pass marks the journal (under its grant id) before its rsync starts walking;
//! the final pass asks for the paths changed since the mark of the last full pass, which saw
//! everything older. A change racing a mark is recorded after it (an extra path is harmless:
//! rsync makes it equal to the origin's, present or not).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// More changed paths than this and the journal gives up (the full walk is as cheap then).
pub const MAX_PATHS: usize = 2_000_000;
/// Marks kept (the newest).
const MAX_MARKS: usize = 64;
/// How long the reader waits in `poll` at most when the queue is empty (ms).
const IDLE: u16 = 1000;

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::DONT_FOLLOW
        | WatchMask::EXCL_UNLINK
        | WatchMask::ONLYDIR
}

#[derive(Default)]
struct State {
    seq: u64,
    /// Changed path (absolute) -> the sequence of its last change.
    changed: HashMap<PathBuf, u64>,
    /// Events were lost at this sequence (the newest loss).
    lost_at: Option<(u64, String)>,
    /// The journal is incomplete from here on, whatever the mark.
    broken: Option<String>,
    marks: VecDeque<(String, u64)>,
}

impl State {
    fn record(&mut self, path: PathBuf) {
        self.seq += 1;
        self.changed.insert(path, self.seq);
        if self.changed.len() > MAX_PATHS && self.broken.is_none() {
            self.broken = Some(format!("more than {MAX_PATHS} paths changed"));
            self.changed.clear();
        }
    }

    fn lose(&mut self, reason: String) {
        self.seq += 1;
        self.lost_at = Some((self.seq, reason));
    }

    /// Forgets what no kept mark needs: changes older than the third newest mark.
    fn prune(&mut self) {
        if self.marks.len() < 3 {
            return;
        }
        let mut seqs: Vec<u64> = self.marks.iter().map(|(_, s)| *s).collect();
        seqs.sort_unstable();
        let keep_after = seqs[seqs.len() - 3];
        self.changed.retain(|_, s| *s > keep_after);
    }
}

/// A drain request: the reader empties the kernel's queue, then answers.
type Drain = mpsc::Sender<()>;

/// One instance's journal: a reader thread over one inotify instance.
pub struct ChangeJournal {
    roots: Vec<PathBuf>,
    /// Data dirs that did not exist when it started (their parents are not watched).
    absent: Vec<PathBuf>,
    state: Arc<Mutex<State>>,
    drain: Mutex<mpsc::Sender<Drain>>,
    /// Wakes the reader (waiting in `poll` for events) when a drain is asked.
    wake: Option<UnixStream>,
}

/// The paths a final pass moves, or why the journal cannot give them.
pub type Changes = Result<Vec<PathBuf>, String>;

struct Reader {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    roots: Vec<PathBuf>,
    state: Arc<Mutex<State>>,
}

impl Reader {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `dir` and every dir below it; with `record`, every entry met is recorded as
    /// changed (a dir that arrived whole: its entries were made before its watch existed).
    fn watch_tree(&mut self, dir: &Path, record: bool) {
        for entry in walkdir::WalkDir::new(dir).follow_links(false) {
            let entry = match entry {
                Ok(e) => e,
                // Gone meanwhile: its deletion is an event of its parent.
                Err(e)
                    if e.io_error()
                        .is_some_and(|io| io.kind() == ErrorKind::NotFound) =>
                {
                    continue
                }
                Err(e) => {
                    self.state().broken = Some(format!("cannot walk {}: {e}", dir.display()));
                    return;
                }
            };
            if record {
                self.state().record(entry.path().to_path_buf());
            }
            if !entry.file_type().is_dir() {
                continue;
            }
            match self.inotify.watches().add(entry.path(), mask()) {
                Ok(wd) => {
                    self.dirs.insert(wd, entry.path().to_path_buf());
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    let why = if e.raw_os_error() == Some(28) {
                        "the inotify watch limit is reached (raise fs.inotify.max_user_watches)"
                            .to_string()
                    } else {
                        format!("cannot watch {}: {e}", entry.path().display())
                    };
                    self.state().broken = Some(why);
                    return;
                }
            }
        }
    }

    /// Reads every queued event; false when the queue was empty.
    fn read(&mut self, buffer: &mut [u8]) -> bool {
        let events: Vec<(WatchDescriptor, EventMask, Option<std::ffi::OsString>)> =
            match self.inotify.read_events(buffer) {
                Ok(events) => events
                    .map(|e| (e.wd, e.mask, e.name.map(|n| n.to_os_string())))
                    .collect(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) => {
                    self.state().broken = Some(format!("reading inotify events: {e}"));
                    return false;
                }
            };
        for (wd, mask, name) in events {
            if mask.contains(EventMask::Q_OVERFLOW) {
                self.state().lose(
                    "the kernel's inotify queue overflowed (fs.inotify.max_queued_events)".into(),
                );
                continue;
            }
            let Some(dir) = self.dirs.get(&wd).cloned() else {
                continue;
            };
            if mask.contains(EventMask::IGNORED) {
                self.dirs.remove(&wd);
                continue;
            }
            if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                if self.roots.contains(&dir) {
                    self.state().broken = Some(format!(
                        "the data dir {} itself was moved or deleted",
                        dir.display()
                    ));
                }
                continue;
            }
            let Some(name) = name else {
                // An event about the dir itself (its attributes).
                self.state().record(dir);
                continue;
            };
            let path = dir.join(name);
            if mask.intersects(
                EventMask::CREATE | EventMask::DELETE | EventMask::MOVED_FROM | EventMask::MOVED_TO,
            ) {
                // The dir's own modification time changed with its entries.
                self.state().record(dir.clone());
            }
            if mask.contains(EventMask::ISDIR)
                && mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
            {
                self.watch_tree(&path, true);
            } else {
                self.state().record(path);
            }
        }
        true
    }

    /// Reads events as they come (waiting in `poll` on the inotify descriptor and on
    /// `wake`) and answers each drain request once the queue is empty.
    fn run(mut self, requests: mpsc::Receiver<Drain>, wake: UnixStream) {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut waiting: Vec<Drain> = Vec::new();
        loop {
            loop {
                match requests.try_recv() {
                    Ok(d) => waiting.push(d),
                    Err(mpsc::TryRecvError::Empty) => break,
                    // The journal was dropped.
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            if !self.read(&mut buffer) {
                for d in waiting.drain(..) {
                    let _ = d.send(());
                }
                // Nothing queued: wait for the next event or drain request (a request is
                // answered at once, not after a sleep: the final pass asks twice).
                let mut fds = [
                    PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
                    PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                ];
                // A broken reader (its descriptor failing) must not spin on it.
                if poll(&mut fds, PollTimeout::from(IDLE)).is_err() || self.state().broken.is_some()
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let mut byte = [0u8; 64];
                while matches!((&wake).read(&mut byte), Ok(n) if n > 0) {}
            }
        }
    }
}

impl ChangeJournal {
    /// Starts journaling under `roots` (the instance's data dirs as host paths): watches
    /// every dir below them, then records from there on.
    pub fn start(roots: Vec<PathBuf>) -> ChangeJournal {
        let state = Arc::new(Mutex::new(State::default()));
        let (tx, rx) = mpsc::channel();
        let pair = UnixStream::pair().and_then(|(a, b)| {
            a.set_nonblocking(true)?;
            b.set_nonblocking(true)?;
            Ok((a, b))
        });
        let (wake, woken) = match pair {
            Ok((a, b)) => (Some(a), Ok(b)),
            Err(e) => (None, Err(e)),
        };
        let journal = ChangeJournal {
            roots: roots.clone(),
            absent: roots.iter().filter(|r| !r.is_dir()).cloned().collect(),
            state: state.clone(),
            drain: Mutex::new(tx),
            wake,
        };
        match Inotify::init().and_then(|i| Ok((i, woken?))) {
            Ok((inotify, woken)) => {
                let mut reader = Reader {
                    inotify,
                    dirs: HashMap::new(),
                    roots: roots.clone(),
                    state,
                };
                for root in &roots {
                    if root.is_dir() {
                        reader.watch_tree(root, false);
                    }
                }
                std::thread::spawn(move || reader.run(rx, woken));
            }
            Err(e) => {
                journal.lock().broken = Some(format!("inotify is not available: {e}"));
            }
        }
        journal
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every event queued so far is recorded; false if the reader could not
    /// catch up (events keep coming faster than it reads) or is gone.
    fn drained(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .drain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(tx)
            .is_ok();
        if let Some(mut wake) = self.wake.as_ref() {
            // Full of earlier wake-ups: the reader wakes anyway.
            let _ = wake.write(&[1]);
        }
        sent && rx.recv_timeout(Duration::from_secs(30)).is_ok()
    }

    /// Marks the start of a full pass (its walk sees everything older) under `key`.
    pub fn mark(&self, key: &str) {
        // Not drained: older events recorded after the mark only add paths.
        let _ = self.drained();
        let mut state = self.lock();
        let seq = state.seq;
        state.marks.retain(|(k, _)| k != key);
        state.marks.push_back((key.to_string(), seq));
        while state.marks.len() > MAX_MARKS {
            state.marks.pop_front();
        }
        state.prune();
    }

    /// The paths changed since the full pass marked `key` began, sorted; or why the journal
    /// cannot tell (then the pass must walk everything).
    pub fn changes_since(&self, key: &str) -> Changes {
        if !self.drained() {
            return Err("the journal could not catch up with the events queued".into());
        }
        if let Some(appeared) = self.absent.iter().find(|r| r.exists()) {
            return Err(format!(
                "the data dir {} appeared after the journal started",
                appeared.display()
            ));
        }
        let state = self.lock();
        if let Some(why) = &state.broken {
            return Err(why.clone());
        }
        let Some(&(_, mark)) = state.marks.iter().find(|(k, _)| k == key) else {
            return Err(format!(
                "no full pass was journaled under grant {key} (the agent restarted since?)"
            ));
        };
        if let Some((at, why)) = &state.lost_at {
            if *at > mark {
                return Err(why.clone());
            }
        }
        let mut paths: Vec<PathBuf> = state
            .changed
            .iter()
            .filter(|(_, s)| **s > mark)
            .map(|(p, _)| p.clone())
            .collect();
        // A file with several names: rsync -H links only the names it moves, so every name
        // must be listed (a message delivered to several mailboxes after the mark is); a name
        // the journal did not see would be left out of the link, or keep old content.
        let mut names: HashMap<(u64, u64), (u64, u64, &PathBuf)> = HashMap::new();
        for p in &paths {
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if m.is_file() && m.nlink() > 1 {
                    names
                        .entry((m.dev(), m.ino()))
                        .or_insert((0, m.nlink(), p))
                        .0 += 1;
                }
            }
        }
        if let Some((_, nlink, p)) = names.values().find(|(listed, nlink, _)| listed < nlink) {
            return Err(format!(
                "{} has {nlink} names, not all of them changed since the pass",
                p.display()
            ));
        }
        paths.sort();
        Ok(paths)
    }
}

/// ChangeJournals by key (the migration and the target a grant serves).
#[derive(Default)]
pub struct ChangeJournals {
    journals: Mutex<HashMap<String, Arc<ChangeJournal>>>,
}

impl ChangeJournals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ChangeJournal>>> {
        self.journals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The journal of `key`, started over `roots` if there is none (or its roots changed).
    pub fn ensure(&self, key: &str, roots: Vec<PathBuf>) -> Arc<ChangeJournal> {
        let mut journals = self.lock();
        if let Some(j) = journals.get(key).filter(|j| j.roots == roots) {
            return j.clone();
        }
        let journal = Arc::new(ChangeJournal::start(roots));
        journals.insert(key.to_string(), journal.clone());
        journal
    }

    /// The journal of `key`, if it runs.
    pub fn get(&self, key: &str) -> Option<Arc<ChangeJournal>> {
        self.lock().get(key).cloned()
    }

    /// Stops journaling `key` (the instance ended).
    pub fn stop(&self, key: &str) {
        self.lock().remove(key);
    }
}

/// The journal key of a grant's migration and target.
pub fn key(migration: &str, target: &str) -> String {
    format!("{migration}/{target}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(root: &Path, paths: &[PathBuf]) -> Vec<String> {
        paths
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn records_what_changed_after_the_mark_including_new_trees_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        std::fs::create_dir_all(root.join("user/alice")).unwrap();
        std::fs::write(root.join("user/alice/1."), "old").unwrap();
        std::fs::write(root.join("user/alice/2."), "old").unwrap();
        std::fs::write(root.join("before"), "x").unwrap();
        let journal = ChangeJournal::start(vec![root.clone()]);
        std::fs::write(root.join("user/alice/2."), "changed before the mark").unwrap();
        journal.mark("pass-1");
        // After the mark: a write, a deletion, a rename, a new tree, an attribute change.
        std::fs::write(root.join("user/alice/1."), "new").unwrap();
        std::fs::remove_file(root.join("before")).unwrap();
        std::fs::rename(root.join("user/alice/2."), root.join("user/alice/3.")).unwrap();
        std::fs::create_dir_all(root.join("user/bob/sub")).unwrap();
        std::fs::write(root.join("user/bob/sub/1."), "bob").unwrap();
        let changes = journal.changes_since("pass-1").unwrap();
        let names = rel(&root, &changes);
        for expected in [
            "user/alice/1.",
            "before",
            "user/alice/2.",
            "user/alice/3.",
            "user/bob",
            "user/bob/sub",
            "user/bob/sub/1.",
        ] {
            assert!(
                names.contains(&expected.to_string()),
                "{expected}: {names:?}"
            );
        }
        // An unknown mark (an agent restarted since) is refused, saying so.
        let err = journal.changes_since("pass-0").unwrap_err();
        assert!(err.contains("no full pass was journaled"), "{err}");
        // A later mark sees only later changes.
        journal.mark("pass-2");
        assert_eq!(
            journal.changes_since("pass-2").unwrap(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn a_rewrite_that_keeps_size_and_mtime_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cyrus.index");
        std::fs::write(&file, "AAAA").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let journal = ChangeJournal::start(vec![dir.path().to_path_buf()]);
        journal.mark("p");
        std::fs::write(&file, "BBBB").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(journal.changes_since("p").unwrap(), vec![file]);
    }

    #[test]
    fn a_changed_file_with_names_the_journal_did_not_see_makes_it_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/1."), "m").unwrap();
        std::fs::hard_link(dir.path().join("a/1."), dir.path().join("b")).unwrap();
        let journal = ChangeJournal::start(vec![dir.path().to_path_buf()]);
        journal.mark("p");
        std::fs::write(dir.path().join("a/1."), "rewritten in place").unwrap();
        let err = journal.changes_since("p").unwrap_err();
        assert!(err.contains("has 2 names"), "{err}");
        // A rename of one name is the same: the new name alone would not be linked.
        journal.mark("r");
        std::fs::rename(dir.path().join("b"), dir.path().join("b2")).unwrap();
        let err = journal.changes_since("r").unwrap_err();
        assert!(err.contains("has 2 names"), "{err}");
        // A message written then linked into a second mailbox after the mark: both names are
        // listed, rsync -H keeps the link.
        journal.mark("q");
        std::fs::write(dir.path().join("a/2."), "new message").unwrap();
        std::fs::hard_link(dir.path().join("a/2."), dir.path().join("c")).unwrap();
        let both = journal.changes_since("q").unwrap();
        for name in ["a/2.", "c"] {
            assert!(both.contains(&dir.path().join(name)), "{both:?}");
        }
    }

    #[test]
    fn losing_events_or_the_data_dir_breaks_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        std::fs::create_dir(&root).unwrap();
        let journal = ChangeJournal::start(vec![root.clone()]);
        journal.mark("p");
        journal
            .lock()
            .lose("the kernel's inotify queue overflowed".into());
        assert!(journal
            .changes_since("p")
            .unwrap_err()
            .contains("overflowed"));
        // Events lost before a later mark do not matter to it.
        journal.mark("q");
        assert!(journal.changes_since("q").is_ok());
        std::fs::rename(&root, dir.path().join("moved")).unwrap();
        let err = journal.changes_since("q").unwrap_err();
        assert!(err.contains("itself was moved or deleted"), "{err}");
        // A data dir absent at the start is not watched: if it appears, the journal says so.
        let late = dir.path().join("late");
        let journal = ChangeJournal::start(vec![late.clone()]);
        journal.mark("p");
        assert!(journal.changes_since("p").is_ok());
        std::fs::create_dir(&late).unwrap();
        let err = journal.changes_since("p").unwrap_err();
        assert!(err.contains("appeared after the journal started"), "{err}");
    }
}
