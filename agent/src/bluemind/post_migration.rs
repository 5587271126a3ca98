//! BlueMind's post-migration steps, through its API on the target (as `admin0@global.virt`
//! or with the bm-core token): regenerate the firewall rules, repair mail delivery (postfix
//! maps), and replace the origin's address in mynetworks. Long calls return a task id that is
//! polled until Success or InError, within a deadline.
//!
//! Each call follows BlueMind's own interfaces (IAuthentication, IInternalFirewallMgmt /
//! ISecurityMgmt, IMailDeliveryMgmt, ISystemConfiguration, ITask), and each check covers what
//! they show can go wrong quietly: a refused login answers HTTP 200 with status `Bad`; a
//! firewall task ends `Success` even when a host "failed updated"; the repair task's Success
//! only means an event was published (the maps are rebuilt later, throttled); mynetworks is
//! under `values` of the SystemConf read back, and an empty value posted becomes BlueMind's
//! defaults (every custom relay network gone).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bmfleet_proto::v1::{PostMigrationReply, PostMigrationRequest};

use crate::config::AgentConfig;

/// An API call that failed, or a check that did not hold: what was called and what BlueMind
/// answered.
#[derive(Debug)]
pub struct ApiError(pub String);

/// A failed call, its answer read: no service on that path, or anything else.
enum Failed {
    /// No route: BlueMind's RestRootHandler.doCall fails a path no service serves with the
    /// fault "no service registered on path …", which RestHttpProxyHandler's failure handler
    /// answers as HTTP 500 (net.bluemind.core.rest.base / core.rest.http.vertx); a 404 from a
    /// proxy in front counts too.
    MissingRoute(ApiError),
    /// Any other failure.
    Other(ApiError),
}

/// What a failed call of `method path` means.
fn failed(method: &str, path: &str, e: ureq::Error) -> Failed {
    match e {
        ureq::Error::Status(code, response) => {
            let body = response.into_string().unwrap_or_default();
            let error = ApiError(format!("{method} {path}: HTTP {code}: {body}"));
            if code == 404 || (code == 500 && body.contains("no service registered on path")) {
                Failed::MissingRoute(error)
            } else {
                Failed::Other(error)
            }
        }
        other => Failed::Other(ApiError(format!("{method} {path}: {other}"))),
    }
}

fn call_error(method: &str, path: &str, e: ureq::Error) -> ApiError {
    match failed(method, path, e) {
        Failed::MissingRoute(error) | Failed::Other(error) => error,
    }
}

/// BlueMind's postfix maps (ServerMaps.java / PostfixPaths.java): the repair rewrites each
/// `NAME-flat` and replaces `NAME.db` (updateMaps.sh: postmap, then mv).
const POSTFIX_MAPS: [&str; 5] = [
    "virtual_domains",
    "virtual_mailbox",
    "virtual_alias",
    "transport",
    "master_relay_transport",
];

/// How the session was opened: a login is closed by a logout; bm-core's token never is.
enum Credentials {
    Login,
    CoreToken,
}

struct Api {
    base: String,
    key: String,
    credentials: Credentials,
    agent: ureq::Agent,
}

impl Api {
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("X-BM-ApiKey", &self.key)
    }

    fn post_raw(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, Box<ureq::Error>> {
        let response = self
            .request("POST", path)
            .send_json(body)
            .map_err(Box::new)?;
        let text = response.into_string().unwrap_or_default();
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    fn post(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value, ApiError> {
        self.post_raw(path, body)
            .map_err(|e| call_error("POST", path, *e))
    }

    fn get(&self, path: &str) -> Result<serde_json::Value, ApiError> {
        self.request("GET", path)
            .call()
            .map_err(|e| call_error("GET", path, e))?
            .into_json()
            .map_err(|e| ApiError(format!("GET {path}: {e}")))
    }

    /// Polls a task to its end (ITask: GET /tasks/{id}); its final TaskStatus on Success.
    fn wait_task(
        &self,
        path: &str,
        id: &str,
        deadline: Duration,
    ) -> Result<serde_json::Value, ApiError> {
        let until = Instant::now() + deadline;
        loop {
            let state = self.get(&format!("/api/tasks/{id}"))?;
            match state.get("state").and_then(|s| s.as_str()) {
                Some("Success") => return Ok(state),
                Some("InError") => {
                    return Err(ApiError(format!(
                        "task {id} of POST {path} ended InError: {state}"
                    )))
                }
                _ if Instant::now() > until => {
                    return Err(ApiError(format!(
                        "task {id} of POST {path} not finished after {}s",
                        deadline.as_secs()
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// Every log line of a finished task (ITask: GET /tasks/{id}/_currentLogs?offset=0), and
    /// its lastLogEntry; a server without `_currentLogs` gives the last entry only.
    fn task_logs(&self, id: &str, status: &serde_json::Value) -> Result<Vec<String>, ApiError> {
        let mut logs: Vec<String> = status
            .get("lastLogEntry")
            .and_then(|l| l.as_str())
            .map(str::to_string)
            .into_iter()
            .collect();
        let path = format!("/api/tasks/{id}/_currentLogs?offset=0");
        match self.request("GET", &path).call() {
            Ok(response) => {
                let lines: Vec<String> = response
                    .into_json()
                    .map_err(|e| ApiError(format!("GET {path}: {e}")))?;
                logs.extend(lines);
            }
            Err(e) => match failed("GET", &path, e) {
                Failed::MissingRoute(_) => {}
                Failed::Other(error) => return Err(error),
            },
        }
        Ok(logs)
    }

    /// Closes a login's session (IAuthentication: POST /auth/logout); bm-core's own token is
    /// left alone. A failed logout only leaves a session to expire: it fails nothing.
    fn logout(&self) {
        if matches!(self.credentials, Credentials::Login) {
            if let Err(e) = self.post_raw("/api/auth/logout", serde_json::Value::Null) {
                tracing::warn!("BlueMind logout: {e}");
            }
        }
    }
}

/// Opens a session: admin0's login when a password is configured (its LoginResponse must say
/// `Ok`: a refused one is HTTP 200 with `Bad`, an expired password `Expired` with a key that
/// may do nothing else), bm-core's token otherwise.
fn open(config: &AgentConfig) -> Result<Api, ApiError> {
    let api_config = &config.bluemind_api;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(api_config.request_timeout_secs.max(1)))
        .build();
    let base = api_config.url.trim_end_matches('/').to_string();
    let Some(password) = &api_config.admin0_password else {
        let file = config.host_path(&api_config.token_file);
        let key = std::fs::read_to_string(&file)
            .map_err(|e| {
                ApiError(format!(
                    "cannot read the bm-core token {}: {e}",
                    file.display()
                ))
            })?
            .trim()
            .to_string();
        return Ok(Api {
            base,
            key,
            credentials: Credentials::CoreToken,
            agent,
        });
    };
    let path = "/api/auth/login?login=admin0@global.virt";
    let answer: serde_json::Value = agent
        .post(&format!("{base}{path}"))
        .send_json(serde_json::Value::String(password.clone()))
        .map_err(|e| call_error("POST", "/api/auth/login", e))?
        .into_json()
        .map_err(|e| ApiError(format!("POST /api/auth/login: {e}")))?;
    let key = login_key(&answer)?;
    Ok(Api {
        base,
        key,
        credentials: Credentials::Login,
        agent,
    })
}

/// The session key of a LoginResponse (IAuthentication.login): `status` must be `Ok` and
/// `authKey` present; `Expired` and any other status are refusals an operator can act on.
pub fn login_key(answer: &serde_json::Value) -> Result<String, ApiError> {
    let status = answer.get("status").and_then(|s| s.as_str());
    let message = match answer.get("message").and_then(|m| m.as_str()) {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    };
    match status {
        Some("Ok") => answer
            .get("authKey")
            .and_then(|k| k.as_str())
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ApiError(format!("POST /api/auth/login: no authKey in {answer}"))),
        Some("Expired") => Err(ApiError(format!(
            "POST /api/auth/login: admin0@global.virt's password has expired (status \
             Expired{message}): renew it in BlueMind's admin console, then set \
             bluemind_api.admin0_password"
        ))),
        _ => Err(ApiError(format!(
            "POST /api/auth/login: admin0@global.virt's login was refused (status {}{message}): \
             check bluemind_api.admin0_password, or remove it to use the bm-core token",
            status.unwrap_or("missing"),
        ))),
    }
}

/// The task id of a TaskRef answer.
pub fn task_id(path: &str, started: &serde_json::Value) -> Result<String, ApiError> {
    started
        .get("id")
        .and_then(|i| i.as_str())
        .map(str::to_string)
        .ok_or_else(|| ApiError(format!("POST {path}: no task id in {started}")))
}

/// The firewall's paths, the one the version suggests first: bm-core's internal API (5.x,
/// IInternalFirewallMgmt) or the public one of older releases (ISecurityMgmt).
fn firewall_paths(profile: &str, host_version: &str) -> [&'static str; 2] {
    const NEW: &str = "/internal-api/system/firewall/_updatefirewallrules";
    const OLD: &str = "/api/system/security/_updatefirewallrules";
    let new_first = match profile {
        "5.x" => true,
        "3.5" | "4.x" => false,
        _ => host_version.trim().starts_with('5'),
    };
    if new_first {
        [NEW, OLD]
    } else {
        [OLD, NEW]
    }
}

/// Regenerates the firewall: the path the version suggests, the other one when the server has
/// no such route; then the task's log must name no host that "failed updated"
/// (RulesUpdater.java logs it and still ends the task Success). Returns the task that ran
/// ("POST path: task ID Success").
fn firewall(api: &Api, paths: [&'static str; 2], deadline: Duration) -> Result<String, ApiError> {
    let mut last = None;
    for path in paths {
        let started = match api.post_raw(path, serde_json::Value::Null) {
            Ok(started) => started,
            Err(e) => match failed("POST", path, *e) {
                Failed::MissingRoute(error) => {
                    last = Some(error);
                    continue;
                }
                Failed::Other(error) => return Err(error),
            },
        };
        let id = task_id(path, &started)?;
        let status = api.wait_task(path, &id, deadline)?;
        let failed: Vec<String> = api
            .task_logs(&id, &status)?
            .into_iter()
            .filter(|l| l.contains("failed updated"))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !failed.is_empty() {
            return Err(ApiError(format!(
                "task {id} of POST {path} ended Success but its log says: {}",
                failed.join("; ")
            )));
        }
        return Ok(format!("POST {path}: task {id} Success"));
    }
    Err(last.unwrap_or_else(|| ApiError("no firewall path".into())))
}

/// A map file's identity: a rebuilt map is a new file (mv) with a new modification time.
fn map_stamp(path: &Path) -> Option<(u64, SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.modified().ok()?))
}

/// The `.db` of each BlueMind map whose `-flat` source is on this host, with its stamp now.
fn map_stamps(postfix: &Path) -> Vec<(PathBuf, Option<(u64, SystemTime)>)> {
    POSTFIX_MAPS
        .iter()
        .filter(|m| postfix.join(format!("{m}-flat")).is_file())
        .map(|m| {
            let db = postfix.join(format!("{m}.db"));
            let stamp = map_stamp(&db);
            (db, stamp)
        })
        .collect()
}

/// Repairs mail delivery, then waits until BlueMind actually rebuilt every postfix map on this
/// host: the task only publishes an event (PostfixMgmt.java) that a throttled listener
/// (DirtyMapEvent.java) turns into new maps later. Returns the task that ran and what it
/// rebuilt.
fn mail_maintenance(api: &Api, postfix: &Path, deadline: Duration) -> Result<String, ApiError> {
    let path = "/api/system/maildelivery/mgmt/_repair";
    let before = map_stamps(postfix);
    if before.is_empty() {
        return Err(ApiError(format!(
            "no BlueMind postfix map ({}-flat…) in {}: cannot confirm the repair rebuilt them",
            POSTFIX_MAPS[0],
            postfix.display()
        )));
    }
    let started = api.post(path, serde_json::Value::Null)?;
    let id = task_id(path, &started)?;
    api.wait_task(path, &id, deadline)?;
    let until = Instant::now() + deadline;
    loop {
        let stale: Vec<String> = before
            .iter()
            .filter(|(db, stamp)| {
                let now = map_stamp(db);
                now.is_none() || now == *stamp
            })
            .map(|(db, _)| db.display().to_string())
            .collect();
        if stale.is_empty() {
            return Ok(format!(
                "POST {path}: task {id} Success, {} postfix maps rebuilt",
                before.len()
            ));
        }
        if Instant::now() > until {
            return Err(ApiError(format!(
                "task {id} of POST {path} ended Success, but after {}s BlueMind has not rebuilt {}: \
                 check bm-core's log for \"Fail to update postfix maps\"",
                deadline.as_secs(),
                stale.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// mynetworks as BlueMind answers it: `values.mynetworks` of the SystemConf
/// (ISystemConfiguration.getValues); missing or empty is an error, never an empty value.
fn read_mynetworks(api: &Api) -> Result<String, ApiError> {
    mynetworks_of(&api.get("/api/configuration")?)
}

/// `values.mynetworks` of a SystemConf answer; missing or empty is an error.
pub fn mynetworks_of(conf: &serde_json::Value) -> Result<String, ApiError> {
    conf.get("values")
        .and_then(|v| v.get("mynetworks"))
        .and_then(|m| m.as_str())
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError(format!(
                "GET /api/configuration: no mynetworks under values (answer: {}): refusing to \
                 write mynetworks without the current value",
                truncate(&conf.to_string(), 300)
            ))
        })
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// mynetworks's entries as BlueMind sanitizes them (MyNetworksSanitizor.getSanitizedParts:
/// split on spaces and commas, trimmed, a leading `!` dropped), as a set: BlueMind keeps no
/// order.
pub fn networks(mynetworks: &str) -> BTreeSet<String> {
    mynetworks
        .split([',', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix('!').unwrap_or(e).to_string())
        .collect()
}

/// What to do with mynetworks when the fleet file gives no explicit value.
#[derive(Debug, PartialEq, Eq)]
pub enum Replacement {
    /// Post this value: the one read, with the origin's address replaced by the target's.
    Post(String),
    /// The origin's address is gone and the target's is there: an earlier attempt did it.
    AlreadyDone,
}

/// mynetworks with `origin` replaced by `target` (an address alone or as /32). Refuses when
/// the value holds neither address: BlueMind would keep whatever is posted, and a value not
/// derived from the origin's is not ours to write.
pub fn replace_address(
    mynetworks: &str,
    origin: &str,
    target: &str,
) -> Result<Replacement, String> {
    let entries = networks(mynetworks);
    let is = |e: &str, a: &str| !a.is_empty() && (e == a || e == format!("{a}/32"));
    if entries.iter().any(|e| is(e, origin)) {
        let replaced: Vec<String> = mynetworks
            .split([',', ' '])
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e == origin {
                    target.to_string()
                } else if e == format!("{origin}/32") {
                    format!("{target}/32")
                } else {
                    e.to_string()
                }
            })
            .collect();
        return Ok(Replacement::Post(replaced.join(", ")));
    }
    if entries.iter().any(|e| is(e, target)) {
        return Ok(Replacement::AlreadyDone);
    }
    Err(format!(
        "mynetworks ({mynetworks}) holds neither the origin's address {origin} nor the \
         target's {target}: refusing to guess; set mynetworks for this instance in the fleet file"
    ))
}

/// Runs the three steps; blocking (call from a blocking thread).
pub fn run(
    config: &AgentConfig,
    req: &PostMigrationRequest,
    host_version: &str,
) -> PostMigrationReply {
    let mut reply = PostMigrationReply::default();
    let result = open(config).and_then(|api| {
        let done = steps(&api, config, req, host_version, &mut reply);
        api.logout();
        done
    });
    match result {
        Ok(()) => reply.ok = true,
        Err(ApiError(e)) => reply.error = e,
    }
    reply
}

fn steps(
    api: &Api,
    config: &AgentConfig,
    req: &PostMigrationRequest,
    host_version: &str,
    reply: &mut PostMigrationReply,
) -> Result<(), ApiError> {
    let deadline = Duration::from_secs(config.bluemind_api.task_timeout_secs);
    let task = firewall(api, firewall_paths(&req.profile, host_version), deadline)?;
    reply.tasks.push(task);
    reply.steps.push("firewall".into());
    let task = mail_maintenance(api, &config.host_path(Path::new("/etc/postfix")), deadline)?;
    reply.tasks.push(task);
    reply.steps.push("mail-maintenance".into());
    reply.mynetworks_before = read_mynetworks(api)?;
    let wanted = if req.mynetworks.is_empty() {
        match replace_address(
            &reply.mynetworks_before,
            &req.origin_address,
            &req.target_address,
        )
        .map_err(ApiError)?
        {
            Replacement::Post(value) => Some(value),
            Replacement::AlreadyDone => None,
        }
    } else {
        Some(req.mynetworks.clone())
    };
    let Some(wanted) = wanted else {
        reply.mynetworks_after = reply.mynetworks_before.clone();
        reply.steps.push("mynetworks".into());
        return Ok(());
    };
    api.post(
        "/api/configuration",
        serde_json::json!({ "mynetworks": wanted }),
    )?;
    // BlueMind rewrites the stored value (its defaults re-added, in no order): what was
    // posted must all be there.
    reply.mynetworks_after = read_mynetworks(api)?;
    let kept = networks(&reply.mynetworks_after);
    let lost: Vec<String> = networks(&wanted).difference(&kept).cloned().collect();
    if !lost.is_empty() {
        return Err(ApiError(format!(
            "POST /api/configuration: BlueMind kept mynetworks = {} without {} of what was posted",
            reply.mynetworks_after,
            lost.join(", ")
        )));
    }
    reply.steps.push("mynetworks".into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mynetworks_replaces_only_the_origin() {
        assert_eq!(
            replace_address(
                "127.0.0.0/8, 198.18.0.2, 198.18.0.0/24",
                "198.18.0.2",
                "198.18.0.3"
            ),
            Ok(Replacement::Post(
                "127.0.0.0/8, 198.18.0.3, 198.18.0.0/24".into()
            ))
        );
        assert_eq!(
            replace_address("198.18.0.2/32 192.0.2.0/24", "198.18.0.2", "198.18.0.3"),
            Ok(Replacement::Post("198.18.0.3/32, 192.0.2.0/24".into()))
        );
    }

    #[test]
    fn mynetworks_without_either_address_is_refused_and_a_replaced_one_left_alone() {
        assert!(
            replace_address("127.0.0.0/8, 198.19.0.0/24", "198.18.0.2", "198.18.0.3")
                .unwrap_err()
                .contains("neither the origin's address 198.18.0.2")
        );
        assert!(replace_address("", "198.18.0.2", "198.18.0.3").is_err());
        assert!(replace_address("127.0.0.0/8", "", "").is_err());
        assert_eq!(
            replace_address("198.18.0.3/32, 127.0.0.0/8", "198.18.0.2", "198.18.0.3"),
            Ok(Replacement::AlreadyDone)
        );
    }

    #[test]
    fn networks_are_sanitized_as_bluemind_does() {
        let n = networks(" !198.18.0.0/24,127.0.0.0/8  198.18.0.3/32,");
        assert_eq!(
            n.into_iter().collect::<Vec<_>>(),
            ["127.0.0.0/8", "198.18.0.0/24", "198.18.0.3/32"]
        );
    }

    #[test]
    fn the_firewall_path_the_version_suggests_comes_first() {
        let new = "/internal-api/system/firewall/_updatefirewallrules";
        assert_eq!(firewall_paths("5.x", "")[0], new);
        assert_eq!(firewall_paths("4.x", "5.1")[1], new);
        assert_eq!(firewall_paths("auto", "5.2.1")[0], new);
        assert_eq!(firewall_paths("auto", "4.9.3")[1], new);
    }
}
