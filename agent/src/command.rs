//! Running a configured command (an argv list, never a shell string) with a deadline.

use std::time::{Duration, Instant};

use bmfleet_proto::v1::CommandResult;
use tokio::process::Command;

/// How much of stdout and stderr a result keeps (the end, where errors are).
pub const TAIL_BYTES: usize = 4096;

/// Runs `argv` to completion or until `timeout`, then kills it. Never fails: a command that
/// cannot start, times out or dies by a signal gets exit code -1 and an `error`.
pub async fn run(service: &str, argv: &[String], timeout: Duration) -> CommandResult {
    run_behind(service, &[], argv, timeout).await
}

/// [`run`] of `argv` behind `prefix` (the administrator's command prefix, as [`prefixed`]
/// carries it out); the result names the whole argv.
pub async fn run_behind(
    service: &str,
    prefix: &[String],
    argv: &[String],
    timeout: Duration,
) -> CommandResult {
    let started = Instant::now();
    let mut result = CommandResult {
        service: service.to_string(),
        argv: prefix.iter().chain(argv).cloned().collect(),
        exit_code: -1,
        ..Default::default()
    };
    let Some(program) = result.argv.first().cloned() else {
        result.error = "empty command".into();
        return result;
    };
    let child = prefixed(prefix, argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            result.error = format!("cannot start {program}: {e}");
            return result;
        }
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            result.error = format!("timed out after {}s and was killed", timeout.as_secs());
        }
        Ok(Err(e)) => result.error = format!("waiting for {program}: {e}"),
        Ok(Ok(output)) => {
            result.stdout_tail = tail(&output.stdout);
            result.stderr_tail = tail(&output.stderr);
            match output.status.code() {
                Some(code) => result.exit_code = code,
                None => result.error = format!("killed by a signal ({})", output.status),
            }
        }
    }
    result.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    result
}

/// A command running `argv` behind `prefix`. The documented administrator's prefix,
/// `runuser -u USER --`, is carried out here rather than run: the child gets USER's uid and
/// primary gid (no supplementary groups), HOME, USER and LOGNAME, as runuser would give them,
/// without runuser's own process and PAM session (the downtime runs a dozen psql and pg_ctl,
/// on cores its other steps share). Any other prefix (sudo, a wrapper) runs as written, and
/// so does this one when USER is unknown here (runuser then says so).
pub fn prefixed(prefix: &[String], argv: &[String]) -> Command {
    if let ([runuser, u, name, dashes], Some((program, args))) = (prefix, argv.split_first()) {
        if runuser.rsplit('/').next() == Some("runuser") && u == "-u" && dashes == "--" {
            if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
                let mut command = Command::new(program);
                command
                    .args(args)
                    .uid(user.uid.as_raw())
                    .gid(user.gid.as_raw())
                    .env("HOME", &user.dir)
                    .env("USER", name)
                    .env("LOGNAME", name);
                return command;
            }
        }
    }
    let mut whole = prefix.iter().chain(argv);
    let mut command = Command::new(whole.next().map(String::as_str).unwrap_or_default());
    command.args(whole);
    command
}

/// The command succeeded (ran and exited 0).
pub fn succeeded(result: &CommandResult) -> bool {
    result.exit_code == 0 && result.error.is_empty()
}

/// One line saying how a command failed, for error messages.
pub fn failure_summary(result: &CommandResult) -> String {
    let what = if result.error.is_empty() {
        format!("exited with code {}", result.exit_code)
    } else {
        result.error.clone()
    };
    let stderr = result.stderr_tail.trim();
    if stderr.is_empty() {
        format!("`{}` {what}", result.argv.join(" "))
    } else {
        format!("`{}` {what}: {stderr}", result.argv.join(" "))
    }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[tokio::test]
    async fn the_runuser_prefix_is_carried_out_and_others_run_as_written() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let prefix = argv(&["runuser", "-u", "nobody", "--"]);
        let r = run_behind(
            "x",
            &prefix,
            &argv(&["sh", "-c", "id -u; id -g; id -G; echo $HOME $USER $LOGNAME"]),
            Duration::from_secs(5),
        )
        .await;
        assert!(succeeded(&r), "{r:?}");
        assert_eq!(r.argv[..4], prefix[..], "the result names the whole argv");
        if nix::unistd::geteuid().is_root() {
            let (uid, gid) = (nobody.uid, nobody.gid);
            assert_eq!(
                r.stdout_tail,
                format!(
                    "{uid}\n{gid}\n{gid}\n{} nobody nobody\n",
                    nobody.dir.display()
                )
            );
        }
        // Another prefix runs as written.
        let r = run_behind(
            "x",
            &argv(&["env", "WRAPPED=yes"]),
            &argv(&["sh", "-c", "echo $WRAPPED"]),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(r.stdout_tail, "yes\n", "{r:?}");
    }

    #[tokio::test]
    async fn reports_exit_code_and_stderr() {
        let r = run(
            "x",
            &argv(&["sh", "-c", "echo out; echo boom >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(r.exit_code, 3);
        assert_eq!(r.stdout_tail, "out\n");
        assert_eq!(r.stderr_tail, "boom\n");
        assert!(!succeeded(&r));
        assert!(failure_summary(&r).contains("exited with code 3: boom"));
    }

    #[tokio::test]
    async fn missing_program_and_timeout_are_errors() {
        let r = run("x", &argv(&["/nonexistent/prog"]), Duration::from_secs(5)).await;
        assert_eq!(r.exit_code, -1);
        assert!(r.error.contains("cannot start"), "{}", r.error);
        let r = run("x", &argv(&["sleep", "5"]), Duration::from_millis(100)).await;
        assert!(r.error.contains("timed out"), "{}", r.error);
    }
}
