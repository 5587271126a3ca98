//! BlueMind's API as far as a migration uses it, derived from BlueMind's own sources (the
//! public mirror `mdhender/bluemindfork`; each behaviour names the file it follows), never
//! from what bmfleet's client sends. The `bluemind-standin` binary serves it on 8080 and
//! 8090; tests serve it in-process on a loopback port.
//!
//! State lives under the host's data root, as BlueMind keeps it on its host:
//! - `etc/bm/admin0.pw`: admin0@global.virt's password; `etc/bm/bm-core.tok`: bm-core's token.
//! - `etc/bm/bm-core.version`: the installed version (5.x: the firewall on the internal API).
//! - `etc/bm/bm.ini`: read into the configuration like Java `Properties`.
//! - `etc/bm/standin-configuration.json`: the `systemconf` table (a flat JSON map); it travels
//!   with the config set as BlueMind's table travels with the `bj` database.
//! - `etc/postfix/MAP-flat` / `MAP.db`: the postfix maps the mail-maintenance repair rebuilds.
//!
//! Injected failures (files under `etc/bm/`): `standin-task-fails` (tasks end InError),
//! `standin-admin0-expired` (login answers Expired), `standin-firewall-host-fails` (the
//! firewall task logs "Host … failed updated" and still ends Success), `standin-maps-stuck`
//! (the repair's map rebuild never happens), `standin-maps-delay-ms` (how long the rebuild
//! waits; BlueMind throttles it by 10 s), `standin-api-500` (a count: that many next calls
//! answer HTTP 500 with a ServerFault, as BlueMind's REST layer does for an internal error),
//! `standin-api-hang` (a count: that many next calls answer only after
//! `standin-api-hang-ms`, 60 s by default: a core that hangs).
//!
//! Every call is recorded, one JSON object a line, in `var/log/standin-api.jsonl`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// The maps BlueMind's postfix map updater writes (ServerMaps.java: VirtualDomainsMap,
/// VirtualMailboxesMap, VirtualAliasMap, TransportMap, MasterRelayTransportMap; file names from
/// PostfixPaths.java).
pub const POSTFIX_MAPS: [&str; 5] = [
    "virtual_domains",
    "virtual_mailbox",
    "virtual_alias",
    "transport",
    "master_relay_transport",
];

/// What the rebuilt `.db` maps of the stand-in start with (so a test can tell them apart).
pub const REBUILT_MAP_MARK: &str = "bluemind-standin postmap";

struct Task {
    polls: u32,
    logs: Vec<String>,
    fails: bool,
}

struct ApiState {
    root: PathBuf,
    /// Session keys from logins; the bool: the password had expired.
    keys: HashMap<String, bool>,
    tasks: HashMap<String, Task>,
    next: u64,
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Serves BlueMind's API on `listener` until the process ends (`port` is only recorded).
pub fn serve(root: &Path, listener: TcpListener, port: u16) -> std::io::Result<()> {
    let server = tiny_http::Server::from_listener(listener, None).map_err(std::io::Error::other)?;
    let state = Arc::new(Mutex::new(ApiState {
        root: root.to_path_buf(),
        keys: HashMap::new(),
        tasks: HashMap::new(),
        next: 0,
    }));
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            // One thread a call: a hanging call does not hold up the others.
            let state = state.clone();
            std::thread::spawn(move || answer(&state, request, port));
        }
    });
    Ok(())
}

/// Takes one from the count in `etc/bm/NAME` (an injected failure); whether there was one.
fn take_one(root: &Path, name: &str) -> bool {
    let path = root.join("etc/bm").join(name);
    let left: u64 = read(root, &format!("etc/bm/{name}")).parse().unwrap_or(0);
    left > 0 && std::fs::write(&path, (left - 1).to_string()).is_ok()
}

fn answer(state: &Mutex<ApiState>, mut request: tiny_http::Request, port: u16) {
    // Taken under the lock: concurrent calls never take the same one.
    let (root, hang, injected_500) = {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        let hang = take_one(&s.root, "standin-api-hang");
        let failing = take_one(&s.root, "standin-api-500");
        (s.root.clone(), hang, failing)
    };
    if hang {
        let ms = read(&root, "etc/bm/standin-api-hang-ms")
            .parse()
            .unwrap_or(60_000);
        std::thread::sleep(Duration::from_millis(ms));
    }
    let mut body = String::new();
    let _ = request.as_reader().read_to_string(&mut body);
    let key = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("X-BM-ApiKey"))
        .map(|h| h.value.as_str().to_string())
        .unwrap_or_default();
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let (status, reply) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let key_valid = valid_key(&s, &key);
        let answer = if injected_500 {
            fault("FAILURE", "injected internal error")
        } else {
            handle(&mut s, &method, &url, &key, &body)
        };
        let record = json!({
            "port": port, "method": method, "url": url, "api_key_valid": key_valid,
            "body": body, "status": answer.0,
        });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.root.join("var/log/standin-api.jsonl"))
        {
            let _ = writeln!(f, "{record}");
        }
        answer
    };
    let text = match &reply {
        // A `void` method answers no body (ISystemConfiguration.updateMutableValues).
        None => String::new(),
        Some(v) => v.to_string(),
    };
    let mut response = tiny_http::Response::from_string(text).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "application/json") {
        response.add_header(h);
    }
    let _ = request.respond(response);
}

type Answer = (u16, Option<Value>);

/// A ServerFault raised inside a service, as BlueMind's REST layer answers it
/// (net.bluemind.core.rest.base.codec.JsonObjectCodec.replyFault: PERMISSION_DENIED 403,
/// NOT_FOUND 404, anything else 500; the body is `buildFault`'s errorCode, errorType and
/// message).
fn fault(code: &str, message: &str) -> Answer {
    let status = match code {
        "PERMISSION_DENIED" => 403,
        "NOT_FOUND" => 404,
        _ => 500,
    };
    (
        status,
        Some(json!({"errorCode": code, "errorType": "ServerFault", "message": message})),
    )
}

/// A key that names no session (RestServiceMethodHandler.call: `RestResponse.invalidSession`,
/// HTTP 401 with an AUTHENTICATION_FAIL fault), checked once the route is found.
fn invalid_session(key: &str) -> Answer {
    let message = format!("session id {key} is not valid");
    (
        401,
        Some(
            json!({"errorCode": "AUTHENTICATION_FAIL", "errorType": "ServerFault", "message": message}),
        ),
    )
}

fn ok(v: Value) -> Answer {
    (200, Some(v))
}

fn valid_key(s: &ApiState, key: &str) -> bool {
    s.keys.contains_key(key) || (!key.is_empty() && key == read(&s.root, "etc/bm/bm-core.tok"))
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn handle(s: &mut ApiState, method: &str, url: &str, key: &str, body: &str) -> Answer {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let new_firewall = read(&s.root, "etc/bm/bm-core.version").starts_with('5');
    // RestRootHandler.doCall looks the route up first: a path no service serves fails before
    // any session is looked at.
    if !routed(method, path, new_firewall) {
        return no_route(path);
    }
    if method == "POST" && path == "/api/auth/login" {
        return login(s, query, body);
    }
    if key.is_empty() {
        // An anonymous context: the services refuse it (PERMISSION_DENIED).
        return fault("PERMISSION_DENIED", "anonymous calls are not allowed");
    }
    if !valid_key(s, key) {
        return invalid_session(key);
    }
    if s.keys.get(key) == Some(&true) {
        // Authentication.java builds an Expired session's context with the password marked
        // expired: it may change the password and nothing else.
        return fault("PERMISSION_DENIED", "password expired");
    }
    match (method, path) {
        // IAuthentication.java: @POST @Path("logout"); the session is dropped.
        ("POST", "/api/auth/logout") => {
            s.keys.remove(key);
            (200, None)
        }
        // ISecurityMgmt (older releases) / IInternalFirewallMgmt.java (@Path("/system/firewall"),
        // internal = true, bm-core from 5 on): one route or the other exists, never both.
        ("POST", "/api/system/security/_updatefirewallrules") if !new_firewall => firewall_task(s),
        ("POST", "/internal-api/system/firewall/_updatefirewallrules") if new_firewall => {
            firewall_task(s)
        }
        // IMailDeliveryMgmt.java @Path("/system/maildelivery/mgmt") _repair; PostfixMgmt.java
        // runs a task that only publishes "postfix.map.dirty" and ends: the maps are rebuilt
        // later by DirtyMapEvent.java, throttled.
        ("POST", "/api/system/maildelivery/mgmt/_repair") => {
            schedule_map_rebuild(&s.root);
            new_task(s, vec!["postfix.map.dirty published".into()])
        }
        // ITask.java @Path("/tasks/{taskId}"): GET status, GET _currentLogs?offset=N.
        ("GET", p) if p.starts_with("/api/tasks/") => {
            let rest = p.trim_start_matches("/api/tasks/");
            let (id, sub) = rest.split_once('/').unwrap_or((rest, ""));
            let fail_all = s.root.join("etc/bm/standin-task-fails").exists();
            let Some(task) = s.tasks.get_mut(id) else {
                return fault("NOT_FOUND", &format!("task {id} not found"));
            };
            match sub {
                "" => {
                    task.polls += 1;
                    // TaskStatus.java: steps, progress, lastLogEntry, state, result.
                    let state = match (task.polls, fail_all || task.fails) {
                        (1, _) => "InProgress",
                        (_, true) => "InError",
                        _ => "Success",
                    };
                    let shown = if task.polls == 1 { 1 } else { task.logs.len() };
                    // TasksManager.executeTask ends a task that completed with
                    // `end(true, "", null)`: its last entry is then "".
                    let last = match state {
                        "Success" => Some(String::new()),
                        _ => task.logs.get(shown.saturating_sub(1)).cloned(),
                    };
                    ok(json!({
                        "steps": task.logs.len(), "progress": shown,
                        "lastLogEntry": last,
                        "state": state, "result": null,
                    }))
                }
                "_currentLogs" => {
                    // TaskManager.getCurrentLogs: the messages from offset on.
                    let offset = query_param(query, "offset")
                        .and_then(|o| o.parse::<usize>().ok())
                        .unwrap_or(0);
                    ok(json!(task.logs.iter().skip(offset).collect::<Vec<_>>()))
                }
                _ => no_route(path),
            }
        }
        ("GET", "/api/configuration") => ok(json!({ "values": configuration(&s.root) })),
        ("POST", "/api/configuration") => update_configuration(&s.root, body),
        _ => no_route(path),
    }
}

/// The routes this stand-in serves (BlueMind's: IAuthentication, ISecurityMgmt or
/// IInternalFirewallMgmt by version, IMailDeliveryMgmt, ITask, ISystemConfiguration).
fn routed(method: &str, path: &str, new_firewall: bool) -> bool {
    match (method, path) {
        ("POST", "/api/auth/login" | "/api/auth/logout") => true,
        ("POST", "/api/system/security/_updatefirewallrules") => !new_firewall,
        ("POST", "/internal-api/system/firewall/_updatefirewallrules") => new_firewall,
        ("POST", "/api/system/maildelivery/mgmt/_repair") => true,
        ("GET", "/api/configuration") | ("POST", "/api/configuration") => true,
        ("GET", p) => p.strip_prefix("/api/tasks/").is_some_and(|rest| {
            !rest.is_empty() && matches!(rest.split_once('/'), None | Some((_, "_currentLogs")))
        }),
        _ => false,
    }
}

/// A path no service serves: RestRootHandler.doCall fails it with `ServerFault("no service
/// registered on path " + path, NOT_FOUND)`, and RestHttpProxyHandler's failure handler
/// answers HTTP 500 with `JsonUtils.asString(new ServerFault(e.getMessage(), UNKNOWN))` (the
/// exception as Jackson writes it: its code and message among its properties).
fn no_route(path: &str) -> Answer {
    let message = format!("no service registered on path {path}");
    (
        500,
        Some(json!({
            "cause": null, "stackTrace": [], "code": "UNKNOWN", "message": message,
            "localizedMessage": message, "suppressed": [],
        })),
    )
}

/// IAuthentication.java: `POST /auth/login?login=…` with the password as a JSON string,
/// answering a LoginResponse (LoginResponse.java: status Ok|Bad|Expired, authKey). A refused
/// login is HTTP 200 with status Bad and no authKey (Authentication.java sets `resp.status =
/// Status.Bad` and returns); an expired password still gets a session key (Status.Expired).
fn login(s: &mut ApiState, query: &str, body: &str) -> Answer {
    let password: String = serde_json::from_str(body).unwrap_or_default();
    let login = query_param(query, "login").unwrap_or_default();
    if login != "admin0@global.virt"
        || password.is_empty()
        || password != read(&s.root, "etc/bm/admin0.pw")
    {
        return ok(json!({"status": "Bad", "message": "Invalid credentials"}));
    }
    let expired = s.root.join("etc/bm/standin-admin0-expired").exists();
    s.next += 1;
    let auth_key = format!("key-{}", s.next);
    s.keys.insert(auth_key.clone(), expired);
    ok(json!({
        "status": if expired { "Expired" } else { "Ok" },
        "authKey": auth_key,
        "authUser": {"login": "admin0", "domainUid": "global.virt"},
    }))
}

fn new_task(s: &mut ApiState, logs: Vec<String>) -> Answer {
    s.next += 1;
    let id = format!("task-{}", s.next);
    s.tasks.insert(
        id.clone(),
        Task {
            polls: 0,
            logs,
            fails: false,
        },
    );
    // TaskRef.java: {"id": …}.
    ok(json!({ "id": id }))
}

/// RulesUpdater.java: one progress line per server ("Host A updated"); a host whose iptables
/// script could not be written is logged "Host A failed updated" and the task still ends
/// Success.
fn firewall_task(s: &mut ApiState) -> Answer {
    let host_fails = s.root.join("etc/bm/standin-firewall-host-fails").exists();
    let mut logs = vec!["Server list retrieved".to_string()];
    for host in server_addresses(&s.root) {
        logs.push(if host_fails {
            format!("Host {host} failed updated")
        } else {
            format!("Host {host} updated")
        });
    }
    new_task(s, logs)
}

/// The addresses of BlueMind's server records (IServer.allComplete). A single-server install
/// has one, the host's address at install time, which bm.ini's `host` holds.
fn server_addresses(root: &Path) -> Vec<String> {
    bm_ini(root)
        .get("host")
        .filter(|h| !h.is_empty())
        .cloned()
        .into_iter()
        .collect()
}

/// bm.ini read as java.util.Properties reads it (SystemConfiguration.getValues): `key = value`
/// or `key: value`, `#`/`!` comments; a `[section]` line is a key with an empty value.
fn bm_ini(root: &Path) -> BTreeMap<String, String> {
    read(root, "etc/bm/bm.ini")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        .map(|l| match l.find(['=', ':']) {
            Some(i) => (l[..i].trim().to_string(), l[i + 1..].trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

fn stored_configuration(root: &Path) -> BTreeMap<String, String> {
    serde_json::from_str(&read(root, "etc/bm/standin-configuration.json")).unwrap_or_default()
}

/// SystemConfiguration.getValues: bm.ini's properties, then the systemconf table over them.
fn configuration(root: &Path) -> BTreeMap<String, String> {
    let mut values = bm_ini(root);
    values.extend(stored_configuration(root));
    values
}

/// SystemConfiguration.updateMutableValues: sanitize, validate, merge (a null value removes
/// the key: SystemConf.merge), store. Answers no body.
fn update_configuration(root: &Path, body: &str) -> Answer {
    let Ok(modifications) = serde_json::from_str::<BTreeMap<String, Option<String>>>(body) else {
        return fault("INVALID_PARAMETER", "a map of strings is expected");
    };
    let mut modifications = modifications;
    let previous = configuration(root);
    // MyNetworksSanitizor.sanitize.
    if !previous.contains_key("mynetworks") && !modifications.contains_key("mynetworks") {
        modifications.insert("mynetworks".into(), Some(join(&mynetworks_defaults(root))));
    } else if let Some(Some(value)) = modifications.get("mynetworks") {
        let mut parts = sanitized_parts(value);
        parts.remove("127.0.0.0/8");
        for known in known_addresses(root) {
            parts.remove(&known);
        }
        parts.extend(mynetworks_defaults(root));
        modifications.insert("mynetworks".into(), Some(join(&parts)));
    }
    // MyNetworksValidator.validate.
    if let Some(value) = modifications.get("mynetworks") {
        let value = value.clone().unwrap_or_default();
        if value.is_empty() {
            return fault("INVALID_PARAMETER", "mynetworks must not be empty");
        }
        for part in sanitized_parts(&value) {
            if let Err(message) = validate_network(&part, &value) {
                return fault("INVALID_PARAMETER", &message);
            }
        }
    }
    let mut stored = stored_configuration(root);
    for (k, v) in modifications {
        match v {
            Some(v) => stored.insert(k, v),
            None => stored.remove(&k),
        };
    }
    match serde_json::to_string(&stored) {
        Ok(text) => match std::fs::write(root.join("etc/bm/standin-configuration.json"), text) {
            Ok(()) => (200, None),
            Err(e) => fault("FAILURE", &e.to_string()),
        },
        Err(e) => fault("FAILURE", &e.to_string()),
    }
}

/// MyNetworksSanitizor.getSanitizedParts: split on spaces then commas, trim, drop empty
/// parts, strip one leading `!`. A HashSet: the order is lost.
fn sanitized_parts(value: &str) -> HashSet<String> {
    value
        .split(' ')
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.strip_prefix('!').unwrap_or(p).to_string())
        .collect()
}

/// `Joiner.on(", ").join(parts)` over a HashSet: entries in no particular order.
fn join(parts: &HashSet<String>) -> String {
    parts.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// MyNetworksSanitizor.getKnownAddresses: each server record's `ip/32`.
fn known_addresses(root: &Path) -> Vec<String> {
    server_addresses(root)
        .into_iter()
        .map(|ip| format!("{ip}/32"))
        .collect()
}

/// MyNetworksSanitizor.getDefaultValue: 127.0.0.0/8, the known addresses, and every address
/// of the host's interfaces that has a broadcast address (IPv4) and is not 127.*, as /32.
fn mynetworks_defaults(root: &Path) -> HashSet<String> {
    let mut set: HashSet<String> = known_addresses(root).into_iter().collect();
    set.insert("127.0.0.0/8".into());
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            if let Some(v4) = a.address.as_ref().and_then(|x| x.as_sockaddr_in()) {
                let ip = v4.ip();
                if !ip.is_loopback() {
                    set.insert(format!("{ip}/32"));
                }
            }
        }
    }
    set
}

/// MyNetworksValidator.validate for one part: `ADDR` or `ADDR/MASK`, the mask 0-32 for IPv4
/// and 0-128 for IPv6, the address (IPv6 brackets removed) a literal IP.
fn validate_network(part: &str, whole: &str) -> Result<(), String> {
    let sub: Vec<&str> = part.split('/').collect();
    let invalid = || format!("Invalid mynetworks: {whole}");
    match sub.len() {
        1 => {}
        2 => {
            let mask: i64 = sub[1].parse().map_err(|_| invalid())?;
            let max = if sub[0].contains(':') { 128 } else { 32 };
            if !(0..=max).contains(&mask) {
                return Err(invalid());
            }
        }
        _ => return Err(invalid()),
    }
    sub[0]
        .replace(['[', ']'], "")
        .parse::<std::net::IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("Invalid mynetworks: {part} - must contain only IP or subnet"))
}

/// DirtyMapEvent.java (throttled) → PostfixMapUpdater.refreshMaps: ServerMaps.writeFlatMaps
/// writes each `MAP-flat`, then the updateMaps.sh template runs `postmap MAP-flat` and
/// `mv -f MAP-flat.db MAP.db` for each map, and reloads postfix. Beside a real Postfix (the
/// lab's real mail stack: its queue is there) the real `postmap` builds the map (Postfix's
/// daemons reopen a changed table by themselves); beside the stand-in a marked copy stands
/// for it.
fn schedule_map_rebuild(root: &Path) {
    if root.join("etc/bm/standin-maps-stuck").exists() {
        return;
    }
    let delay = read(root, "etc/bm/standin-maps-delay-ms")
        .parse()
        .unwrap_or(500);
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(delay));
        let postfix = root.join("etc/postfix");
        let real = root.join("var/spool/postfix").is_dir();
        for map in POSTFIX_MAPS {
            let flat = postfix.join(format!("{map}-flat"));
            let Ok(content) = std::fs::read(&flat) else {
                continue;
            };
            let built = postfix.join(format!("{map}-flat.db"));
            if real {
                let rebuilt = std::fs::write(&flat, &content).is_ok()
                    && std::process::Command::new("postmap")
                        .arg(&flat)
                        .status()
                        .is_ok_and(|s| s.success());
                if rebuilt {
                    let _ = std::fs::rename(&built, postfix.join(format!("{map}.db")));
                }
                continue;
            }
            let mut db = format!("{REBUILT_MAP_MARK} {map}\n").into_bytes();
            db.extend_from_slice(&content);
            if std::fs::write(&flat, &content).is_ok() && std::fs::write(&built, db).is_ok() {
                let _ = std::fs::rename(&built, postfix.join(format!("{map}.db")));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_split_trimmed_and_unnegated() {
        let parts = sanitized_parts(" 198.18.0.0/15,!192.0.2.1  ,, 2001:db8::/32");
        let expected: HashSet<String> = ["198.18.0.0/15", "192.0.2.1", "2001:db8::/32"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(parts, expected);
    }

    #[test]
    fn masks_are_bounded_by_family() {
        assert!(validate_network("198.18.0.0/32", "").is_ok());
        assert!(validate_network("198.18.0.0/33", "").is_err());
        assert!(validate_network("2001:db8::/128", "").is_ok());
        assert!(validate_network("2001:db8::/129", "").is_err());
        assert!(validate_network("[2001:db8::1]", "").is_ok());
        assert!(validate_network("mail.example.net", "").is_err());
        assert!(validate_network("1.2.3.4/8/9", "").is_err());
    }
}
