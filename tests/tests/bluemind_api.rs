//! The post-migration client against the BlueMind stand-in, and the stand-in against what
//! BlueMind's sources say (tests/src/bluemind_api.rs names each source file): every check the
//! client makes is shown to fail on the answer that would slip past it.

use std::path::{Path, PathBuf};

use bmfleet_agent::config::AgentConfig;
use bmfleet_proto::identity::Role;
use bmfleet_proto::v1::{PostMigrationReply, PostMigrationRequest};
use bmfleet_tests::bluemind_api::{self, POSTFIX_MAPS, REBUILT_MAP_MARK};
use bmfleet_tests::{agent_config, TestPki};
use serde_json::{json, Value};

const ORIGIN: &str = "198.18.0.2";
const TARGET: &str = "198.18.0.3";
const SERVICE_IP: &str = "198.18.0.10";
/// A customer's relay network: a string in the configuration, never an address used.
const RELAY: &str = "198.19.42.0/24";

/// A target host's data root with BlueMind's state as a migrated server has it, and the
/// stand-in's API serving it on a loopback port.
struct Host {
    _dir: tempfile::TempDir,
    _pki: TestPki,
    config: AgentConfig,
    url: String,
}

impl Host {
    fn new(version: &str, mynetworks: Option<&str>) -> Host {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let mut config = agent_config(pki.issue("target-1", Role::Agent), dir.path(), vec![]);
        let root = config.data_root.clone();
        let write = |rel: &str, text: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write("etc/bm/bm-core.version", &format!("{version}\n"));
        write("etc/bm/bm-core.tok", "core-token\n");
        write("etc/bm/admin0.pw", "admin0-secret\n");
        write(
            "etc/bm/bm.ini",
            &format!("[global]\nhost = {SERVICE_IP}\ndbtype = PGSQL\nlogin = bj\n"),
        );
        let mut stored =
            json!({"external_url": "mail.example.net", "message_size_limit": "10000000"});
        if let Some(m) = mynetworks {
            stored["mynetworks"] = json!(m);
        }
        write("etc/bm/standin-configuration.json", &stored.to_string());
        write("etc/bm/standin-maps-delay-ms", "300");
        for map in POSTFIX_MAPS {
            write(
                &format!("etc/postfix/{map}-flat"),
                &format!("example.net {map}\n"),
            );
            write(&format!("etc/postfix/{map}.db"), "origin libdb bytes");
        }
        std::fs::create_dir_all(root.join("var/log")).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        bluemind_api::serve(&root, listener, port).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        config.bluemind_api.url = url.clone();
        config.bluemind_api.task_timeout_secs = 10;
        Host {
            _dir: dir,
            _pki: pki,
            config,
            url,
        }
    }

    fn root(&self) -> &Path {
        &self.config.data_root
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    fn touch(&self, rel: &str) {
        std::fs::write(self.path(rel), "").unwrap();
    }

    fn with_password(mut self, password: &str) -> Host {
        self.config.bluemind_api.admin0_password = Some(password.into());
        self
    }

    fn run(&self, profile: &str, mynetworks: &str) -> PostMigrationReply {
        let req = PostMigrationRequest {
            operation_id: "m/i/post-migration/1".into(),
            profile: profile.into(),
            origin_address: ORIGIN.into(),
            target_address: TARGET.into(),
            mynetworks: mynetworks.into(),
        };
        let version = std::fs::read_to_string(self.path("etc/bm/bm-core.version")).unwrap();
        bmfleet_agent::bluemind::post_migration::run(&self.config, &req, version.trim())
    }

    /// Every call the stand-in received.
    fn calls(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("var/log/standin-api.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn posted(&self) -> Vec<(String, String)> {
        self.calls()
            .iter()
            .filter(|c| c["method"] == "POST")
            .map(|c| {
                (
                    c["url"].as_str().unwrap().to_string(),
                    c["body"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// The systemconf table as stored.
    fn stored(&self) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.path("etc/bm/standin-configuration.json")).unwrap(),
        )
        .unwrap()
    }

    fn stored_networks(&self) -> std::collections::BTreeSet<String> {
        bmfleet_agent::bluemind::post_migration::networks(
            self.stored()["mynetworks"].as_str().unwrap(),
        )
    }

    fn maps_rebuilt(&self) -> usize {
        POSTFIX_MAPS
            .iter()
            .filter(|m| {
                std::fs::read_to_string(self.path(&format!("etc/postfix/{m}.db")))
                    .unwrap()
                    .starts_with(REBUILT_MAP_MARK)
            })
            .count()
    }

    fn http(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String) {
        let mut request = ureq::request(method, &format!("{}{path}", self.url));
        if let Some(k) = key {
            request = request.set("X-BM-ApiKey", k);
        }
        let result = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match result {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
}

fn customer_networks() -> String {
    format!("127.0.0.0/8, {ORIGIN}/32, {RELAY}")
}

#[test]
fn a_migrated_server_keeps_its_relay_networks_and_gets_the_targets_address() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    let reply = host.run("auto", "");
    assert!(reply.ok, "{}", reply.error);
    assert_eq!(reply.steps, ["firewall", "mail-maintenance", "mynetworks"]);
    assert_eq!(reply.mynetworks_before, customer_networks());
    // Each task the reply names is one BlueMind gave and the agent followed to its end.
    assert_eq!(reply.tasks.len(), 2, "{:?}", reply.tasks);
    assert!(reply.tasks[0]
        .starts_with("POST /internal-api/system/firewall/_updatefirewallrules: task "));
    assert!(reply.tasks[1].starts_with("POST /api/system/maildelivery/mgmt/_repair: task "));
    let polled: Vec<String> = host
        .calls()
        .iter()
        .filter_map(|c| c["url"].as_str().map(str::to_string))
        .collect();
    for task in &reply.tasks {
        let id = task
            .split(": task ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap();
        assert!(task.contains(&format!("task {id} Success")), "{task}");
        assert!(
            polled.contains(&format!("/api/tasks/{id}")),
            "{id} never polled: {polled:?}"
        );
    }
    let posted = host.posted();
    assert_eq!(
        posted.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(),
        [
            "/internal-api/system/firewall/_updatefirewallrules",
            "/api/system/maildelivery/mgmt/_repair",
            "/api/configuration"
        ]
    );
    let body: Value = serde_json::from_str(&posted[2].1).unwrap();
    assert_eq!(
        body,
        json!({"mynetworks": format!("127.0.0.0/8, {TARGET}/32, {RELAY}")})
    );
    let kept = host.stored_networks();
    assert!(kept.contains(RELAY), "{kept:?}");
    assert!(kept.contains(&format!("{TARGET}/32")), "{kept:?}");
    assert!(!kept.contains(&format!("{ORIGIN}/32")), "{kept:?}");
    // BlueMind re-adds its server's own address.
    assert!(kept.contains(&format!("{SERVICE_IP}/32")), "{kept:?}");
    assert_eq!(
        bmfleet_agent::bluemind::post_migration::networks(&reply.mynetworks_after),
        kept
    );
    // The maps were rebuilt by BlueMind after the repair, not merely asked for.
    assert_eq!(host.maps_rebuilt(), POSTFIX_MAPS.len());
    // The bm-core token is never logged out.
    assert!(host.calls().iter().all(|c| c["url"] != "/api/auth/logout"));
}

#[test]
fn a_retry_after_the_replacement_posts_nothing_more() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    assert!(host.run("auto", "").ok);
    let before = host.stored();
    let again = host.run("auto", "");
    assert!(again.ok, "{}", again.error);
    let configuration_posts = host
        .posted()
        .iter()
        .filter(|(u, _)| u == "/api/configuration")
        .count();
    assert_eq!(configuration_posts, 1);
    assert_eq!(host.stored(), before);
}

#[test]
fn a_value_without_the_origins_address_is_refused_before_anything_is_written() {
    let host = Host::new("5.1.2", Some(&format!("127.0.0.0/8, {RELAY}")));
    let before = host.stored();
    let reply = host.run("auto", "");
    assert!(!reply.ok);
    assert!(
        reply
            .error
            .contains("neither the origin's address 198.18.0.2"),
        "{}",
        reply.error
    );
    assert!(host.posted().iter().all(|(u, _)| u != "/api/configuration"));
    assert_eq!(host.stored(), before);
}

#[test]
fn no_mynetworks_read_back_is_refused_and_nothing_is_posted() {
    // The SystemConf holds no mynetworks at all: the client must not post "" (BlueMind would
    // replace every relay network by its defaults).
    let host = Host::new("5.1.2", None);
    let reply = host.run("auto", "");
    assert!(!reply.ok);
    assert!(
        reply.error.contains("no mynetworks under values"),
        "{}",
        reply.error
    );
    assert!(host.posted().iter().all(|(u, _)| u != "/api/configuration"));
    assert!(host.stored().get("mynetworks").is_none());
}

#[test]
fn an_explicit_value_is_posted_as_is_and_checked_after() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    let wanted = format!("127.0.0.0/8 {TARGET}/32 {RELAY} 198.19.43.0/24");
    let reply = host.run("auto", &wanted);
    assert!(reply.ok, "{}", reply.error);
    let kept = host.stored_networks();
    for n in bmfleet_agent::bluemind::post_migration::networks(&wanted) {
        assert!(kept.contains(&n), "{n} in {kept:?}");
    }
}

#[test]
fn admin0_logs_in_checks_the_status_and_logs_out() {
    let host = Host::new("5.1.2", Some(&customer_networks())).with_password("admin0-secret");
    let reply = host.run("auto", "");
    assert!(reply.ok, "{}", reply.error);
    let calls = host.calls();
    assert!(calls[0]["url"]
        .as_str()
        .unwrap()
        .starts_with("/api/auth/login?login=admin0@global.virt"));
    let last = calls.last().unwrap();
    assert_eq!(last["url"], "/api/auth/logout");
    assert_eq!(last["api_key_valid"], true);
    // Every call between carried the session's key.
    assert!(calls[1..].iter().all(|c| c["api_key_valid"] == true));
}

#[test]
fn a_refused_login_answers_200_bad_and_stops_everything() {
    let host = Host::new("5.1.2", Some(&customer_networks())).with_password("wrong");
    let reply = host.run("auto", "");
    assert!(!reply.ok);
    assert!(
        reply.error.contains("login was refused (status Bad"),
        "{}",
        reply.error
    );
    assert_eq!(host.calls().len(), 1);
}

#[test]
fn an_expired_password_is_refused_though_it_carries_a_key() {
    let host = Host::new("5.1.2", Some(&customer_networks())).with_password("admin0-secret");
    host.touch("etc/bm/standin-admin0-expired");
    let reply = host.run("auto", "");
    assert!(!reply.ok);
    assert!(reply.error.contains("has expired"), "{}", reply.error);
    assert_eq!(host.calls().len(), 1);
}

#[test]
fn a_firewall_task_that_succeeds_with_a_failed_host_fails_the_step() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    host.touch("etc/bm/standin-firewall-host-fails");
    let reply = host.run("auto", "");
    assert!(!reply.ok);
    assert!(
        reply
            .error
            .contains(&format!("Host {SERVICE_IP} failed updated")),
        "{}",
        reply.error
    );
    assert!(reply.steps.is_empty());
    assert_eq!(host.posted().len(), 1);
}

#[test]
fn the_firewall_path_follows_what_the_server_answers() {
    // A 4.x server declared 5.x: the internal path is missing, the old one is used.
    let old = Host::new("4.9.3", Some(&customer_networks()));
    let reply = old.run("5.x", "");
    assert!(reply.ok, "{}", reply.error);
    let urls: Vec<String> = old.posted().into_iter().map(|(u, _)| u).collect();
    assert_eq!(
        urls[0],
        "/internal-api/system/firewall/_updatefirewallrules"
    );
    assert_eq!(urls[1], "/api/system/security/_updatefirewallrules");
    // A 5.x server declared 4.x: the other way round.
    let new = Host::new("5.2.0", Some(&customer_networks()));
    let reply = new.run("4.x", "");
    assert!(reply.ok, "{}", reply.error);
    let urls: Vec<String> = new.posted().into_iter().map(|(u, _)| u).collect();
    assert_eq!(urls[0], "/api/system/security/_updatefirewallrules");
    assert_eq!(
        urls[1],
        "/internal-api/system/firewall/_updatefirewallrules"
    );
}

#[test]
fn maps_never_rebuilt_after_the_repair_fail_the_step() {
    let mut host = Host::new("5.1.2", Some(&customer_networks()));
    host.config.bluemind_api.task_timeout_secs = 2;
    host.touch("etc/bm/standin-maps-stuck");
    let reply = host.run("auto", "");
    assert!(!reply.ok);
    assert!(reply.error.contains("has not rebuilt"), "{}", reply.error);
    assert!(
        reply.error.contains("virtual_mailbox.db"),
        "{}",
        reply.error
    );
    assert_eq!(reply.steps, ["firewall"]);
    assert_eq!(host.maps_rebuilt(), 0);
}

#[test]
fn a_task_in_error_fails_the_step() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    host.touch("etc/bm/standin-task-fails");
    let reply = host.run("auto", "");
    assert!(!reply.ok);
    assert!(reply.error.contains("ended InError"), "{}", reply.error);
}

// The stand-in itself, against BlueMind's sources.

fn login(host: &Host, password: &str) -> Value {
    let (code, body) = host.http(
        "POST",
        "/api/auth/login?login=admin0@global.virt",
        None,
        Some(json!(password)),
    );
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

#[test]
fn standin_login_answers_bad_with_200_and_expired_with_a_key() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    let bad = login(&host, "wrong");
    assert_eq!(bad["status"], "Bad");
    assert!(bad.get("authKey").is_none());
    let good = login(&host, "admin0-secret");
    assert_eq!(good["status"], "Ok");
    let key = good["authKey"].as_str().unwrap().to_string();
    assert_eq!(
        host.http("GET", "/api/configuration", Some(&key), None).0,
        200
    );
    assert_eq!(
        host.http("POST", "/api/auth/logout", Some(&key), None).0,
        200
    );
    // A key that names no session: RestResponse.invalidSession, 401 AUTHENTICATION_FAIL.
    let (code, body) = host.http("GET", "/api/configuration", Some(&key), None);
    assert_eq!(code, 401);
    let fault: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(fault["errorCode"], "AUTHENTICATION_FAIL");
    assert_eq!(fault["errorType"], "ServerFault");
    // No key at all: an anonymous context, which the service refuses (403).
    assert_eq!(host.http("GET", "/api/configuration", None, None).0, 403);
    // The route is looked up before the session: an unknown path is HTTP 500 whatever the key.
    let (code, body) = host.http("GET", "/api/no/such/service", Some(&key), None);
    assert_eq!(code, 500);
    assert!(
        body.contains("no service registered on path /api/no/such/service"),
        "{body}"
    );
    host.touch("etc/bm/standin-admin0-expired");
    let expired = login(&host, "admin0-secret");
    assert_eq!(expired["status"], "Expired");
    let key = expired["authKey"].as_str().unwrap();
    assert_eq!(
        host.http("GET", "/api/configuration", Some(key), None).0,
        403
    );
}

#[test]
fn standin_configuration_is_a_systemconf_with_the_bm_ini_keys() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    let (code, body) = host.http("GET", "/api/configuration", Some("core-token"), None);
    assert_eq!(code, 200);
    let conf: Value = serde_json::from_str(&body).unwrap();
    assert!(conf.get("mynetworks").is_none(), "{conf}");
    assert_eq!(conf["values"]["mynetworks"], customer_networks());
    assert_eq!(conf["values"]["host"], SERVICE_IP);
    assert_eq!(conf["values"]["dbtype"], "PGSQL");
    assert_eq!(conf["values"]["external_url"], "mail.example.net");
}

fn post_mynetworks(host: &Host, value: &str) -> (u16, String) {
    host.http(
        "POST",
        "/api/configuration",
        Some("core-token"),
        Some(json!({ "mynetworks": value })),
    )
}

#[test]
fn standin_sanitizes_mynetworks_as_bluemind_does() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    // An empty value becomes the defaults: every relay network gone.
    let (code, body) = post_mynetworks(&host, "");
    assert_eq!((code, body.as_str()), (200, ""));
    let kept = host.stored_networks();
    assert!(kept.contains("127.0.0.0/8"));
    assert!(kept.contains(&format!("{SERVICE_IP}/32")));
    assert!(!kept.contains(RELAY), "{kept:?}");
    // A leading '!' is stripped; 127.0.0.0/8 and the server's /32 come back whatever is posted.
    assert_eq!(post_mynetworks(&host, &format!("!{RELAY}")).0, 200);
    let kept = host.stored_networks();
    assert!(
        kept.contains(RELAY) && kept.contains("127.0.0.0/8"),
        "{kept:?}"
    );
    assert!(kept.contains(&format!("{SERVICE_IP}/32")), "{kept:?}");
    // IPv4 masks above /32 and names are refused, and nothing is stored.
    let before = host.stored();
    // (JsonObjectCodec.replyFault: an INVALID_PARAMETER fault is HTTP 500.)
    let (code, body) = post_mynetworks(&host, "198.19.0.0/33");
    assert_eq!(code, 500);
    let fault: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(fault["errorCode"], "INVALID_PARAMETER");
    assert_eq!(fault["errorType"], "ServerFault");
    assert_eq!(post_mynetworks(&host, "relay.example.net").0, 500);
    // An unparsable body too.
    let (code, _) = host.http(
        "POST",
        "/api/configuration",
        Some("core-token"),
        Some(json!(["not", "a", "map"])),
    );
    assert_eq!(code, 500);
    assert_eq!(host.stored(), before);
    assert_eq!(post_mynetworks(&host, "2001:db8::/64").0, 200);
}

#[test]
fn standin_firewall_task_ends_success_with_a_failed_host_in_its_log() {
    let host = Host::new("5.1.2", Some(&customer_networks()));
    host.touch("etc/bm/standin-firewall-host-fails");
    // The old path is no route on 5.x: RestRootHandler's fault through RestHttpProxyHandler,
    // HTTP 500.
    let (code, body) = host.http(
        "POST",
        "/api/system/security/_updatefirewallrules",
        Some("core-token"),
        None,
    );
    assert_eq!(code, 500);
    assert!(
        body.contains("no service registered on path /api/system/security/_updatefirewallrules"),
        "{body}"
    );
    let (_, body) = host.http(
        "POST",
        "/internal-api/system/firewall/_updatefirewallrules",
        Some("core-token"),
        None,
    );
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = |host: &Host| -> Value {
        let (_, b) = host.http("GET", &format!("/api/tasks/{id}"), Some("core-token"), None);
        serde_json::from_str(&b).unwrap()
    };
    assert_eq!(status(&host)["state"], "InProgress");
    let done = status(&host);
    assert_eq!(done["state"], "Success");
    // RulesUpdater logs the failed host as progress; the task ends with TasksManager's
    // `end(true, "", null)`: the last entry is "", the failure is in the logs only.
    assert_eq!(done["lastLogEntry"], "");
    let (_, logs) = host.http(
        "GET",
        &format!("/api/tasks/{id}/_currentLogs?offset=1"),
        Some("core-token"),
        None,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&logs).unwrap(),
        json!([format!("Host {SERVICE_IP} failed updated")])
    );
}
