//! BlueMind's post-migration steps, through its API on the target (as `admin0@global.virt`
//! or with the bm-core token): regenerate the firewall rules (old or new path by version),
//! repair mail delivery (postfix maps), and set mynetworks. Long calls return a task id that is
//! polled until Success or InError, within a deadline.

use std::time::{Duration, Instant};

use bmfleet_proto::v1::{PostMigrationReply, PostMigrationRequest};

use crate::config::AgentConfig;

/// An API call that failed: what was called and what BlueMind answered.
#[derive(Debug)]
pub struct ApiError(pub String);

fn call_error(method: &str, path: &str, e: ureq::Error) -> ApiError {
    match e {
        ureq::Error::Status(code, response) => {
            let body = response.into_string().unwrap_or_default();
            ApiError(format!("{method} {path}: HTTP {code}: {body}"))
        }
        other => ApiError(format!("{method} {path}: {other}")),
    }
}

struct Api {
    base: String,
    key: String,
    agent: ureq::Agent,
}

impl Api {
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("X-BM-ApiKey", &self.key)
    }

    fn post(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value, ApiError> {
        let response = self
            .request("POST", path)
            .send_json(body)
            .map_err(|e| call_error("POST", path, e))?;
        let text = response
            .into_string()
            .map_err(|e| ApiError(format!("POST {path}: {e}")))?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    fn get(&self, path: &str) -> Result<serde_json::Value, ApiError> {
        self.request("GET", path)
            .call()
            .map_err(|e| call_error("GET", path, e))?
            .into_json()
            .map_err(|e| ApiError(format!("GET {path}: {e}")))
    }

    /// Starts a task and polls it to its end.
    fn task(&self, path: &str, deadline: Duration) -> Result<(), ApiError> {
        let started = self.post(path, serde_json::Value::Null)?;
        let id = started
            .get("id")
            .and_then(|i| i.as_str())
            .ok_or_else(|| ApiError(format!("POST {path}: no task id in {started}")))?
            .to_string();
        let until = Instant::now() + deadline;
        loop {
            let state = self.get(&format!("/api/tasks/{id}"))?;
            match state.get("state").and_then(|s| s.as_str()) {
                Some("Success") => return Ok(()),
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
}

/// mynetworks with `origin` replaced by `target` (an address alone or as /32).
pub fn replace_address(mynetworks: &str, origin: &str, target: &str) -> String {
    mynetworks
        .split([',', ' '])
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
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the firewall lives on bm-core's internal API (5.x) or the public one (3.5, 4.x).
fn new_firewall(profile: &str, host_version: &str) -> bool {
    match profile {
        "5.x" => true,
        "3.5" | "4.x" => false,
        _ => host_version.trim().starts_with('5'),
    }
}

/// Runs the three steps; blocking (call from a blocking thread).
pub fn run(
    config: &AgentConfig,
    req: &PostMigrationRequest,
    host_version: &str,
) -> PostMigrationReply {
    let mut reply = PostMigrationReply::default();
    match steps(config, req, host_version, &mut reply) {
        Ok(()) => reply.ok = true,
        Err(ApiError(e)) => reply.error = e,
    }
    reply
}

fn steps(
    config: &AgentConfig,
    req: &PostMigrationRequest,
    host_version: &str,
    reply: &mut PostMigrationReply,
) -> Result<(), ApiError> {
    let api_config = &config.bluemind_api;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let base = api_config.url.trim_end_matches('/').to_string();
    let key = match &api_config.admin0_password {
        Some(password) => {
            let path = "/api/auth/login?login=admin0@global.virt";
            let answer: serde_json::Value = agent
                .post(&format!("{base}{path}"))
                .send_json(serde_json::Value::String(password.clone()))
                .map_err(|e| call_error("POST", "/api/auth/login", e))?
                .into_json()
                .map_err(|e| ApiError(format!("POST /api/auth/login: {e}")))?;
            answer
                .get("authKey")
                .and_then(|k| k.as_str())
                .ok_or_else(|| ApiError(format!("POST /api/auth/login: no authKey in {answer}")))?
                .to_string()
        }
        None => {
            let file = config.host_path(&api_config.token_file);
            std::fs::read_to_string(&file)
                .map_err(|e| {
                    ApiError(format!(
                        "cannot read the bm-core token {}: {e}",
                        file.display()
                    ))
                })?
                .trim()
                .to_string()
        }
    };
    let api = Api { base, key, agent };
    let deadline = Duration::from_secs(api_config.task_timeout_secs);
    let firewall = if new_firewall(&req.profile, host_version) {
        "/internal-api/system/firewall/_updatefirewallrules"
    } else {
        "/api/system/security/_updatefirewallrules"
    };
    api.task(firewall, deadline)?;
    reply.steps.push("firewall".into());
    api.task("/api/system/maildelivery/mgmt/_repair", deadline)?;
    reply.steps.push("mail-maintenance".into());
    let current = api.get("/api/configuration")?;
    reply.mynetworks_before = current
        .get("mynetworks")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    let wanted = if req.mynetworks.is_empty() {
        replace_address(
            &reply.mynetworks_before,
            &req.origin_address,
            &req.target_address,
        )
    } else {
        req.mynetworks.clone()
    };
    api.post(
        "/api/configuration",
        serde_json::json!({ "mynetworks": wanted }),
    )?;
    // BlueMind rewrites the stored value: report what it kept.
    let after = api.get("/api/configuration")?;
    reply.mynetworks_after = after
        .get("mynetworks")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
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
            "127.0.0.0/8, 198.18.0.3, 198.18.0.0/24"
        );
        assert_eq!(
            replace_address("198.18.0.2/32 192.0.2.0/24", "198.18.0.2", "198.18.0.3"),
            "198.18.0.3/32, 192.0.2.0/24"
        );
    }

    #[test]
    fn the_firewall_path_follows_the_version() {
        assert!(new_firewall("5.x", ""));
        assert!(!new_firewall("4.x", "5.1"));
        assert!(new_firewall("auto", "5.2.1"));
        assert!(!new_firewall("auto", "4.9.3"));
    }
}
